"""The cvmlab-fork spawner's server: what it preloads, and how it is started.

Kept free of avocado imports, so a process can start the server before it imports
avocado itself (`orchestrator.lab.avocado_run`): under TCG in the lab, `import
avocado` alone takes about 11 s, and the server's own imports about as long again;
started first, the two run side by side on the lab's two vCPUs. The spawner itself
is `orchestrator.lab.fork_spawner`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence

#: The name avocado knows the spawner by (pyproject.toml's entry point).
NAME = "cvmlab-fork"

#: What the server imports once: avocado's runner for instrumented tests and the
#: scenario layers every scenario file imports. A module that fails to import here
#: is imported by the test itself, where its error is reported.
PRELOAD = (
    "avocado.core.test",
    "avocado.plugins.runners.avocado_instrumented",
    "avocado.plugins.runners.tap",
    "orchestrator.scenario",
    "orchestrator.kvm_scenario",
    "orchestrator.lab.fork_spawner",
)

#: The server's start method: a fork of a process that imported PRELOAD.
CONTEXT = multiprocessing.get_context("forkserver")

_started = False


def start_server() -> None:
    """Start this process's fork server (once); it imports PRELOAD in the background.

    It exits when this process does (multiprocessing's alive pipe).
    """
    global _started
    if _started:
        return
    CONTEXT.set_forkserver_preload(list(PRELOAD))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    _started = True


def chooses_fork_spawner(argv: Sequence[str]) -> bool:
    """Whether an `avocado` command line is a `run` with `--spawner cvmlab-fork`."""
    words = list(argv)
    if "run" not in words:
        return False
    for index, word in enumerate(words):
        if word == "--spawner" and words[index + 1 : index + 2] == [NAME]:
            return True
        if word == f"--spawner={NAME}":
            return True
    return False
