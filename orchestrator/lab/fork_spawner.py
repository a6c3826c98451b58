"""An avocado spawner that forks each test's runner from a pre-imported server.

Why: inside the lab, Python runs under TCG about 16x slower than on the host
(`sum(range(10**7))`: 5.7 s vs 0.35 s, measured on 7.3). avocado's own `process`
spawner starts a fresh interpreter per test, and each one imports avocado and our
scenario layer again: 14 s for `import avocado.core.test`, 27 s with
`orchestrator.kvm_scenario`, before a test does anything. That import, not the
test, was most of the 745 s the gmem suite took in the lab.

How: Python's own `multiprocessing` forkserver. One server process imports the
modules in PRELOAD once; every task is a fork of it that runs the task's avocado
runner (`avocado.plugins.runners.<kind>`'s `main()` with the argv the process
spawner would have given its executable). The fork starts from a clean
interpreter that never ran the job's event loop, so a test sees the same state a
fresh runner would, minus the import time. Kinds whose runner module is unknown
fall back to avocado's process spawner.

Select it with `avocado run --spawner cvmlab-fork` (registered as an entry point
in pyproject.toml); `cvmlab profile run` does, on the host and in the lab. The
server is started by `EarlyStart` (below) right after avocado parses its command
line, or before avocado is imported (orchestrator.lab.avocado_run). No orphans: the
server exits when the job does (multiprocessing's alive pipe), and a task is
terminated like the process spawner terminates its runner: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from avocado.core.nrunner.runnable import RUNNERS_REGISTRY_STANDALONE_EXECUTABLE, Runnable
from avocado.core.plugin_interfaces import CLI
from avocado.plugins.spawners.process import ProcessSpawner

from orchestrator.lab.fork_server import CONTEXT, NAME, PRELOAD, job_preload, start_server

__all__ = ["NAME", "PRELOAD", "EarlyStart", "ForkSpawner", "drain_monitor", "run_runner"]

#: Runnable kinds whose runner command is registered up front (see `_prime`). Every kind
#: with a runner module is forked; a kind without one goes to the process spawner.
FORKED_KINDS = ("avocado-instrumented", "tap", "exec-test")

#: How often a runner polls its test and posts "running" to the job (avocado: 0.01 s).
#: Under TCG each poll and post costs the runner and the job process milliseconds of
#: CPU, so two tests at 100 posts/s each kept the lab's two vCPUs busy with
#: bookkeeping: a gmem test whose body took 2.6 s took 30-50 s in the job.
POLL_INTERVAL = 0.2


def run_runner(module: str, argv: list[str]) -> None:
    """In the forked child: run avocado's runner `module` as its executable would.

    stdio goes to /dev/null, as the process spawner's DEVNULL: runners report to
    the job's status server, not on stdout. The runner polls its test every
    POLL_INTERVAL instead of every 10 ms.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The child inherits the forkserver start method from its preparation data;
    # avocado's runner would then start a second, empty server for its test.
    multiprocessing.set_start_method("fork", force=True)
    _quiet_inherited_logs()
    sys.argv = argv
    runner = importlib.import_module(module)
    if hasattr(runner, "RUNNER_RUN_CHECK_INTERVAL"):
        setattr(runner, "RUNNER_RUN_CHECK_INTERVAL", POLL_INTERVAL)  # noqa: B010
    instrumented = getattr(runner, "AvocadoInstrumentedTestRunner", None)
    if instrumented is not None:
        instrumented._monitor = staticmethod(drain_monitor)
    runner.main()


def _quiet_inherited_logs() -> None:
    """Drop log lines every forked test would send the job, though none concerns it.

    - avocado's deprecation notices for its own utilities (avocado.utils.process and
      six more, imported by avocado itself in the server): 7 lines per test, queued at
      the server's import and flushed by every test it forks.
    - asyncio's "Using selector" debug line for each event loop avocado makes in a test.

    Each line is a message the job process writes to the test's debug.log, and in the
    lab (9p, Python under TCG) about 10 ms of the job's CPU: 9 of a test's ~30 lines.
    """
    from avocado.utils.deprecation import log_deprecation

    log_deprecation.flush()  # before the test installs its handlers: goes nowhere
    logging.getLogger("asyncio").setLevel(logging.INFO)


def drain_monitor(queue: Any) -> Iterator[dict[str, Any]]:
    """What the instrumented runner relays from its test, draining the queue each poll.

    avocado's own monitor takes one message per poll. At its 10 ms poll that is
    quick, but at POLL_INTERVAL a test's ~35 log lines took 7 s to reach the job:
    in the 7.3 lab a gmem test whose body took 2.6 s ended 4 s after its PASS line.
    This one relays everything queued at each poll, and posts "running" only when
    nothing came. It stops after the "finished" message, like avocado's.
    """
    from avocado.core.utils import messages

    while True:
        time.sleep(POLL_INTERVAL)
        if queue.empty():
            yield messages.RunningMessage.get()
            continue
        while not queue.empty():
            message = queue.get()
            if message.get("type") != "early_state":
                yield message
            if message.get("status") == "finished":
                return


@dataclass
class ForkHandle:
    """One forked runner, and a future set when it has exited."""

    process: Any  # multiprocessing's forkserver Process
    exited: asyncio.Future[int | None] = field(init=False)

    def __post_init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.exited = loop.create_future()
        # The forkserver writes the exit status to the sentinel when the child exits.
        loop.add_reader(self.process.sentinel, self._on_sentinel, loop)

    def _on_sentinel(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.process.sentinel)
        self.process.join(0)
        if not self.exited.done():
            self.exited.set_result(self.process.exitcode)

    # The process spawner's handle attribute other avocado code reads.
    @property
    def wait_task(self) -> asyncio.Future[int | None]:
        return self.exited


class ForkSpawner(ProcessSpawner):  # type: ignore[misc]
    """avocado's process spawner, with tasks forked from a pre-imported server."""

    description = "Forks each task from a server that imported avocado and cvmlab once"

    _starting: asyncio.Lock | None = None

    def __init__(self, config: Any = None, job: Any = None) -> None:
        super().__init__(config, job)
        # avocado instantiates every spawner plugin; only the chosen one starts work.
        if self.config.get("run.spawner") == NAME:
            self._prime()

    @classmethod
    def _prime(cls, references: Sequence[str] = ()) -> None:
        """Start the server now, and tell avocado where the forked kinds' runners are.

        The server imports PRELOAD while avocado sets the suite up (tens of seconds in
        the lab). avocado would otherwise ask each kind's runner executable for its
        capabilities, a Python start per kind (14 s in the lab); the command registered
        instead is the `python -m <module>` form avocado itself falls back to.
        The server preloads what the job's `references` import (`job_preload`).
        """
        start_server(job_preload(references))
        for kind in FORKED_KINDS:
            module = cls._runner_module(kind)
            if module is not None:
                RUNNERS_REGISTRY_STANDALONE_EXECUTABLE.setdefault(
                    kind, [sys.executable, "-m", module]
                )

    @staticmethod
    def _runner_module(kind: str) -> str | None:
        module = Runnable.pick_runner_module_from_entry_point_kind(kind)
        return module if isinstance(module, str) else None

    async def spawn_task(self, runtime_task: Any) -> bool:
        task = runtime_task.task
        module = self._runner_module(task.runnable.kind)
        if module is None:
            return bool(await super().spawn_task(runtime_task))
        self.create_task_output_dir(runtime_task)
        start_server()
        argv = [f"avocado-runner-{task.runnable.kind}", "task-run", *task.get_command_args()]
        process = CONTEXT.Process(target=run_runner, args=(module, argv), daemon=False)
        # start() forks through the server's socket: quick, but blocking; the first one
        # also starts the server and waits for PRELOAD (seconds under TCG). One at a
        # time: multiprocessing's bookkeeping of children is not thread-safe.
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            await asyncio.get_running_loop().run_in_executor(None, process.start)
        runtime_task.spawner_handle = ForkHandle(process)
        return True

    @staticmethod
    def is_task_alive(runtime_task: Any) -> bool:
        handle = runtime_task.spawner_handle
        if handle is None:
            return False
        if isinstance(handle, ForkHandle):
            return not handle.exited.done()
        return bool(ProcessSpawner.is_task_alive(runtime_task))

    @staticmethod
    async def wait_task(runtime_task: Any) -> None:
        await runtime_task.spawner_handle.wait_task

    async def terminate_task(self, runtime_task: Any) -> bool:
        handle = runtime_task.spawner_handle
        if not isinstance(handle, ForkHandle):
            return bool(await super().terminate_task(runtime_task))
        if handle.exited.done():
            return True
        handle.process.terminate()
        soft = self.config.get("runner.task.interval.from_soft_to_hard_termination")
        try:
            await asyncio.wait_for(asyncio.shield(handle.exited), soft)
        except asyncio.TimeoutError:
            handle.process.kill()
            hard = self.config.get("runner.task.interval.from_hard_termination_to_verification")
            try:
                await asyncio.wait_for(asyncio.shield(handle.exited), hard)
            except asyncio.TimeoutError:
                return False
        return True


class EarlyStart(CLI):  # type: ignore[misc]
    """Starts the fork server as soon as avocado has parsed a `run --spawner cvmlab-fork`.

    avocado creates its spawner only when the job runs its suite, after resolving
    the references and setting the job up: about 20 s in the lab, in which the
    server's imports (about as long again, on the lab's other vCPU) could already
    have run. A CLI plugin runs right after parsing (avocado.core.app).
    """

    name = "cvmlab-fork-early-start"
    description = "Starts the cvmlab-fork server before the suite is resolved"

    def configure(self, parser: Any) -> None:
        """No options of its own: `--spawner` says whether to start."""

    def run(self, config: Any) -> None:
        if config.get("subcommand") == "run" and config.get("run.spawner") == NAME:
            ForkSpawner._prime(config.get("resolver.references") or ())
