"""`cvmlab bench repro`: a reproducer reaches an SSH-ready guest within 1.2x of a normal boot.

Two cycles, alternated by `orchestrator.bench.core.compare`, each timed to an open SSH
session (the guest is then shut down cleanly, untimed):

- boot: a normal orchestrated start: `Machine.start`, the ready line, SSH;
- repro: the `cvmlab repro --no-replay` path in this process: load the bundle,
  check the image's hashes, relaunch the recorded command, the ready line, SSH.

The bundle comes from the first boot cycle's own evidence (written as a failed
test's tearDown would write it), so both sides boot the same command line.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.bench.core import Comparison, compare
from orchestrator.bench.guest import image_boot
from orchestrator.image import ImageManifest, default_image
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import MachineSpec
from orchestrator.repro.bundle import load_repro_bundle, write_repro_bundle
from orchestrator.repro.replay import reproduce
from orchestrator.timeline import Timeline

REPRO_RATIO_TARGET = 1.2


def _spec(image: ImageManifest) -> MachineSpec:
    return MachineSpec(boot=image_boot(image))


def boot_cycle(image: ImageManifest, binary: str, evidence: Path) -> float:
    """Seconds from Machine.start to an open SSH session, evidence kept in `evidence`."""
    evidence.mkdir(mode=0o700, parents=True)
    with (
        Timeline(evidence / "timeline.jsonl") as timeline,
        Machine(
            _spec(image), evidence, binary=binary, timeline=timeline,
            ready_marker=image.ready_marker,
        ) as machine,
    ):  # fmt: skip
        start = time.monotonic()
        machine.start()
        machine.wait_ready()
        shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
        elapsed = time.monotonic() - start
        shell.close()
        machine.shutdown()
    return elapsed


def repro_cycle(bundle_path: Path, evidence: Path) -> float:
    """Seconds from loading the bundle to an open SSH session on the relaunched guest."""
    start = time.monotonic()
    bundle = load_repro_bundle(bundle_path)
    # reproduce() stamps readiness on the monotonic clock (timeline.now()).
    result = reproduce(
        bundle, replay=False, keep_running=False, evidence_dir=evidence, say=lambda _: None
    )
    assert result.ready_at is not None
    return result.ready_at - start


def bench_repro(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    image = default_image(progress=progress)
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-") as tmp:
        root = Path(tmp)
        numbers = itertools.count()
        bundle: list[Path] = []

        def boot() -> float:
            evidence = root / f"boot-{next(numbers)}"
            elapsed = boot_cycle(image, binary, evidence)
            if not bundle:
                argv = json.loads((evidence / "argv.json").read_text())
                bundle.append(
                    write_repro_bundle(
                        evidence,
                        test_id="bench",
                        status="FAIL",
                        fail_reason=None,
                        spec=_spec(image),
                        qemu_command=argv,
                        image=image,
                        seed=None,
                    )
                )
            return elapsed

        def repro() -> float:
            return repro_cycle(bundle[0], root / f"repro-{next(numbers)}")

        return compare(
            "repro", runs, ("boot", boot), ("repro", repro), REPRO_RATIO_TARGET, progress
        )
