"""Commands and files into the guest over SSH (paramiko), recorded on the Timeline.

`GuestShell` connects to the guest's dropbear through QEMU's user-net forward
(127.0.0.1:<port>), retrying with tenacity while the guest boots. Behind the
forward the TCP connect always succeeds (slirp accepts it), so a guest that is not
listening yet shows up as a failed banner read or EOF: those are retried;
authentication failures and a wrong host key are not (our images have fixed keys,
so retrying them only hides the problem).

A running command can be interrupted from another thread (`interrupt()`): the
launcher does that the moment it sees the guest crash, so the command raises
GuestCrashed with the console evidence at once instead of running into its timeout.
"""

from __future__ import annotations

import base64
import logging
import select
import shlex
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from tenacity import (
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)
from tenacity import Retrying as _Retrying

from orchestrator.errors import GuestError
from orchestrator.timeline import Timeline, now

# Errors that mean "the guest's sshd is not up yet" behind slirp's forward.
RETRYABLE = (paramiko.SSHException, EOFError, OSError)
# ... except these, which are subclasses of SSHException but will not go away.
NOT_RETRYABLE = (paramiko.AuthenticationException, paramiko.BadHostKeyException)

# How much of a command's output goes into the Timeline record (the full output
# is returned to the caller).
TIMELINE_OUTPUT_LIMIT = 4096

_READ_CHUNK = 65536
# Opening a session channel is retried this often when the server drops it unused.
CHANNEL_ATTEMPTS = 3
# How long an upload waits for the guest's sftp-server to exit after EOF.
SFTP_EXIT_TIMEOUT = 10.0
# How long a timed-out command may take to die after SIGKILL.
STOP_TIMEOUT = 5.0

# paramiko logs every failed banner read with a traceback at ERROR. While the guest
# boots those failures are expected (and recorded on the Timeline as retries), so
# connection attempts log to a channel that goes nowhere; an established transport
# is switched to a normal channel.
_ATTEMPT_LOG = "orchestrator.guest.ssh.attempt"
_TRANSPORT_LOG = "orchestrator.guest.ssh.transport"
_attempt_logger = logging.getLogger(_ATTEMPT_LOG)
_attempt_logger.addHandler(logging.NullHandler())
_attempt_logger.propagate = False


@dataclass(frozen=True)
class CommandResult:
    """What one guest command did. `argv` is set when it was given as a list."""

    cmd: str
    argv: tuple[str, ...] | None
    exit_status: int
    stdout: str
    stderr: str
    started: float  # now() when it was sent
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def parse_public_key(text: str) -> paramiko.PKey:
    """An OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`) as a paramiko key."""
    parts = text.split()
    if len(parts) < 2:
        raise GuestError(
            f"host key {text!r} is not an OpenSSH public key line",
            "give it as '<type> <base64> [comment]', as in the image manifest",
        )
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (ValueError, paramiko.SSHException) as err:
        raise GuestError(
            f"host key of type {parts[0]} could not be read: {err}",
            "rebuild the image so its manifest records the guest's host key",
        ) from None


class _PinnedHostKey(paramiko.MissingHostKeyPolicy):
    """Accept exactly one host key; with none pinned, accept any and record it."""

    def __init__(self, pinned: paramiko.PKey | None, timeline: Timeline | None) -> None:
        self._pinned = pinned
        self._timeline = timeline

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        if self._pinned is None:
            if self._timeline is not None:
                self._timeline.record(
                    "ssh", "host-key-unpinned", host=hostname, key=key.get_name(),
                    fingerprint=key.fingerprint,
                )  # fmt: skip
            return
        if key != self._pinned:
            raise paramiko.BadHostKeyException(hostname, key, self._pinned)


class GuestShell:
    """An SSH session to a guest: run commands, upload files.

    Create it, `open()` it (retries while the guest boots), `close()` it. The
    launcher's `Machine.ssh()` does all three and interrupts it on a crash.
    """

    def __init__(
        self,
        port: int,
        user: str,
        key: Path,
        *,
        host: str = "127.0.0.1",
        host_key: str | None = None,
        timeline: Timeline | None = None,
        crash_error: Callable[[], BaseException | None] | None = None,
    ) -> None:
        """`crash_error()` returns the exception to raise when the guest is gone
        (crashed or QEMU exited), or None while it is fine."""
        self.host = host
        self.port = port
        self.user = user
        self.key_path = Path(key)
        self._pinned = parse_public_key(host_key) if host_key else None
        self._timeline = timeline
        self._crash_error = crash_error
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        # One command (or upload) at a time per shell: see _start_channel.
        self._command_lock = threading.Lock()
        # Set by interrupt(): builds the exception to raise (at raise time, so it
        # carries the freshest console evidence).
        self._interrupted: Callable[[], BaseException] | None = None
        self.connect_time: float | None = None  # seconds open() took
        self.attempts = 0

    # --- connection ------------------------------------------------------------

    def _record(self, kind: str, **data: Any) -> None:
        if self._timeline is not None:
            self._timeline.record("ssh", kind, **data)

    def _check_interrupted(self) -> None:
        if self._interrupted is not None:
            raise self._interrupted()

    def _check_guest(self) -> None:
        """Raise the guest's crash (or exit) instead of trying to reach a dead guest."""
        self._check_interrupted()
        if self._crash_error is not None:
            error = self._crash_error()
            if error is not None:
                raise error

    def _try_connect(self, pkey: paramiko.PKey, attempt_timeout: float) -> paramiko.SSHClient:
        self._check_guest()
        self.attempts += 1
        client = paramiko.SSHClient()
        client.set_log_channel(_ATTEMPT_LOG)
        client.set_missing_host_key_policy(_PinnedHostKey(self._pinned, self._timeline))
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=attempt_timeout)
            # Nagle off (paramiko leaves it on): the handshake's back-to-back small writes
            # otherwise wait for delayed ACKs, about 50 ms per connection (measured
            # against a TCG guest: connected after 0.17 s -> 0.11 s).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=pkey,
                look_for_keys=False,
                allow_agent=False,
                timeout=attempt_timeout,
                banner_timeout=attempt_timeout,
                auth_timeout=attempt_timeout,
                channel_timeout=attempt_timeout,
                sock=sock,
            )
        except BaseException:
            client.close()
            if sock is not None:
                sock.close()
            raise
        transport = client.get_transport()
        if transport is not None:
            transport.set_log_channel(_TRANSPORT_LOG)
        return client

    def _record_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        self._record("connect-retry", attempt=state.attempt_number, error=repr(error))

    def open(self, timeout: float = 60.0) -> GuestShell:
        """Connect, retrying while the guest's sshd is not up, for at most `timeout` s."""
        try:
            pkey = paramiko.PKey.from_path(self.key_path)
        except (OSError, paramiko.SSHException) as err:
            raise GuestError(
                f"cannot read the SSH key {self.key_path}: {err}",
                "rebuild the image (cvmlab image) so its key exists and is readable",
            ) from None
        started = now()
        self._record("connect", host=self.host, port=self.port, user=self.user)
        # Each attempt may block reading the banner; cap it so retries stay frequent
        # (dropbear answers within a second under TCG once it is up).
        attempt_timeout = min(10.0, max(1.0, timeout))
        retrying = _Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_exponential(multiplier=0.05, min=0.05, max=1.0),
            retry=retry_if_exception_type(RETRYABLE) & retry_if_not_exception_type(NOT_RETRYABLE),
            before_sleep=self._record_retry,
            reraise=True,
        )
        try:
            client = retrying(self._try_connect, pkey, attempt_timeout)
        except paramiko.AuthenticationException as err:
            self._record("connect-failed", error=repr(err))
            raise GuestError(
                f"SSH login as {self.user} on port {self.port} was refused: {err}",
                "the key does not match the image; rebuild it with cvmlab image",
            ) from None
        except paramiko.BadHostKeyException as err:
            self._record("connect-failed", error=repr(err))
            raise GuestError(
                f"the guest's SSH host key does not match the image manifest: {err}",
                "this is not the guest the image describes; rebuild the image",
            ) from None
        except RETRYABLE as err:
            self._check_guest()
            self._record("connect-failed", error=repr(err), attempts=self.attempts)
            raise GuestError(
                f"SSH to 127.0.0.1:{self.port} did not come up within {timeout:g} s "
                f"({self.attempts} attempts; last: {err})",
                "the guest booted without sshd or is very slow; see serial.log",
            ) from None
        with self._lock:
            interrupted = self._interrupted
            self._client = client
        if interrupted is not None:
            client.close()
            raise interrupted()
        self.connect_time = now() - started
        self._record("connected", seconds=round(self.connect_time, 6), attempts=self.attempts)
        return self

    def _transport(self) -> paramiko.Transport:
        self._check_guest()
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is None or not transport.is_active():
            raise GuestError("the SSH session is closed", "open a new shell (Machine.ssh())")
        return transport

    def interrupt(self, error: Callable[[], BaseException]) -> None:
        """Abort whatever this shell is doing; it raises `error()` (callable from any thread)."""
        with self._lock:
            if self._interrupted is None:
                self._interrupted = error
            client = self._client
        if client is not None:
            # Closing the transport wakes a blocked command at once (its channel
            # is unlinked and its buffers closed).
            client.close()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
            self._record("closed", port=self.port)

    def __enter__(self) -> GuestShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands ------------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        timeout: float = 60.0,
        check: bool = True,
        input: str | bytes | None = None,
    ) -> CommandResult:
        """Run `cmd` in the guest's shell and wait for it (at most `timeout` s).

        A list is quoted with shlex.join, so its items reach the program verbatim.
        `check=True` raises GuestError on a non-zero exit status. A guest crash
        while it runs raises GuestCrashed at once. At the timeout the command's
        process is SIGKILLed (processes it started may live on in the guest).
        Commands on one shell run one at a time; open another shell
        (`Machine.ssh()`) to run commands in parallel.
        """
        argv = None if isinstance(cmd, str) else tuple(cmd)
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        started = now()
        # The input goes on the record too (as text), so a reproducer can replay it.
        stdin = input.decode("utf-8", "replace") if isinstance(input, bytes) else input
        self._record("command", t=started, cmd=command, input=stdin)
        try:
            with self._command_lock:
                status, out, err = self._exec(command, timeout, input)
        except BaseException as exc:
            self._record("command-failed", cmd=command, error=repr(exc),
                         seconds=round(now() - started, 6))
            if self._interrupted is not None:
                raise self._interrupted() from None
            raise
        result = CommandResult(
            cmd=command,
            argv=argv,
            exit_status=status,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            started=started,
            duration=now() - started,
        )
        self._record(
            "result",
            cmd=command,
            exit_status=status,
            seconds=round(result.duration, 6),
            stdout=result.stdout[:TIMELINE_OUTPUT_LIMIT],
            stderr=result.stderr[:TIMELINE_OUTPUT_LIMIT],
        )
        if check and status != 0:
            said = result.stderr.strip().splitlines()
            raise GuestError(
                f"guest command failed with status {status}: {command}"
                + (f" (stderr: {said[-1]})" if said else ""),
                "see its whole stderr below and timeline.jsonl",
                detail=result.stderr.strip(),
            )
        return result

    def _exec(
        self, command: str, timeout: float, input: str | bytes | None
    ) -> tuple[int, bytes, bytes]:
        deadline = now() + timeout
        channel = self._start_channel(lambda chan: chan.exec_command(command), timeout)
        try:
            if input is not None:
                channel.sendall(input.encode() if isinstance(input, str) else input)
            # EOF on stdin, so commands that read it (cat, sh) finish.
            channel.shutdown_write()
            out, err = bytearray(), bytearray()
            wakeup = channel.fileno()  # a pipe set when data (or the end) arrives
            while True:
                while channel.recv_ready():
                    out += channel.recv(_READ_CHUNK)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(_READ_CHUNK)
                self._check_interrupted()
                if channel.eof_received or channel.closed:
                    # No more output; the exit status may trail the EOF slightly.
                    if not channel.status_event.wait(max(0.0, deadline - now())):
                        self._stop_remote(channel)
                        raise self._timeout(command, timeout)
                    while channel.recv_ready():
                        out += channel.recv(_READ_CHUNK)
                    while channel.recv_stderr_ready():
                        err += channel.recv_stderr(_READ_CHUNK)
                    break
                remaining = deadline - now()
                if remaining <= 0:
                    self._stop_remote(channel)
                    raise self._timeout(command, timeout)
                select.select([wakeup], [], [], remaining)
            self._check_interrupted()
            status = channel.recv_exit_status()
            if status == -1:
                # The channel closed without an exit status: the connection dropped.
                self._check_guest()
                raise GuestError(
                    f"the SSH connection dropped while running: {command}",
                    "the guest rebooted, lost its network, or QEMU exited; see serial.log",
                )
            return status, bytes(out), bytes(err)
        finally:
            channel.close()

    def _start_channel(
        self, request: Callable[[paramiko.Channel], None], timeout: float
    ) -> paramiko.Channel:
        """Open a session channel and send its request (exec or subsystem).

        Dropbear 2022.83 (Debian 12) closes a freshly opened session channel when
        the SIGCHLD of an earlier channel's process is handled in the same loop
        turn, and then aborts the whole connection on an assertion if a request
        reaches that closed channel (mkj/dropbear#173, #321; fixed by #326, not in
        Debian 12). Channels here are opened one after another and each waits for
        its process's exit status before the next opens (SFTP included), which
        keeps that SIGCHLD from racing a new channel. Should the server still drop
        a channel unused (closed, no exit status: nothing ran), it is opened again.
        """
        for attempt in range(1, CHANNEL_ATTEMPTS + 1):
            transport = self._transport()
            channel: paramiko.Channel | None = None
            try:
                channel = transport.open_session(timeout=timeout)
                channel.settimeout(timeout)
                request(channel)
                return channel
            except (paramiko.SSHException, EOFError, OSError) as err:
                if channel is not None:
                    closed_unused = channel.closed and channel.exit_status == -1
                    channel.close()
                else:
                    closed_unused = True
                self._check_interrupted()
                if not (closed_unused and transport.is_active()) or attempt == CHANNEL_ATTEMPTS:
                    # A guest that crashed or exited meanwhile says so; else one clear error.
                    self._check_guest()
                    raise GuestError(
                        f"could not open an SSH channel to the guest ({err!r})",
                        "the guest's SSH server went away: see serial.log",
                    ) from err
                self._record("channel-retry", attempt=attempt, error=repr(err))
        raise AssertionError("unreachable")

    def _stop_remote(self, channel: paramiko.Channel) -> bool:
        """SIGKILL a command that overran its timeout and wait for its exit status.

        Uses the SSH "signal" channel request (RFC 4254 section 6.9), which dropbear
        delivers to the command's process. Waiting for the exit status keeps the
        process's exit from racing the next channel (see _start_channel). paramiko
        has no call for this request, so it is sent as a raw message.
        """
        if channel.closed or channel.status_event.is_set():
            return True
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        message.add_int(channel.remote_chanid)
        message.add_string("signal")
        message.add_boolean(False)
        message.add_string("KILL")
        transport: Any = channel.get_transport()  # the stubs omit the private sender
        try:
            transport._send_user_message(message)
        except (OSError, EOFError, paramiko.SSHException):
            return False
        return channel.status_event.wait(STOP_TIMEOUT)

    def _timeout(self, command: str, timeout: float) -> GuestError:
        self._check_guest()
        return GuestError(
            f"guest command did not finish within {timeout:g} s: {command}",
            "raise the timeout or find where the guest is stuck (serial.log)",
        )

    # --- files ---------------------------------------------------------------------

    def _sftp_put(self, local: Path, remote: str, mode: int) -> None:
        channel = self._start_channel(lambda chan: chan.invoke_subsystem("sftp"), 60.0)
        sftp = paramiko.SFTPClient(channel)
        try:
            sftp.put(str(local), remote)
            sftp.chmod(remote, mode)
            # Let sftp-server see EOF and exit before the next channel opens
            # (see _start_channel: dropbear's race with exiting children).
            channel.shutdown_write()
            channel.status_event.wait(SFTP_EXIT_TIMEOUT)
        finally:
            sftp.close()

    def upload(self, local: Path | str, remote: str, mode: int = 0o644) -> None:
        """Copy a host file into the guest (SFTP) and set its permission bits."""
        started = now()
        local = Path(local)
        try:
            with self._command_lock:
                self._sftp_put(local, remote, mode)
        except (OSError, paramiko.SSHException, EOFError) as err:
            self._check_guest()
            raise GuestError(
                f"upload of {local} to the guest's {remote} failed: {err}",
                "check the local file and that the guest path's directory exists",
            ) from None
        self._record("upload", local=str(local), remote=remote, mode=oct(mode),
                     bytes=local.stat().st_size, seconds=round(now() - started, 6))
