"""What this QEMU has: version, accelerators, QOM types and their property names.

`introspect_qemu` starts QEMU once with `-machine none`, asks over QMP (on a
socketpair passed as an fd: no socket path, no connect race), quits it and
reaps it. The answer is cached on disk, keyed by the realpath, size and mtime
of every file in the command, because every test probes at its start and a
warm lookup costs a few stat calls instead of a QEMU start.

The command is an argv prefix, so a QEMU unpacked into a private prefix can be
run through its own dynamic loader:
`[PREFIX/.../ld-linux-x86-64.so.2, "--library-path", LIBDIR, PREFIX/usr/bin/qemu-system-x86_64]`.
Its last element is the QEMU binary itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from orchestrator.errors import QemuError
from orchestrator.qemu.spawn import spawn
from orchestrator.qemu.version import QemuVersion

DEFAULT_BINARY = "qemu-system-x86_64"

# The QOM types whose properties cvmlab writes on command lines or sets over QMP.
TYPES_OF_INTEREST = (
    "memory-backend-ram",
    "memory-backend-memfd",
    "memory-backend-file",
    "memory-backend-shm",
    "sev-guest",
    "sev-snp-guest",
    "tdx-guest",
    "virtio-mem-pci",
    "virtio-balloon-pci",
    "virtio-net-pci",
    "pvpanic-pci",
)

# CPU features of `-cpu max` under TCG that the lab tier depends on.
TCG_CPU_FEATURES = ("svm", "npt", "vmx")

# Bump when QemuFacts' JSON changes, so old cache entries are ignored.
CACHE_FORMAT = 2
DEFAULT_TIMEOUT_S = 10.0

FIX_MISSING = (
    "run ci/setup-host.sh (installs QEMU from bookworm-backports), or name another QEMU "
    "with --qemu, the scenario parameter qemu=, or CVMLAB_QEMU"
)

_T = TypeVar("_T")
_CLIENT_NAME = "cvmlab-introspect"


@dataclass(frozen=True)
class QemuFacts:
    """One QEMU binary, as its own QMP describes it."""

    command: tuple[str, ...]  # argv prefix that runs this QEMU (loader first, if any)
    binary: str  # realpath of the QEMU binary (the command's last element)
    version: QemuVersion
    package: str  # distribution suffix of the version, e.g. "Debian 1:10.0.2+ds-2..."
    accelerators: frozenset[str]  # "tcg", "kvm", ... (QOM types implementing "accel")
    machines: frozenset[str]  # machine type names and aliases ("q35", "pc-q35-10.0")
    types: frozenset[str]  # every non-abstract QOM type
    # For each type of TYPES_OF_INTEREST present: property name -> QOM type.
    properties: Mapping[str, Mapping[str, str]] = field(hash=False)
    probe_s: float  # wall time of the QEMU start + QMP exchange that produced this
    from_cache: bool = False
    # The virtualisation features of `-cpu max` under TCG (svm, npt, vmx -> on/off): TCG
    # emulates AMD SVM with nested paging, which is what the kernel-under-test lab needs.
    tcg_max_cpu: Mapping[str, bool] = field(default_factory=dict, hash=False)

    def describe(self) -> str:
        """How error messages name it: "QEMU 10.0.2 (/usr/bin/qemu-system-x86_64)"."""
        return f"QEMU {self.version} ({self.binary})"

    def has_type(self, type_name: str) -> bool:
        return type_name in self.types

    def property_names(self, type_name: str) -> frozenset[str]:
        """The type's property names; empty when the type is absent or was not asked about."""
        return frozenset(self.properties.get(type_name, {}))

    def has_property(self, type_name: str, prop: str) -> bool:
        return prop in self.properties.get(type_name, {})

    def to_json(self) -> dict[str, Any]:
        return {
            "command": list(self.command),
            "binary": self.binary,
            "version": str(self.version),
            "package": self.package,
            "accelerators": sorted(self.accelerators),
            "machines": sorted(self.machines),
            "types": sorted(self.types),
            "properties": {t: dict(sorted(p.items())) for t, p in sorted(self.properties.items())},
            "probe_s": self.probe_s,
            "tcg_max_cpu": dict(sorted(self.tcg_max_cpu.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QemuFacts:
        return cls(
            command=tuple(str(a) for a in data["command"]),
            binary=str(data["binary"]),
            version=QemuVersion.parse(str(data["version"])),
            package=str(data.get("package", "")),
            accelerators=frozenset(data["accelerators"]),
            machines=frozenset(data["machines"]),
            types=frozenset(data["types"]),
            properties={
                str(t): {str(k): str(v) for k, v in props.items()}
                for t, props in data["properties"].items()
            },
            probe_s=float(data["probe_s"]),
            tcg_max_cpu={str(k): bool(v) for k, v in data.get("tcg_max_cpu", {}).items()},
        )


# --- the command ------------------------------------------------------------------


def resolve_command(binary: str | Sequence[str]) -> tuple[str, ...]:
    """The argv prefix with its program resolved on PATH; QemuError if it cannot run."""
    command = (binary,) if isinstance(binary, str) else tuple(binary)
    if not command or not command[0]:
        raise QemuError("no QEMU binary given", FIX_MISSING)
    program = command[0]
    found = shutil.which(program) if os.sep not in program else program
    if found is None or not os.path.exists(found):
        where = "" if os.sep in program else " on PATH"
        raise QemuError(f"QEMU binary {program!r} not found{where}", FIX_MISSING)
    if not os.access(found, os.X_OK) or os.path.isdir(found):
        raise QemuError(f"QEMU binary {found!r} is not executable", FIX_MISSING)
    last = command[-1]
    if len(command) > 1 and os.sep in last and not os.path.isfile(last):
        # Loader form: the QEMU binary the loader should run is missing.
        raise QemuError(f"QEMU binary {last!r} not found", FIX_MISSING)
    return (os.path.abspath(found), *command[1:])


def _qemu_binary(command: tuple[str, ...]) -> str:
    return os.path.realpath(command[-1])


def _cache_key(command: tuple[str, ...]) -> list[Any]:
    """Each argument, and for files (the loader, QEMU) their realpath, size and mtime."""
    parts: list[Any] = [CACHE_FORMAT]
    for arg in command:
        try:
            st = os.stat(arg)
        except OSError:
            parts.append([arg])
            continue
        parts.append([arg, os.path.realpath(arg), st.st_size, st.st_mtime_ns])
    return parts


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cvmlab/qemu-facts` (default `~/.cache/cvmlab/qemu-facts`)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative value (as the image cache does).
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "cvmlab" / "qemu-facts"


def _cache_path(key: list[Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return cache_dir() / f"{digest}.json"


def _read_cache(key: list[Any]) -> QemuFacts | None:
    try:
        entry = json.loads(_cache_path(key).read_text())
        if entry.get("key") != key:
            return None
        return replace(QemuFacts.from_json(entry["facts"]), from_cache=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Missing, unreadable or from another format: probe again and overwrite.
        return None


def _write_cache(key: list[Any], facts: QemuFacts) -> None:
    path = _cache_path(key)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False
        ) as tmp:
            tmp_name = tmp.name
            json.dump({"key": key, "facts": facts.to_json()}, tmp)
        os.replace(tmp_name, path)
    except OSError:
        # The cache is an optimisation: a read-only home only costs a probe per test.
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


# --- the probe ----------------------------------------------------------------------


def _run_coroutine(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion from sync code, also when called inside an event loop."""

    async def main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def _ask(sock: socket.socket) -> dict[str, Any]:
    """The QMP exchange: version, accelerators, machines, types, properties; then quit."""
    from qemu.qmp import QMPClient  # import here: the cache path never needs it

    # qemu.qmp logs a failed connect at ERROR on the client's own logger; our
    # QemuError says it once, with QEMU's stderr. Only this client's logger is muted.
    logging.getLogger(f"qemu.qmp.protocol.{_CLIENT_NAME}").setLevel(logging.CRITICAL)
    client = QMPClient(_CLIENT_NAME)
    await client.connect(sock)
    try:
        answers: dict[str, Any] = {
            "version": await client.execute("query-version"),
            "accels": await client.execute("qom-list-types", {"implements": "accel"}),
            "machines": await client.execute("query-machines"),
            "types": await client.execute("qom-list-types"),
            "properties": {},
        }
        present = {t["name"] for t in answers["types"]}
        for type_name in TYPES_OF_INTEREST:
            if type_name in present:
                answers["properties"][type_name] = await client.execute(
                    "qom-list-properties", {"typename": type_name}
                )
        kvm_state = cast(dict[str, Any], await client.execute("query-kvm"))
        if not kvm_state.get("enabled"):
            # `-machine none` runs under QEMU's default accelerator, TCG: `max` as TCG
            # emulates it (under KVM it would be the host CPU's features instead).
            expansion = cast(
                dict[str, Any],
                await client.execute(
                    "query-cpu-model-expansion", {"type": "full", "model": {"name": "max"}}
                ),
            )
            props = expansion.get("model", {}).get("props", {})
            answers["tcg_max_cpu"] = {k: bool(props[k]) for k in TCG_CPU_FEATURES if k in props}
        await client.execute("quit")
        return answers
    finally:
        # After quit QEMU closes the socket; the reader task's EOFError is expected.
        with contextlib.suppress(Exception):
            await client.disconnect()


def _facts_from_answers(
    command: tuple[str, ...], answers: dict[str, Any], probe_s: float
) -> QemuFacts:
    version = answers["version"]
    accels = {str(t["name"]).removesuffix("-accel") for t in answers["accels"]}
    machines: set[str] = set()
    for machine in answers["machines"]:
        machines.add(str(machine["name"]))
        if machine.get("alias"):
            machines.add(str(machine["alias"]))
    return QemuFacts(
        command=command,
        binary=_qemu_binary(command),
        version=QemuVersion.from_qmp(version["qemu"]),
        package=str(version.get("package", "")).strip(),
        accelerators=frozenset(accels),
        machines=frozenset(machines),
        types=frozenset(str(t["name"]) for t in answers["types"]),
        properties={
            type_name: {str(p["name"]): str(p["type"]) for p in props}
            for type_name, props in answers["properties"].items()
        },
        probe_s=probe_s,
        tcg_max_cpu=answers.get("tcg_max_cpu", {}),
    )


def _stderr_text(stream: Any) -> str:
    stream.seek(0)
    return bytes(stream.read()).decode(errors="replace").strip()


def _stop(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """Wait up to `grace` s for `proc` to exit, else kill it; always reap it.

    Returns its exit status, or None when it had to be killed.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _probe(command: tuple[str, ...], timeout: float) -> QemuFacts:
    start = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        *command,
        "-machine", "none", "-nodefaults", "-display", "none", "-no-user-config",
        "-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    with ours, tempfile.TemporaryFile() as stderr:
        try:
            with theirs:
                # spawn(): SIGKILLed if this process dies, because a -machine none
                # QEMU does not exit when its monitor goes away.
                proc = spawn(
                    argv,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
        except OSError as error:
            raise QemuError(f"cannot run QEMU {command[-1]!r}: {error}", FIX_MISSING) from None
        try:
            answers = _run_coroutine(lambda: asyncio.wait_for(_ask(ours), timeout))
        except Exception as error:
            # A QEMU that failed at start may still be writing its reason to stderr.
            status = _stop(proc, grace=0.5)
            if status is not None:
                raise QemuError(
                    f"QEMU {command[-1]!r} exited at start with status {status}"
                    " before answering QMP",
                    f"see why with: {' '.join(command)} -machine none -nodefaults -display none; "
                    f"or {FIX_MISSING}",
                    detail=_stderr_text(stderr),
                ) from None
            raise QemuError(
                f"QEMU {command[-1]!r} did not answer QMP within {timeout:g} s "
                f"({type(error).__name__}: {error})",
                f"check that it is a qemu-system-x86_64 that starts; {FIX_MISSING}",
                detail=_stderr_text(stderr),
            ) from None
        finally:
            # After `quit` QEMU exits by itself; a stuck one (or an interrupt) is killed.
            _stop(proc, grace=timeout)
    return _facts_from_answers(command, answers, time.monotonic() - start)


def introspect_qemu(
    binary: str | Sequence[str] = DEFAULT_BINARY,
    *,
    use_cache: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> QemuFacts:
    """Facts about the QEMU that `binary` (a name, a path or an argv prefix) runs.

    Raises QemuError when the binary is missing, dies at start (its stderr in
    `detail`) or does not answer QMP within `timeout` seconds. Nothing is left
    running: the QEMU is quit over QMP, killed if it lingers, and reaped.
    """
    command = resolve_command(binary)
    key = _cache_key(command)
    if use_cache:
        cached = _read_cache(key)
        if cached is not None:
            return cached
    facts = _probe(command, timeout)
    if use_cache:
        _write_cache(key, facts)
    return facts
