"""`cvmlab bench warm`: a restored snapshot reaches SSH within 0.15x of a cold boot.

Two cycles on the same machine (the default image, 512 MiB memfd `share=on`, TCG
or the probe's accelerator), alternated by `orchestrator.bench.core.compare`, each
timed from the start of QEMU to the end of its first SSH command, then shut down
untimed:

- cold: `start_guest` with a cold reason: boot, readiness marker, SSH, `true`;
- warm: `start_guest` from a snapshot in a private cache: QEMU with
  `-incoming defer`, migrate-incoming, cont, SSH (whose listener sets the guest's
  clock from the RTC in the default image), `true`; with an image whose clock cvmlab
  sets, that command (`finish_start`) instead of `true`.

The snapshot is saved once, before the runs, by an untimed cold boot; its cache
is a temporary directory, so the user's cache is neither used nor changed.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.bench.core import Comparison, compare
from orchestrator.bench.guest import image_boot
from orchestrator.errors import CvmlabError
from orchestrator.image import ImageManifest, default_image
from orchestrator.qemu.introspect import introspect_qemu
from orchestrator.qemu.snapshot import SnapshotCache
from orchestrator.qemu.spec import MachineSpec, MemfdBackend
from orchestrator.qemu.warm import finish_start, start_guest
from orchestrator.timeline import Timeline

WARM_RATIO_TARGET = 0.15


def _spec(image: ImageManifest) -> MachineSpec:
    return MachineSpec(boot=image_boot(image), accel="tcg", backend=MemfdBackend(share=True))


def start_cycle(
    image: ImageManifest,
    binary: str,
    version: tuple[int, ...],
    cache: SnapshotCache,
    evidence: Path,
    cold_reason: str | None,
    expect: str,
) -> float:
    """Seconds from starting QEMU to a working SSH command; the start must be `expect`."""
    evidence.mkdir(mode=0o700, parents=True)
    with Timeline(evidence / "timeline.jsonl") as timeline:
        started = time.monotonic()
        machine, record = start_guest(
            _spec(image), evidence, binary=[binary], qemu_version=version,
            image_hashes=image.outputs, ready_marker=image.ready_marker, timeline=timeline,
            cold_reason=cold_reason, cache=cache,
        )  # fmt: skip
        with machine:
            shell = machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
            if not finish_start(machine, shell, record, image.restored_clock):
                shell.run("true")  # unless the warm start's clock set was a command
            elapsed = time.monotonic() - started
            if record.mode != expect:
                raise CvmlabError(
                    f"bench warm: expected a {expect} start, got {record.mode} ({record.reason})",
                    "see the evidence under the bench's temporary directory",
                )
            machine.shutdown()
    return elapsed


def bench_warm(runs: int, binary: str, progress: Callable[[str], None]) -> Comparison:
    image = default_image(progress=progress)
    facts = introspect_qemu(binary)
    version = (facts.version.major, facts.version.minor, facts.version.micro)
    with tempfile.TemporaryDirectory(prefix="cvmlab-bench-") as tmp:
        root = Path(tmp)
        cache = SnapshotCache(root / "snapshots")
        numbers = itertools.count()

        def cycle(cold_reason: str | None, expect: str) -> Callable[[], float]:
            def run() -> float:
                evidence = root / f"{expect}-{next(numbers)}"
                return start_cycle(image, binary, version, cache, evidence, cold_reason, expect)

            return run

        progress("bench warm: saving the snapshot (one untimed cold boot and its restore)")
        cycle(None, "warm")()
        return compare(
            "warm", runs,
            ("cold", cycle("bench: the cold side", "cold")), ("warm", cycle(None, "warm")),
            WARM_RATIO_TARGET, progress,
        )  # fmt: skip
