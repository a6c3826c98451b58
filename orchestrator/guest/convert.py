"""Drive the guest's conversion module (`cvmlab_convert.ko`) over SSH.

The module (source: images/minimal/cvmlab-convert/cvmlab_convert.c, built into the image
by the `kmod` build step) converts pages private->shared->private with
`set_memory_decrypted()`/`set_memory_encrypted()` and checks their contents. Its control
files are in debugfs:

    echo "pages=N seed=S loops=L chunk=C" > /sys/kernel/debug/cvmlab_convert/run
    cat /sys/kernel/debug/cvmlab_convert/result        # one JSON object

`run_conversions()` loads the module if needed, makes one run, and returns the result
typed. Everything happens in one SSH command (a fixed script, the request as an
argument), so a run costs one round trip.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import GuestError
from orchestrator.guest.ssh import GuestShell

MODULE = "cvmlab_convert"
CONTROL_DIR = f"/sys/kernel/debug/{MODULE}"
# Bounds the module enforces (cvmlab_convert.c); checked here too for a clearer error.
MAX_PAGES = 65536
MAX_CHUNK = 1024
MAX_LOOPS = 1_000_000

# Exit statuses of the script below for what went wrong before the run.
_NO_MODULE_FILE = 90
_INSMOD_FAILED = 91
_NO_DEBUGFS = 92
_NO_CONTROL = 93

# $1 is the request ("pages=.. seed=.. loops=.. chunk=.."), made here from integers.
# The write's own status is not used: the module reports refusals in the JSON, which is
# printed in every case.
_SCRIPT = f"""
ko=/lib/modules/$(uname -r)/extra/{MODULE}.ko
d={CONTROL_DIR}
if [ ! -d "$d" ]; then
    if ! grep -q ' /sys/kernel/debug debugfs ' /proc/mounts; then
        mount -t debugfs debugfs /sys/kernel/debug || exit {_NO_DEBUGFS}
    fi
    if ! grep -q '^{MODULE} ' /proc/modules; then
        [ -f "$ko" ] || {{ echo "$ko" >&2; exit {_NO_MODULE_FILE}; }}
        insmod "$ko" || exit {_INSMOD_FAILED}
    fi
    [ -d "$d" ] || exit {_NO_CONTROL}
fi
printf '%s\\n' "$1" > "$d/run"
cat "$d/result"
"""


@dataclass(frozen=True)
class CallCounts:
    """One direction of conversion: calls made, calls that returned 0, calls that failed."""

    calls: int
    ok: int
    failed: int


@dataclass(frozen=True)
class CheckCounts:
    """Pages checked against an expected fill, and how many differed."""

    checked_pages: int
    mismatched_pages: int


@dataclass(frozen=True)
class Mismatch:
    """The first word that differed: which check, where, and the two values."""

    check: str
    chunk: int
    page: int
    word: int
    expected: int
    seen: int


@dataclass(frozen=True)
class ConversionResult:
    """One run of the module, as its JSON reports it.

    `contents_after_conversion` is "preserved" on a guest without memory encryption (the
    calls are no-ops, so the `preserved` counts are checked) and "undefined" on TDX/SNP
    (only the `roundtrip` of a fresh fill is checked). `leaked_pages` are pages whose
    conversion failed: the module keeps them forever rather than free possibly-shared
    memory. `first_call_error` is the first failing call's negative errno (0 if none);
    `injected_failures` counts calls a `fail_call` request failed on purpose.
    """

    platform: str
    contents_after_conversion: Literal["preserved", "undefined"]
    pages: int
    seed: int
    loops: int
    chunk: int
    chunks: int
    decrypt: CallCounts
    encrypt: CallCounts
    preserved: CheckCounts
    roundtrip: CheckCounts
    first_call_error: int
    injected_failures: int
    leaked_pages: int
    leaked_pages_total: int
    elapsed_ns: int
    first_mismatch: Mismatch | None
    raw: Mapping[str, Any]

    @property
    def expected_calls(self) -> int:
        """Calls per direction if nothing fails: every chunk, every loop."""
        return self.loops * self.chunks

    @property
    def all_calls_succeeded(self) -> bool:
        return (
            self.decrypt.failed == 0
            and self.encrypt.failed == 0
            and self.decrypt.ok == self.expected_calls
            and self.encrypt.ok == self.expected_calls
        )

    @property
    def contents_ok(self) -> bool:
        """No page differed from what the documented semantics promise."""
        return self.preserved.mismatched_pages == 0 and self.roundtrip.mismatched_pages == 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


def skipped_at_build(image_dir: Path) -> str | None:
    """Why the image was built without the module (its build notes say), or None.

    The `kmod` step skips the module when the host lacks the kernel's compiler; anything
    that needs the module should then cancel with this reason rather than fail.
    """
    try:
        notes = json.loads((image_dir / "manifest.json").read_text()).get("build", {})
        reason = notes.get("kmods", {}).get(MODULE, {}).get("skipped")
    except (OSError, ValueError, AttributeError):
        return None
    return str(reason) if reason else None


def _errno_name(value: int) -> str:
    return errno.errorcode.get(-value, f"errno {-value}")


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} is {value!r}, not an integer")
    return value


def _calls(data: Mapping[str, Any], key: str) -> CallCounts:
    part = data[key]
    return CallCounts(_int(part, "calls"), _int(part, "ok"), _int(part, "failed"))


def _checks(data: Mapping[str, Any], key: str) -> CheckCounts:
    part = data[key]
    return CheckCounts(_int(part, "checked_pages"), _int(part, "mismatched_pages"))


def parse_result(text: str) -> ConversionResult:
    """The module's `result` JSON as a ConversionResult; GuestError if it refused the run.

    A refusal ("error" < 0: bad request, no memory, interrupted) raises GuestError with the
    module's message and the errno's name.
    """
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        error = _int(data, "error")
    except (ValueError, TypeError, KeyError) as exc:
        raise GuestError(
            f"{MODULE} returned no valid result ({exc}): {text.strip()[:200]!r}",
            "check that the guest runs the module built for this cvmlab (rebuild the image)",
        ) from None
    if error != 0:
        raise GuestError(
            f"{MODULE} refused the run: {data.get('message', '?')} ({_errno_name(error)})",
            "fix the request (see the module's limits), or see the guest's dmesg",
        )
    try:
        mismatch_data = data.get("first_mismatch")
        mismatch = None
        if mismatch_data is not None:
            mismatch = Mismatch(
                check=str(mismatch_data["check"]),
                chunk=_int(mismatch_data, "chunk"),
                page=_int(mismatch_data, "page"),
                word=_int(mismatch_data, "word"),
                expected=int(str(mismatch_data["expected"]), 16),
                seen=int(str(mismatch_data["seen"]), 16),
            )
        semantics = str(data["contents_after_conversion"])
        if semantics not in ("preserved", "undefined"):
            raise ValueError(f"contents_after_conversion is {semantics!r}")
        return ConversionResult(
            platform=str(data["platform"]),
            contents_after_conversion=semantics,  # type: ignore[arg-type]
            pages=_int(data, "pages"),
            seed=_int(data, "seed"),
            loops=_int(data, "loops"),
            chunk=_int(data, "chunk"),
            chunks=_int(data, "chunks"),
            decrypt=_calls(data, "decrypt"),
            encrypt=_calls(data, "encrypt"),
            preserved=_checks(data, "preserved"),
            roundtrip=_checks(data, "roundtrip"),
            first_call_error=_int(data, "first_call_error"),
            injected_failures=_int(data, "injected_failures"),
            leaked_pages=_int(data, "leaked_pages"),
            leaked_pages_total=_int(data, "leaked_pages_total"),
            elapsed_ns=_int(data, "elapsed_ns"),
            first_mismatch=mismatch,
            raw=data,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise GuestError(
            f"{MODULE} returned an incomplete result ({exc})",
            "rebuild the image so the module and cvmlab agree on the result's format",
        ) from None


def request_text(pages: int, seed: int, loops: int, chunk: int, fail_call: int = 0) -> str:
    """The control line for a run; GuestError for a value the module would refuse.

    `fail_call=K` (tests only) makes the module skip the K-th conversion call and report
    -EIO for it, so the failure path (count it, leak the chunk) runs on any guest.
    """
    bounds = {
        "pages": (pages, 1, MAX_PAGES),
        "chunk": (chunk, 1, min(max(pages, 1), MAX_CHUNK)),
        "loops": (loops, 1, MAX_LOOPS),
        "seed": (seed, 0, 2**64 - 1),
        "fail_call": (fail_call, 0, 2**64 - 1),
    }
    for name, (value, low, high) in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise GuestError(
                f"conversion request {name}={value!r} is out of range {low}..{high}",
                f"give an integer {name} within {low}..{high}",
            )
    text = f"pages={pages} seed={seed} loops={loops} chunk={chunk}"
    return f"{text} fail_call={fail_call}" if fail_call else text


def _timeout_for(pages: int, loops: int) -> float:
    # Measured under TCG: about 50 us per page per loop (two fills, up to four checks).
    # Allow 10x that, plus the SSH round trip and loading the module.
    return 30.0 + pages * loops * 500e-6


def run_conversions(
    shell: GuestShell,
    pages: int,
    seed: int,
    loops: int,
    chunk: int,
    timeout: float | None = None,
    *,
    fail_call: int = 0,
) -> ConversionResult:
    """Load `cvmlab_convert` if needed, run `loops` conversions of `pages` pages in chunks
    of `chunk` pages, filled from `seed`, and return the module's counts.

    Raises GuestError when the image lacks the module, it does not load, the module
    refuses the request (its message and errno), or the output is not its JSON.
    """
    request = request_text(pages, seed, loops, chunk, fail_call)
    return run_request(
        shell, request, timeout if timeout is not None else _timeout_for(pages, loops)
    )


def run_request(shell: GuestShell, request: str, timeout: float = 60.0) -> ConversionResult:
    """Send one control line as it is (no checks here: the module's own are exercised)."""
    result = shell.run(["sh", "-c", _SCRIPT, MODULE, request], timeout=timeout, check=False)
    status = result.exit_status
    stderr = result.stderr.strip()
    if status == _NO_MODULE_FILE:
        raise GuestError(
            f"the guest image has no {MODULE}.ko ({stderr})",
            "rebuild the image with the kmod step of images/minimal/recipe.yaml "
            "(cvmlab image build)",
        )
    if status == _INSMOD_FAILED:
        raise GuestError(
            f"{MODULE}.ko does not load in the guest: {stderr}",
            "see the guest's dmesg; the module must be built against this image's kernel",
        )
    if status == _NO_DEBUGFS:
        raise GuestError(
            f"debugfs cannot be mounted in the guest: {stderr}",
            "boot a kernel with CONFIG_DEBUG_FS=y and without debugfs=off or lockdown",
        )
    if status == _NO_CONTROL:
        raise GuestError(
            f"{MODULE} is loaded but {CONTROL_DIR} is missing",
            f"unload it (rmmod {MODULE}) and run again",
        )
    return parse_result(result.stdout)


__all__ = [
    "CONTROL_DIR",
    "MODULE",
    "CallCounts",
    "CheckCounts",
    "ConversionResult",
    "Mismatch",
    "parse_result",
    "request_text",
    "run_conversions",
    "run_request",
    "skipped_at_build",
]
