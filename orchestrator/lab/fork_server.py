"""The cvmlab-fork spawner's server: what it preloads, and how it is started.

Two ways to start it: `start_server()` execs multiprocessing's server, which imports
PRELOAD itself (avocado's `EarlyStart` plugin, on the host); `start_server_as_fork()`
forks it from a process that is about to run avocado, after the imports both need
(`orchestrator.lab.avocado_run`, in the lab, where each import of avocado is seconds
of Python under TCG). Kept free of avocado imports, so that launcher can decide
before it imports avocado. The spawner itself is `orchestrator.lab.fork_spawner`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The name avocado knows the spawner by (pyproject.toml's entry point).
NAME = "cvmlab-fork"

#: What the server imports once for every job: avocado's runners and the scenario base
#: every scenario file imports. A module that fails to import here is imported by the
#: test itself, where its error is reported. `job_preload` adds what the job's own
#: scenario files import (a guest per test, or direct KVM ioctls).
PRELOAD = (
    "avocado.core.test",
    "avocado.plugins.runners.avocado_instrumented",
    "avocado.plugins.runners.tap",
    "orchestrator.scenario",
    "orchestrator.lab.fork_spawner",
    # avocado's test runs each phase in a ThreadPool (imported on first use).
    "multiprocessing.dummy",
    # Last: measures the host probe once for every test (after the layers it uses).
    "orchestrator.lab.fork_warm",
)

#: What the guest_memfd scenarios import when their tests run (not at the top of their
#: files): preloaded with `orchestrator.kvm_scenario`.
KVM_TEST_IMPORTS = (
    "orchestrator.kvm.child",
    "orchestrator.kvm.host_access",
    "orchestrator.invariants.gmem_host",
    "orchestrator.host.cgroup",
    "orchestrator.host.pagemap",
)


def job_preload(references: Iterable[str]) -> list[str]:
    """PRELOAD plus the cvmlab modules the job's scenario files import at their top.

    Only what the job uses: in the lab, a guest_memfd job imported every guest,
    QEMU and image layer through the scenario base before the split (9 s of its
    Python under TCG). A reference that is not a readable Python file (an alias,
    a typo) adds nothing: avocado's resolver reports it.
    """
    modules: list[str] = []
    for reference in references:
        for module in _imported_modules(reference):
            if module not in modules and module not in PRELOAD:
                modules.append(module)
    if "orchestrator.kvm_scenario" in modules:
        modules += [m for m in KVM_TEST_IMPORTS if m not in modules]
    return [*PRELOAD[:-1], *modules, PRELOAD[-1]]


def _imported_modules(reference: str) -> list[str]:
    """`orchestrator.*` modules a test file imports at module level (`FILE[:TEST]`)."""
    path = reference.split(".py:", 1)[0] + ".py" if ".py:" in reference else reference
    if not path.endswith(".py"):
        return []
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [name for name in names if name.split(".", 1)[0] == "orchestrator"]
    return found


#: The server's start method: a fork of a process that imported PRELOAD.
CONTEXT = multiprocessing.get_context("forkserver")

_started = False


def start_server(preload: Sequence[str] = PRELOAD) -> None:
    """Start this process's fork server (once); it imports `preload` in the background.

    It exits when this process does (multiprocessing's alive pipe).
    """
    global _started
    if _started:
        return
    CONTEXT.set_forkserver_preload(list(preload))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    _started = True


def start_server_as_fork(shared: Sequence[str], preload: Sequence[str] = PRELOAD) -> None:
    """Import `shared` here, then fork the server, which imports the rest of `preload`.

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
    fails, falls back to `start_server()`. multiprocessing's resource tracker, which
    every fork request names, is forked here too (`_fork_resource_tracker`).
    """
    global _started
    if _started:
        return
    from multiprocessing import connection, forkserver, util

    # Private parts of multiprocessing (checked below; typeshed does not declare them).
    server: Any = forkserver._forkserver
    addresses: Any = connection
    expected = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")
    signature = list(inspect.signature(forkserver.main).parameters)
    if signature != _FORKSERVER_MAIN or not all(hasattr(server, a) for a in expected):
        start_server(preload)
        return
    for module in shared:
        importlib.import_module(module)
    _fork_resource_tracker()
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
        start_server(preload)
        return
    if pid == 0:  # the server: imports the rest of `preload`, then serves
        code = 0
        try:
            os.close(alive_w)
            forkserver.main(listener.fileno(), alive_r, list(preload))
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


def _fork_resource_tracker() -> None:
    """Start multiprocessing's resource tracker as a fork of this process.

    Its own `ensure_running()` execs a new Python for it (`-c 'from
    multiprocessing.resource_tracker import main; main(fd)'`): 3.8 s of interpreter
    start and imports under TCG in the lab (`-X importtime`), on the vCPU the job
    waits for. A fork has those imports already. The child keeps only stdio and its
    pipe's read end, ignores SIGINT and SIGTERM like the exec'd one (signals meant
    for the job), and exits when the last writer closes the pipe. Where the
    tracker's private shape is not the expected one, or the fork fails, its own
    `ensure_running()` starts it.
    """
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker
    if not all(hasattr(tracker, a) for a in ("_fd", "_pid")) or tracker._fd is not None:
        resource_tracker.ensure_running()
        return
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # the child closes stdout: nothing twice
        stream.flush()
    ignored = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, ignored)
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:  # the tracker: serves until every writer is gone
        try:
            os.closerange(3, read_end)
            os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
            resource_tracker.main(read_end)  # unblocks the signals after ignoring them
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
    os.close(read_end)
    if pid < 0:
        os.close(write_end)
        resource_tracker.ensure_running()
        return
    tracker._fd, tracker._pid = write_end, pid


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
