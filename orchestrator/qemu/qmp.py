"""A synchronous QMP session over qemu.qmp's asyncio `QMPClient`.

Tests, scenarios and scripts are synchronous; qemu.qmp is asyncio. The session
runs its own event loop in a private thread and hands each call over with
`run_coroutine_threadsafe`, so callers never see asyncio and avocado's own loop
is never touched.

Everything that crosses the wire is recorded: every command, reply, event and the
greeting goes to `qmp.jsonl` (one JSON object per line, flushed per line) with a
`now()` timestamp, and to the Timeline as source "qmp" when one is given. Events
are also kept in memory in arrival order with a sequence number, so a caller
takes a `mark()` *before* sending a command and then waits for the event with
`after=mark`: an event that arrives between the command and the wait is never
missed.

How a session meets QEMU: `connect_socket()` takes our end of a connected socket
pair whose other end QEMU inherited (`-chardev socket,fd=N`), so there is nothing
to wait for: QEMU's greeting arrives on it once its monitor is up, and an exit
before that is an EOF at once. This is how the launcher connects. `connect()` to
a socket path is for a QEMU someone else started: connecting before QEMU has
created its socket fails, so it waits for the path to appear while checking that
QEMU is alive.

qemu.qmp 0.0.6 specifics (see research/python-ecosystem.md §2): after `quit`,
`disconnect()` re-raises the reader's EOFError, which is the normal end of a
session, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
import threading
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Message, QMPClient, Runstate
from qemu.qmp.error import QMPError

from orchestrator.errors import LaunchError, QmpError
from orchestrator.timeline import JsonlWriter, Timeline, now

T = TypeVar("T")

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0

# Waiting for QEMU to create its socket: first poll after 2 ms, growing to 50 ms.
# QEMU creates it within a few hundred ms; the cap bounds the overshoot.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event, numbered in arrival order (`seq` starts at 0)."""

    seq: int
    t: float  # now() when it was read
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    qemu_timestamp: float | None = None  # QEMU's own wall-clock stamp


class _RecordingClient(QMPClient):
    """QMPClient that reports every message it sends and receives.

    `_cb_outbound`/`_cb_inbound` are qemu.qmp's documented hooks for subclasses.
    Events are routed only to listeners registered explicitly: the default
    all-events queue (`self.events`) would otherwise grow without bound, since the
    session keeps its own ordered record.
    """

    def __init__(self, name: str, on_message: Callable[[str, Message], None]) -> None:
        super().__init__(name)
        self._on_message_cb = on_message

    def _cb_outbound(self, msg: Message) -> Message:
        self._on_message_cb("send", msg)
        return super()._cb_outbound(msg)

    def _cb_inbound(self, msg: Message) -> Message:
        self._on_message_cb("recv", msg)
        return super()._cb_inbound(msg)

    async def _event_dispatch(self, msg: Message) -> None:
        for listener in self._listeners:
            if listener is not self.events:
                await listener.put(msg)


def _plain(msg: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in msg.items()}


class QmpSession:
    """One QMP connection to one QEMU, used from ordinary synchronous code.

    Create it, `connect()` it, `close()` it (or use it as a context manager). The
    session owns one event-loop thread between connect and close; close leaves no
    thread, loop or socket behind.
    """

    def __init__(
        self,
        log_path: Path | None = None,
        timeline: Timeline | None = None,
        name: str = "qmp",
    ) -> None:
        self.name = name
        self._timeline = timeline
        self._log_path = log_path
        self._log: JsonlWriter | None = None  # opened by connect()
        self._cond = threading.Condition()
        self._events: list[QmpEvent] = []
        self._subscribers: list[tuple[str | None, Callable[[QmpEvent], None]]] = []
        self._disconnected: str | None = None  # why the connection ended, once it has
        self._client: _RecordingClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Held so the watcher task is not garbage-collected while it runs.
        self._watch_task: asyncio.Task[None] | None = None
        self.greeting: dict[str, Any] | None = None

    # --- recording -------------------------------------------------------------

    def _record(self, direction: str, msg: Message) -> None:
        """Called on the loop thread for every message, before qemu.qmp routes it."""
        t = now()
        body = _plain(msg)
        if direction == "send":
            kind = "command"
        elif "event" in body:
            kind = "event"
        elif "QMP" in body:
            kind = "greeting"
            self.greeting = body
        else:
            kind = "reply"
        record: dict[str, Any] = {"t": round(t, 6), "dir": direction, "kind": kind}
        event: QmpEvent | None = None
        if kind == "event":
            stamp = body.get("timestamp")
            qemu_ts = None
            if isinstance(stamp, dict):
                qemu_ts = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
            with self._cond:
                event = QmpEvent(
                    seq=len(self._events),
                    t=t,
                    name=str(body.get("event")),
                    data=dict(body.get("data") or {}),
                    qemu_timestamp=qemu_ts,
                )
                self._events.append(event)
                self._cond.notify_all()
            record["seq"] = event.seq
        record["msg"] = body
        if self._log is not None:
            self._log.write(record)
        if self._timeline is not None:
            self._timeline.record("qmp", kind, t=t, dir=direction, msg=body)
        if event is not None:
            for name, callback in list(self._subscribers):
                if name is None or name == event.name:
                    try:
                        callback(event)
                    except Exception:
                        # A failing subscriber must not take the QMP reader down.
                        _log.exception("QMP event subscriber failed on %s", event.name)

    def record_note(self, kind: str, **data: Any) -> None:
        """Add a line of our own to qmp.jsonl (e.g. which shutdown rung was used)."""
        t = now()
        if self._log is not None:
            self._log.write({"t": round(t, 6), "dir": "note", "kind": kind, **data})

    # --- loop thread -------------------------------------------------------------

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=f"cvmlab-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_rest(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `coro` on the session's loop and wait for it (cancelling it on timeout)."""
        if self._loop is None:
            coro.close()
            raise QmpError("the QMP session is not connected", "connect() it first")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    # --- connect -----------------------------------------------------------------

    def connect(
        self,
        path: str | Path,
        deadline: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """Connect to QEMU's QMP socket at `path`, retrying until `deadline` (a now() value).

        Waits for the socket to appear (QEMU creates it while parsing its options),
        then connects and negotiates. Fails fast with LaunchError when `alive()`
        says QEMU died, and with QmpError at the deadline.
        """
        if self._client is not None:
            raise QmpError("the QMP session is already connected", "use a new QmpSession")
        path = str(path)
        if self._log_path is not None and self._log is None:
            self._log = JsonlWriter(self._log_path)
        self._wait_for_socket(path, deadline, alive)
        self._start_loop()
        client: _RecordingClient | None = None
        last_error: BaseException | None = None
        while (remaining := deadline - now()) > 0:
            # A fresh client per attempt: a failed attempt leaves nothing to reset.
            attempt = _RecordingClient(self.name, self._record)
            try:
                self._call(asyncio.wait_for(attempt.connect(path), remaining), remaining + 1)
                client = attempt
                break
            except (ConnectError, asyncio.TimeoutError, OSError) as err:
                last_error = err
                if not alive():
                    self._abandon()
                    raise LaunchError(
                        "QEMU exited before its QMP monitor answered",
                        "see qemu.stderr for QEMU's reason",
                    ) from err
                # The socket exists but QEMU is not answering yet: try again shortly.
                self._pause(deadline, alive)
        if client is None or client.runstate != Runstate.RUNNING:
            self._abandon()
            raise QmpError(
                f"QMP did not answer on {path} in time",
                "QEMU is alive but its monitor is stuck; see qemu.stderr",
                detail=repr(last_error) if last_error else "",
            )
        self._client = client
        self._watch_task = self._call(self._start_watch(client), 5)

    def connect_socket(
        self,
        sock: socket.socket,
        deadline: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """Run the session over `sock`, already connected to QEMU's monitor (a socket pair).

        Waits for QEMU's greeting until `deadline` (a now() value); no polling: the
        greeting, or the EOF of a QEMU that exited, ends the wait. The session owns
        `sock` from here on (closed by close(), or here on failure).
        """
        if self._client is not None:
            sock.close()
            raise QmpError("the QMP session is already connected", "use a new QmpSession")
        if self._log_path is not None and self._log is None:
            self._log = JsonlWriter(self._log_path)
        self._start_loop()
        client = _RecordingClient(self.name, self._record)
        remaining = max(0.0, deadline - now())
        # qemu.qmp logs a failed handshake at ERROR; ours says it once, with QEMU's stderr.
        client_log = logging.getLogger(f"qemu.qmp.protocol.{self.name}")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            self._call(asyncio.wait_for(client.connect(sock), remaining), remaining + 1)
        except (ConnectError, asyncio.TimeoutError, FutureTimeout, OSError, EOFError) as err:
            self._abandon()
            sock.close()
            timed_out = isinstance(err, asyncio.TimeoutError | FutureTimeout)
            if not timed_out or not alive():
                # The monitor's end closed before the greeting: QEMU is exiting.
                raise LaunchError(
                    "QEMU exited before its QMP monitor answered",
                    "see qemu.stderr for QEMU's reason",
                ) from err
            raise QmpError(
                "QEMU's QMP monitor did not greet in time",
                "QEMU is alive but stuck before its main loop; see qemu.stderr",
                detail=repr(err),
            ) from err
        finally:
            client_log.setLevel(level)
        self._client = client
        self._watch_task = self._call(self._start_watch(client), 5)

    def _wait_for_socket(self, path: str, deadline: float, alive: Callable[[], bool]) -> None:
        pause = _POLL_FIRST
        while True:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    return
            except FileNotFoundError:
                pass
            if not alive():
                raise LaunchError(
                    "QEMU exited before it created its QMP socket",
                    "see qemu.stderr for QEMU's reason",
                )
            remaining = deadline - now()
            if remaining <= 0:
                raise QmpError(
                    f"QEMU did not create its QMP socket {path} in time",
                    "QEMU is alive but stuck before its main loop; see qemu.stderr",
                )
            # A bounded, growing poll: no inotify in the standard library, and
            # QEMU creates the socket within a few hundred ms.
            threading.Event().wait(min(pause, remaining))
            pause = min(pause * 2, _POLL_MAX)

    def _pause(self, deadline: float, alive: Callable[[], bool]) -> None:
        """A short pause between connect attempts, cut short when QEMU dies."""
        end = min(deadline, now() + _POLL_MAX)
        while now() < end and alive():
            threading.Event().wait(min(_POLL_FIRST * 5, max(0.0, end - now())))

    async def _start_watch(self, client: _RecordingClient) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._watch(client))

    async def _watch(self, client: _RecordingClient) -> None:
        """Notice the end of the connection (QEMU quit or died) and wake waiters."""
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        self._mark_disconnected("QMP connection closed")

    def _mark_disconnected(self, reason: str) -> None:
        with self._cond:
            if self._disconnected is None:
                self._disconnected = reason
            self._cond.notify_all()

    def _abandon(self) -> None:
        """Undo a failed connect: no loop thread left behind."""
        self._client = None
        self._stop_loop()
        self._mark_disconnected("never connected")

    # --- commands ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._client is not None and self._disconnected is None

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one QMP command and return its `return` value.

        QEMU's error replies become QmpError with `error_class` and `desc`; a lost
        connection or a missing reply within `timeout` also becomes QmpError.
        """
        client = self._client
        if client is None or not self.connected:
            raise QmpError(
                f"cannot run QMP {command}: the session is not connected",
                "QEMU has exited or was never started",
                detail=self._disconnected or "",
            )
        try:
            return self._call(client.execute(command, dict(arguments) if arguments else None),
                              timeout)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from None
        except ExecInterruptedError as err:
            raise QmpError(
                f"QMP connection closed while {command} was running",
                "QEMU exited; see qemu.stderr",
            ) from err
        except FutureTimeout:
            raise QmpError(
                f"QMP {command} got no reply within {timeout:g} s",
                "QEMU is busy or stuck; see qemu.stderr and qmp.jsonl",
            ) from None
        except QMPError as err:
            raise QmpError(f"QMP {command} failed: {err}", "see qmp.jsonl") from err

    def human_monitor(self, command_line: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Run an HMP command through QMP and return its text output."""
        result = self.execute("human-monitor-command", {"command-line": command_line}, timeout)
        return str(result)

    def ssh_forward_port(self, guest_port: int = 22) -> int | None:
        """The host port QEMU's user-net picked for `hostfwd=tcp:127.0.0.1:0-:guest_port`.

        QMP has no command for it; HMP `info usernet` lists
        `TCP[HOST_FORWARD]  <fd>  127.0.0.1 <port>  10.0.2.15  22 ...`.
        """
        text = self.human_monitor("info usernet")
        regex = re.compile(
            rf"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+{guest_port}\b"
        )
        match = regex.search(text)
        return int(match.group(1)) if match else None

    # --- events --------------------------------------------------------------------

    def mark(self) -> int:
        """The sequence number the next event will get. Take it before sending a command."""
        with self._cond:
            return len(self._events)

    def events(self, name: str | None = None) -> list[QmpEvent]:
        """Every event so far (optionally only those called `name`), in arrival order."""
        with self._cond:
            return [e for e in self._events if name is None or e.name == name]

    def subscribe(self, name: str | None, callback: Callable[[QmpEvent], None]) -> None:
        """Call `callback(event)` for each future event called `name` (None: all).

        Callbacks run on the session's loop thread: keep them short and never call
        back into this session from them.
        """
        self._subscribers.append((name, callback))

    def wait_event(
        self,
        name: str,
        predicate: Callable[[QmpEvent], bool] | None = None,
        after: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> QmpEvent:
        """The first event `name` with seq >= `after` (and `predicate(event)` true).

        Returns at once if it already arrived. Raises QmpError when the connection
        ends without it, or at `timeout`.
        """
        deadline = now() + timeout
        with self._cond:
            while True:
                for event in self._events[after:]:
                    if event.name == name and (predicate is None or predicate(event)):
                        return event
                if self._disconnected is not None:
                    raise QmpError(
                        f"QMP event {name} did not come before the connection closed",
                        "QEMU exited; see qmp.jsonl and qemu.stderr",
                    )
                remaining = deadline - now()
                if remaining <= 0:
                    raise QmpError(
                        f"QMP event {name} did not come within {timeout:g} s",
                        "see qmp.jsonl for the events that did come",
                    )
                self._cond.wait(remaining)

    # --- close ---------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect (tolerating QEMU having quit or died) and stop the loop thread."""
        client = self._client
        if client is not None and self._loop is not None:
            # disconnect() re-raises whatever ended the reader: EOFError when QEMU
            # closed the socket (quit, or it exited), OSError on a reset. The
            # session is over either way; the reason is in qmp.jsonl/qemu.stderr.
            try:
                self._call(client.disconnect(), 10)
            except (EOFError, OSError, QMPError, FutureTimeout):
                pass
            except Exception:
                _log.debug("QMP disconnect ended with an unexpected error", exc_info=True)
        self._client = None
        self._stop_loop()
        self._mark_disconnected("closed")
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QmpCommandError(QmpError):
    """QEMU answered a command with an error: `error_class` and `desc` are QEMU's."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(
            f"QMP {command} failed: {error_class}: {desc}",
            "check the command's arguments against QEMU's QMP reference",
        )
