"""Reproducer bundles (`repro.json`) and `cvmlab repro`: a failed test's guest, back on a desk.

`write_repro_bundle` (called from `MachineScenario.tearDown` on failure) records the
spec, the exact QEMU command, the image manifest with hashes, the seed and the
test's ordered QMP/SSH steps; `load_repro_bundle` reads it back; `reproduce`
relaunches and replays. No avocado import here.
"""

from orchestrator.repro.bundle import (
    BUNDLE_NAME,
    FAILED_STATUSES,
    ReproBundle,
    ReproError,
    load_repro_bundle,
    write_repro_bundle,
)
from orchestrator.repro.replay import ReproResult, StepReplay, reproduce
from orchestrator.repro.steps import Step, extract_steps

__all__ = [
    "BUNDLE_NAME",
    "FAILED_STATUSES",
    "ReproBundle",
    "ReproError",
    "ReproResult",
    "Step",
    "StepReplay",
    "extract_steps",
    "load_repro_bundle",
    "reproduce",
    "write_repro_bundle",
]
