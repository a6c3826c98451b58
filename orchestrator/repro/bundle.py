"""`repro.json`: everything needed to bring a failed test's guest back, in the test's data dir.

Written by `MachineScenario.tearDown` when a test did not pass (FAIL, ERROR,
INTERRUPTED), read by `cvmlab repro`. Format 1, one JSON object:

    format, kind ("cvmlab-repro"), written (wall-clock, ISO 8601), cvmlab (version)
    test_id, status, fail_reason        what avocado said about the test
    spec                                `spec_to_json` of the MachineSpec
    qemu_argv                           the exact argv QEMU ran with (argv.json)
    image                               the image manifest (`ImageManifest.to_json`) plus
                                        its "directory", with the sha256 of every file,
                                        or null for a machine booted without an image
    files                               sha256 of each file the spec boots from that the
                                        image's manifest does not already cover
    seed                                the seed of a randomised scenario, or null
    window                              ready, end, failure_t (monotonic seconds of the
                                        test's clock) and failure_cause
    steps                               [Step.to_json()], numbered 1..N (see steps.py)
    failed_step                         the step number the failure follows, or null
    incomplete                          what could not be read (cut-off jsonl lines)

The steps are extracted when the bundle is written, so later changes to the
evidence files do not change what a reproducer replays.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.errors import CvmlabError, ImageError, SpecError
from orchestrator.image import ImageManifest, verify_image
from orchestrator.image.debian import sha256_file
from orchestrator.image.pvh import kernel_entry
from orchestrator.qemu.spec import DiskBoot, KernelBoot, MachineSpec, spec_from_json, spec_to_json
from orchestrator.repro.steps import Step, extract_steps, read_jsonl
from orchestrator.timeline import now

BUNDLE_NAME = "repro.json"
BUNDLE_FORMAT = 1
BUNDLE_KIND = "cvmlab-repro"
# avocado statuses after which a bundle is written (see avocado.core.test: PASS is set
# at the end of a test that passed; CANCEL, SKIP and WARN are not failures).
FAILED_STATUSES = frozenset({"FAIL", "ERROR", "INTERRUPTED"})


class ReproError(CvmlabError):
    """A reproducer bundle that cannot be found, read or trusted."""


@dataclass(frozen=True)
class ReproBundle:
    """A loaded repro.json (see the module docstring for the fields)."""

    path: Path
    test_id: str
    status: str | None
    fail_reason: str | None
    spec: MachineSpec
    qemu_argv: tuple[str, ...]
    image: ImageManifest | None
    files: dict[str, str]
    seed: int | None
    steps: tuple[Step, ...]
    failed_step: int | None
    failure_cause: str
    incomplete: tuple[str, ...]
    written: str

    @property
    def evidence_dir(self) -> Path:
        return self.path.parent

    @property
    def default_until(self) -> int:
        """Replay up to just BEFORE the failing step, so a developer runs it by hand.

        Without a failing step (no steps, or none before the failure), all steps.
        """
        if self.failed_step is None:
            return len(self.steps)
        return self.failed_step - 1

    def step(self, n: int) -> Step:
        return self.steps[n - 1]

    def verify(self) -> None:
        """Refuse an image or boot file that changed since the test: ImageError naming it."""
        fix = (
            "a reproducer needs the exact files the test booted: restore them (e.g. from "
            "the CI job's artefacts) or re-run the test for a new bundle"
        )
        if self.image is not None:
            try:
                verify_image(self.image)
            except ImageError as error:
                if "mode" in error.problem:
                    raise  # a key or directory opened up: its own fix (chmod) applies
                raise ImageError(f"{error.problem} since the test ran", fix) from None
        for name, expected in sorted(self.files.items()):
            if self.image is not None and not Path(name).exists():
                # The ELF kernel a plain guest enters is unpacked from the image's bzImage
                # into the cache (image/pvh.py): one cleaned since is unpacked again, to the
                # same bytes, which the hash below then checks.
                kernel_entry(Path(self.image.kernel))
            try:
                actual = sha256_file(Path(name))
            except FileNotFoundError:
                raise ImageError(f"boot file {name} is missing since the test ran", fix) from None
            if actual != expected:
                raise ImageError(
                    f"boot file {name} changed since the test ran (sha256 {actual[:12]}...)", fix
                )


def _boot_files(spec: MachineSpec) -> list[str]:
    """Files QEMU only reads to boot `spec` (a writable disk or vars store would change)."""
    boot = spec.boot
    files: list[str] = []
    if isinstance(boot, KernelBoot):
        files += [boot.kernel] + ([boot.initrd] if boot.initrd else [])
    elif isinstance(boot, DiskBoot) and boot.snapshot:
        files.append(boot.disk)
    if boot.firmware is not None:
        files.append(boot.firmware.path)
    return files


def _covered_by_image(path: str, image: ImageManifest | None) -> bool:
    if image is None:
        return False
    resolved = Path(path).resolve()
    return resolved.parent == image.directory and resolved.name in image.outputs


def _image_to_json(image: ImageManifest) -> dict[str, Any]:
    return {"directory": str(image.directory), **image.to_json()}


def _image_from_json(data: dict[str, Any]) -> ImageManifest:
    directory = Path(str(data["directory"]))

    def inside(key: str) -> Path:
        return directory / str(data[key])

    return ImageManifest(
        name=str(data["name"]),
        directory=directory,
        kernel=inside("kernel"),
        initrd=inside("initrd"),
        cmdline=str(data["cmdline"]),
        ssh_user=str(data["ssh_user"]),
        ssh_key=inside("ssh_key"),
        host_key=str(data["host_key"]),
        ready_marker=str(data["ready_marker"]),
        kernel_release=str(data["kernel_release"]),
        packages=dict(data["packages"]),
        inputs=dict(data["inputs"]),
        outputs=dict(data["outputs"]),
        restored_clock=str(data.get("restored_clock", "ssh")),
    )


def _start_record(evidence_dir: Path) -> dict[str, Any] | None:
    """The test's start.json (orchestrator.qemu.warm), None before warm starts existed."""
    try:
        start = json.loads((evidence_dir / "start.json").read_text())
    except (OSError, ValueError):
        return None
    return start if isinstance(start, dict) else None


def write_repro_bundle(
    evidence_dir: Path,
    *,
    test_id: str,
    status: str | None,
    fail_reason: str | None,
    spec: MachineSpec,
    qemu_command: list[str],
    image: ImageManifest | None,
    seed: int | None,
    end: float | None = None,
) -> Path:
    """Write `evidence_dir/repro.json` from the evidence recorded so far; return its path.

    `qemu_command` is the argv QEMU was started with (argv.json). `end` is the
    now() stamp at which the test ended (default: now, i.e. call this first thing
    in tearDown, so tearDown's own commands are not steps). Files are read, never
    changed; a cut-off jsonl line is noted under "incomplete".
    """
    evidence_dir = Path(evidence_dir)
    end = now() if end is None else end
    qmp = read_jsonl(evidence_dir / "qmp.jsonl")
    timeline = read_jsonl(evidence_dir / "timeline.jsonl")
    found = extract_steps(qmp.records, timeline.records, end=end)
    files = {
        path: sha256_file(Path(path))
        for path in _boot_files(spec)
        if not _covered_by_image(path, image) and Path(path).is_file()
    }
    data: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "kind": BUNDLE_KIND,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cvmlab": __version__,
        "test_id": test_id,
        "status": status,
        "fail_reason": fail_reason,
        "spec": spec_to_json(spec),
        "qemu_argv": list(qemu_command),
        "image": _image_to_json(image) if image is not None else None,
        "files": files,
        "seed": seed,
        # How the guest started (cold, or restored from a snapshot): repro starts the same way.
        "start": _start_record(evidence_dir),
        "window": {
            "ready": found.ready,
            "end": found.end,
            "failure_t": found.failure_t,
            "failure_cause": found.failure_cause,
        },
        "steps": [step.to_json() for step in found.steps],
        "failed_step": found.failed_step,
        "incomplete": qmp.problems + timeline.problems,
    }
    path = evidence_dir / BUNDLE_NAME
    partial = path.with_name(BUNDLE_NAME + ".part")
    partial.write_text(json.dumps(data, indent=1, default=str) + "\n")
    # Whole or absent: a runner killed mid-write leaves no half bundle behind.
    partial.replace(path)
    return path


# --- loading ------------------------------------------------------------------------


def _job_status(result_dir: Path) -> str | None:
    """The test's status in its job's results.json, None when the job did not finish it."""
    results = result_dir.parent.parent / "results.json"
    try:
        data = json.loads(results.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for test in data.get("tests", []) if isinstance(data, dict) else []:
        if isinstance(test, dict) and Path(str(test.get("logdir", ""))).name == result_dir.name:
            status = test.get("status")
            return str(status) if status else None
    return None


def _missing_bundle(result_dir: Path) -> ReproError:
    data = result_dir / "data"
    status = _job_status(result_dir)
    if status == "PASS" or status in ("CANCEL", "SKIP", "WARN"):
        why = f"the test ended {status}; bundles are written only for failed tests"
    elif status is not None:
        why = f"the test ended {status} but wrote no bundle (a cvmlab before repro bundles?)"
    else:
        why = "the test did not finish (its runner was killed?), so no bundle was written"
    if (data / "argv.json").is_file() and (data / "run.sh").is_file():
        return ReproError(
            f"no {BUNDLE_NAME} in {data}: {why}",
            f"{data / 'run.sh'} is the exact QEMU command the test ran; start it by hand",
        )
    return ReproError(
        f"no {BUNDLE_NAME} in {data}: {why}; the test never launched QEMU (no run.sh)",
        "nothing to reproduce here: see the test's debug.log",
    )


def _job_bundles(job_dir: Path) -> Path:
    """The one bundle of an avocado job directory, or an error saying what is there."""
    bundles = sorted(job_dir.glob(f"test-results/*/data/{BUNDLE_NAME}"))
    if len(bundles) == 1:
        return bundles[0]
    if bundles:
        listing = "\n".join(f"  {b.parent.parent}" for b in bundles)
        raise ReproError(
            f"{job_dir} holds {len(bundles)} failed tests with a bundle",
            "give one test's result directory",
            detail=listing,
        )
    finished = (job_dir / "results.json").is_file()
    tests = sorted(p for p in (job_dir / "test-results").iterdir() if p.is_dir())
    with_runsh = [t for t in tests if (t / "data" / "run.sh").is_file()]
    if not finished:
        hint = (
            f"run.sh in {with_runsh[0] / 'data'} is the exact QEMU command"
            if with_runsh
            else "see job.log"
        )
        raise ReproError(
            f"{job_dir} is a half-written avocado job (no results.json: its runner was "
            "killed?) and no test in it wrote a bundle",
            hint,
        )
    raise ReproError(
        f"no test in the avocado job {job_dir} wrote a bundle (none failed with a machine)",
        "bundles are written for failed machine tests only",
    )


def find_bundle(path: Path) -> Path:
    """repro.json from a test result dir, its data/ dir, a job dir, or the file itself."""
    path = Path(path)
    if not path.exists():
        raise ReproError(f"{path} does not exist", "give a test result directory of an avocado job")
    if path.is_file():
        return path
    for candidate in (path / BUNDLE_NAME, path / "data" / BUNDLE_NAME):
        if candidate.is_file():
            return candidate
    if (path / "test-results").is_dir():
        return _job_bundles(path)
    if (path / "data").is_dir() and (path / "debug.log").exists():
        raise _missing_bundle(path)
    if path.name == "data" and (path.parent / "debug.log").exists():
        raise _missing_bundle(path.parent)
    raise ReproError(
        f"{path} is not an avocado job or test result directory "
        f"(no {BUNDLE_NAME}, no data/ with debug.log, no test-results/)",
        "give .../job-<date>-<id>/test-results/<test>/ of a failed test",
    )


def load_repro_bundle(path: Path) -> ReproBundle:
    """Load a bundle; `path` is a test result dir, its data/ dir, a job dir or repro.json.

    Every problem is a ReproError (or SpecError for a malformed spec) saying what
    is wrong and what to do: not a result dir, a test that passed, a runner killed
    before the bundle was written, a cut-off file.
    """
    bundle_path = find_bundle(Path(path))
    try:
        text = bundle_path.read_text()
    except OSError as exc:
        raise ReproError(f"cannot read {bundle_path}: {exc}", "check its permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReproError(
            f"{bundle_path} is cut off or not JSON ({exc.msg} at line {exc.lineno})",
            "the bundle is damaged; re-run the test for a new one",
        ) from None
    if not isinstance(data, dict) or data.get("kind") != BUNDLE_KIND:
        raise ReproError(
            f"{bundle_path} is not a cvmlab reproducer bundle", "give a failed test's repro.json"
        )
    if data.get("format") != BUNDLE_FORMAT:
        raise ReproError(
            f"{bundle_path} is bundle format {data.get('format')}, this cvmlab reads "
            f"{BUNDLE_FORMAT}",
            f"use the cvmlab that wrote it ({data.get('cvmlab')})",
        )
    try:
        spec = spec_from_json(data["spec"])
        image = _image_from_json(data["image"]) if data.get("image") else None
        steps = tuple(Step.from_json(s) for s in data["steps"])
        window = data.get("window") or {}
        seed = data.get("seed")
        failed = data.get("failed_step")
        bundle = ReproBundle(
            path=bundle_path,
            test_id=str(data["test_id"]),
            status=data.get("status"),
            fail_reason=data.get("fail_reason"),
            spec=spec,
            qemu_argv=tuple(str(a) for a in data["qemu_argv"]),
            image=image,
            files={str(k): str(v) for k, v in dict(data.get("files") or {}).items()},
            seed=None if seed is None else int(seed),
            steps=steps,
            failed_step=None if failed is None else int(failed),
            failure_cause=str(window.get("failure_cause", "")),
            incomplete=tuple(str(p) for p in data.get("incomplete") or ()),
            written=str(data.get("written", "")),
        )
    except SpecError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ReproError(
            f"{bundle_path} is malformed ({type(exc).__name__}: {exc})",
            "re-run the test for a new bundle",
        ) from None
    if [s.n for s in steps] != list(range(1, len(steps) + 1)):
        raise ReproError(f"{bundle_path}: steps are not numbered 1..N", "re-run the test")
    return bundle
