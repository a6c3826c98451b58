"""The cvmlab-fork spawner's server: what it preloads, and how it is started.

Two ways to start it: `start_server()` execs multiprocessing's server, which imports
PRELOAD itself (avocado's `EarlyStart` plugin, on the host); `start_server_as_fork()`
forks it from a process that is about to run avocado, after the imports both need
(`orchestrator.lab.avocado_run`, in the lab, where each import of avocado is seconds
of Python under TCG). Kept free of avocado imports, so that launcher can decide
before it imports avocado. The spawner itself is `orchestrator.lab.fork_spawner`.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

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
    # avocado's test runs each phase in a ThreadPool (imported on first use).
    "multiprocessing.dummy",
    # What the guest_memfd scenarios (the lab's biggest suite) import beyond the above.
    "orchestrator.kvm.child",
    "orchestrator.kvm.host_access",
    "orchestrator.invariants.gmem_host",
    "orchestrator.host.cgroup",
    "orchestrator.host.pagemap",
    # Last: measures the host probe once for every test (after the layers it uses).
    "orchestrator.lab.fork_warm",
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


def start_server_as_fork(shared: Sequence[str]) -> None:
    """Import `shared` here, then fork the server, which imports the rest of PRELOAD.

    For a process about to run avocado itself (orchestrator.lab.avocado_run), with
    `shared` the modules it needs next anyway (avocado.core.main). Under TCG in the
    lab, an exec'd server imported avocado a second time beside this process (PRELOAD
    is 21 s of import there, 16 s of it shared with avocado's main) on the same two
    vCPUs. Forked after the shared imports, the two split only the rest: the server
    its 5 s of our layers, this process avocado's plugins, parsing and resolution.
    The server starts as this process was before avocado's main() ran: as clean as an
    exec'd server after its preload (no event loop, no threads).

    Builds on multiprocessing's own forkserver (its `main()` serves the requests, the
    forkserver context connects to it). Where that module's shape is not the one this
    was written against (Python 3.11's; 3.14 adds an authentication key), or the fork
    fails, falls back to `start_server()`.
    """
    global _started
    if _started:
        return
    from multiprocessing import connection, forkserver, resource_tracker, util

    # Private parts of multiprocessing (checked below; typeshed does not declare them).
    server: Any = forkserver._forkserver
    addresses: Any = connection
    expected = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")
    signature = list(inspect.signature(forkserver.main).parameters)
    if signature != _FORKSERVER_MAIN or not all(hasattr(server, a) for a in expected):
        start_server()
        return
    for module in shared:
        importlib.import_module(module)
    resource_tracker.ensure_running()
    listener = socket.socket(socket.AF_UNIX)
    address = addresses.arbitrary_address("AF_UNIX")
    listener.bind(address)
    os.chmod(address, 0o600)
    listener.listen()
    # Every client holds the write end; the server exits when the last one closes it.
    alive_r, alive_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # out of memory or pids: the exec'd server may still start
        for fd in (alive_r, alive_w):
            os.close(fd)
        listener.close()
        start_server()
        return
    if pid == 0:  # the server: imports the rest of PRELOAD, then serves
        code = 0
        try:
            os.close(alive_w)
            forkserver.main(listener.fileno(), alive_r, list(PRELOAD))
        except SystemExit:
            pass
        except BaseException:
            code = 1
            sys.excepthook(*sys.exc_info())  # as an exec'd server would show it
        finally:
            os._exit(code)  # never this process's atexit handlers (avocado's, ours)
    os.close(alive_r)
    listener.close()
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid
    util.debug("cvmlab: forkserver forked as pid %d", pid)
    _started = True


#: forkserver.main's parameters as of Python 3.11.
_FORKSERVER_MAIN = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]


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
