"""The guest memory helper `cvmlab-mem`, run on the host (it is plain Linux userspace).

The binary is compiled once with the image step's own compile function, then driven
through `orchestrator.guest.memhelper` exactly as a scenario drives it over SSH. As
root, /proc/<pid>/mem lets a test read and damage the holder's buffer, which stands in
for the host punching or corrupting guest pages. Every holder a test starts is
released, or killed by its pid at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.guest.memhelper import (
    HelperError,
    HoldReport,
    MemHelper,
    local_runner,
    pattern_page,
    pattern_word,
)
from orchestrator.image.step_static_c import compile_static_c, is_static_elf

SOURCE = Path(__file__).resolve().parents[1] / "images/minimal/guest-helper/cvmlab-mem.c"
PAGE = 4096

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="pagemap PFNs and /proc/pid/mem need root"
)


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("helper") / "cvmlab-mem"
    compile_static_c([SOURCE], out)
    return out


@pytest.fixture
def helper(binary: Path, tmp_path: Path) -> Iterator[MemHelper]:
    state = tmp_path / "state"
    mem = MemHelper(local_runner, state=str(state), binary=str(binary), timeout=30)
    yield mem
    pid_file = state / "pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            mem.release()
        except HelperError:
            os.kill(pid, signal.SIGKILL)


def run_raw(binary: Path, *args: str) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=30, check=False
    )
    return done.returncode, json.loads(done.stdout)


def read_page(report: HoldReport, page: int) -> bytes:
    with open(f"/proc/{report.pid}/mem", "rb") as mem:
        mem.seek(report.addr + page * report.page_size)
        return mem.read(report.page_size)


def write_bytes(report: HoldReport, offset: int, data: bytes) -> None:
    with open(f"/proc/{report.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(report.addr + offset)
        mem.write(data)


def test_the_built_helper_is_a_static_executable(binary: Path) -> None:
    assert is_static_elf(binary.read_bytes())


def test_a_dynamic_executable_is_not_static() -> None:
    assert not is_static_elf(Path("/bin/ls").read_bytes())


def test_hold_reports_one_present_gpa_per_page(helper: MemHelper) -> None:
    report = helper.hold(mib=2, seed=7)
    assert report.pages == 2 * 256 and report.page_size == PAGE and report.locked
    assert len(report.gpas) == report.pages
    assert all(g is not None and g % PAGE == 0 for g in report.gpas)
    assert len(set(report.gpas)) == report.pages  # distinct physical pages


def test_hold_locks_the_buffer_when_asked(helper: MemHelper) -> None:
    report = helper.hold(mib=2, seed=7, lock=True)
    status = Path(f"/proc/{report.pid}/status").read_text()
    locked_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmLck:")).split()[1]
    )
    assert locked_kib >= 2 * 1024


def test_hold_fills_every_page_with_the_documented_pattern(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=0xC0FFEE)
    for page in (0, 1, 100, report.pages - 1):
        assert read_page(report, page) == pattern_page(0xC0FFEE, page)


def test_pattern_words_of_one_seed_are_all_different() -> None:
    words = {pattern_word(42, page, word) for page in range(8) for word in range(512)}
    assert len(words) == 8 * 512


def test_different_seeds_give_different_pages() -> None:
    assert pattern_page(1, 0) != pattern_page(2, 0)


def test_holder_leaves_the_callers_session_and_stdio(binary: Path, helper: MemHelper) -> None:
    # communicate() returns only when every writer of the pipe is gone: the holder must
    # have let go of stdout, or an SSH command running hold would never return.
    done = subprocess.run(
        [str(binary), "hold", "--mib", "1", "--seed", "1", "--state", helper.state],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid = json.loads(done.stdout)["pid"]
    assert os.getsid(pid) != os.getsid(0)
    assert os.path.realpath(f"/proc/{pid}/fd/1") == "/dev/null"


def test_verify_of_an_untouched_buffer_is_clean(helper: MemHelper) -> None:
    helper.hold(mib=1, seed=3)
    result = helper.verify()
    assert result.clean and result.pages == 256 and result.first_bad_offset is None


def test_verify_names_zeroed_pages_and_keeps_neighbours(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=3)
    write_bytes(report, 10 * PAGE, bytes(2 * PAGE))  # pages 10 and 11
    result = helper.verify()
    assert result.bad_pages == 2
    assert [(b.page, b.kind, b.offset) for b in result.bad] == [(10, "zero", 0), (11, "zero", 0)]
    assert result.first_bad_offset == 10 * PAGE
    assert result.zero_pages == (10, 11)
    assert result.bad[0].gpa == report.gpas[10]


def test_verify_accepts_zero_where_gpa_ranges_were_punched(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=4)
    write_bytes(report, 20 * PAGE, bytes(PAGE))
    result = helper.verify(expect_zero=report.gpa_ranges([20]))
    assert result.clean
    assert (result.expected_zero_pages, result.expected_zero_ok) == (1, 1)


def test_verify_flags_an_expected_zero_page_that_kept_its_data(helper: MemHelper) -> None:
    # A punch that reported success but freed nothing (the Firecracker #6167 failure mode).
    report = helper.hold(mib=1, seed=4)
    result = helper.verify(expect_zero=report.gpa_ranges([5]))
    assert [(b.page, b.kind) for b in result.bad] == [(5, "not_zero")]
    assert result.expected_zero_ok == 0


def test_verify_reports_the_exact_first_corrupt_byte(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=5)
    offset = 7 * PAGE + 1234
    original = read_page(report, 7)[1234]
    write_bytes(report, offset, bytes([original ^ 0xFF]))
    result = helper.verify()
    assert [(b.page, b.kind, b.offset) for b in result.bad] == [(7, "corrupt", 1234)]
    assert result.first_bad_offset == offset


def test_verify_caps_the_list_of_bad_pages(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=6)
    write_bytes(report, 0, bytes(8 * PAGE))
    result = helper.verify(max_list=3)
    assert result.bad_pages == 8 and len(result.bad) == 3 and result.bad_truncated


def test_gpas_match_the_hold_report_for_a_locked_buffer(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=8)
    now = helper.gpas()
    assert now.gpas == report.gpas and now.moved == 0 and now.not_present == 0


def test_release_frees_the_buffer_and_waits_for_the_holder(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=9)
    helper.release()
    assert not Path(f"/proc/{report.pid}").exists() or "Z" in _state(report.pid)
    assert not any(Path(helper.state).iterdir())


def test_release_without_a_holder_is_an_enoent_error(helper: MemHelper) -> None:
    with pytest.raises(HelperError) as info:
        helper.release()
    assert info.value.errno_name == "ENOENT" and info.value.exit_status == 1


def test_a_second_hold_on_the_same_state_is_refused(helper: MemHelper) -> None:
    helper.hold(mib=1, seed=1)
    with pytest.raises(HelperError) as info:
        helper.hold(mib=1, seed=2)
    assert info.value.errno_name == "EBUSY"


def test_a_killed_holder_is_cleaned_up_by_release(helper: MemHelper) -> None:
    report = helper.hold(mib=1, seed=1)
    os.kill(report.pid, signal.SIGKILL)
    _wait_gone(report.pid)
    with pytest.raises(HelperError) as info:
        helper.release()
    assert info.value.errno_name == "ESRCH"
    helper.hold(mib=1, seed=2)  # the state is usable again


def test_verify_without_a_holder_is_an_error(helper: MemHelper) -> None:
    with pytest.raises(HelperError) as info:
        helper.verify()
    assert info.value.errno_name == "ENOENT"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus", "--state", "/tmp/x"],
        ["hold", "--mib", "1", "--seed", "1"],  # no --state
        ["hold", "--mib", "0", "--seed", "1", "--state", "/tmp/x"],
        ["hold", "--mib", "-1", "--seed", "1", "--state", "/tmp/x"],
        ["hold", "--mib", "1x", "--seed", "1", "--state", "/tmp/x"],
        ["hold", "--seed", "1", "--state", "/tmp/x"],
        ["verify", "--state", "/tmp/x", "--lock"],
        ["verify", "--state", "/tmp/x", "--expect-zero-gpa-ranges", "0x1001:0x1000"],
        ["verify", "--state", "/tmp/x", "--expect-zero-gpa-ranges", "0x1000:0"],
        ["verify", "--state", "/tmp/x", "--expect-zero-gpa-ranges", "4096"],
        ["gpas", "--state"],
        ["release", "--state", "/" + "d" * 120],
        ["fill"],  # no --mib
        ["fill", "--mib", "0"],
        ["fill", "--mib", "1", "--seed", "1"],
        ["fill", "--mib", "1", "--lock"],
    ],
)
def test_bad_arguments_are_a_json_einval_with_status_2(binary: Path, args: list[str]) -> None:
    status, reply = run_raw(binary, *args)
    assert status == 2
    assert reply["error"] == "EINVAL" and reply["errno"] == 22 and reply["message"]


def test_fill_uses_the_memory_it_reports_and_leaves_nothing_behind(
    binary: Path, tmp_path: Path
) -> None:
    """The child's peak RSS (the kernel's rusage, not the helper's word) covers the fill."""
    proc = subprocess.Popen([str(binary), "fill", "--mib", "64"], stdout=subprocess.PIPE,
                            cwd=tmp_path)  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    reply = json.loads(out)
    assert reply["mib"] == 64 and reply["pages"] == 64 * 1024 * 1024 // PAGE
    assert reply["fill_ms"] >= 0
    assert usage.ru_maxrss >= 64 * 1024, usage.ru_maxrss  # KiB
    assert list(tmp_path.iterdir()) == []  # no state directory, no holder


def test_fill_through_the_wrapper_reports_what_it_used(binary: Path) -> None:
    filled = MemHelper(local_runner, binary=str(binary), timeout=30).fill(8)
    assert (filled.mib, filled.pages) == (8, 8 * 256)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _wait_gone(pid: int) -> None:
    """Wait (on a pidfd, with a deadline) until `pid` has exited."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, f"pid {pid} did not exit"
    finally:
        os.close(fd)


# --- dropbear-quiet-seed.so (preloaded into the guest's dropbear listener) ---------------

PRELOAD_SOURCE = SOURCE.parent / "dropbear-quiet-seed.c"


@pytest.fixture(scope="module")
def quiet_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preload") / "dropbear-quiet-seed.so"
    compile_static_c([PRELOAD_SOURCE], out, shared=True)
    return out


def _preloaded(preload: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LD_PRELOAD": str(preload)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_quiet_seed_hides_dropbears_seed_files_with_enoent(quiet_seed: Path) -> None:
    for path in ("/proc/vmstat", "/proc/interrupts", "/proc/loadavg"):
        done = _preloaded(quiet_seed, "cat", path)
        assert done.returncode != 0 and "No such file or directory" in done.stderr, path


def test_quiet_seed_opens_everything_else_as_asked(quiet_seed: Path, tmp_path: Path) -> None:
    assert "MemTotal" in _preloaded(quiet_seed, "cat", "/proc/meminfo").stdout
    created = tmp_path / "created"
    script = f"import os; os.close(os.open({str(created)!r}, os.O_CREAT | os.O_WRONLY, 0o640))"
    assert _preloaded(quiet_seed, "python3", "-c", script).returncode == 0
    assert created.stat().st_mode & 0o777 == 0o640 & ~_umask()


def test_quiet_seed_does_not_reach_what_its_process_runs(quiet_seed: Path) -> None:
    done = _preloaded(quiet_seed, "sh", "-c", 'echo "${LD_PRELOAD-none}"; cat /proc/vmstat')
    assert done.stdout.startswith("none\n") and "nr_free_pages" in done.stdout


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- dropbear-rtc-clock.so (preloaded into the guest's dropbear too) ---------------------

RTC_CLOCK_SOURCE = SOURCE.parent / "dropbear-rtc-clock.c"

ACCEPT_BOTH_WAYS = """
import os, socket
listener = socket.create_server(("127.0.0.1", 0))
for n in range(2):
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()  # accept4(2) from Python
    client.sendall(b"ping%d" % n)
    print(conn.recv(5).decode(), conn.getpeername() == client.getsockname())
print(os.environ.get("LD_PRELOAD", "none"))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_rtc_clock_preload_keeps_accept_transparent(tmp_path: Path) -> None:
    # On the host the clock is not behind its RTC, so the preload sets nothing; without
    # CAP_SYS_TIME it could not anyway: this test never touches the host's clock. Root
    # drops the capability (setpriv); anyone else never had it.
    preload = tmp_path / "dropbear-rtc-clock.so"
    compile_static_c([RTC_CLOCK_SOURCE], preload, shared=True)
    no_time = ["setpriv", "--inh-caps=-sys_time", "--bounding-set=-sys_time", "--"]
    if os.geteuid() != 0:
        no_time = []
    done = subprocess.run(
        [*no_time, "env", f"LD_PRELOAD={preload}", sys.executable, "-c", ACCEPT_BOTH_WAYS],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["ping0 True", "ping1 True", "none"]
