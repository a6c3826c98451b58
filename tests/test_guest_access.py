"""Reaching the guest: the serial console watcher, SSH commands and files, crashes.

Console tests feed lines by hand (no guest). The `vm` tests boot the default image
under TCG: one guest serves the SSH tests and ends with the clean-shutdown test,
one more is crashed on purpose.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import GuestCrashed, GuestError
from orchestrator.guest.serial import CrashReport, SerialConsole
from orchestrator.image import ImageManifest
from orchestrator.qemu.launcher import Machine
from orchestrator.qemu.spec import KernelBoot, MachineSpec
from orchestrator.timeline import Timeline, now

# --- serial console (no guest) -----------------------------------------------------------


def test_console_wait_for_returns_the_matching_line() -> None:
    console = SerialConsole()
    console.feed("[    1.000000] booting")
    console.feed("CVMLAB-READY uptime=3.2")
    line = console.wait_for("CVMLAB-READY", timeout=1)
    assert line.text == "CVMLAB-READY uptime=3.2"
    assert console.wait_for(re.compile(r"uptime=\d"), timeout=1) == line


def test_console_wait_for_raises_at_once_when_a_panic_line_appears() -> None:
    console = SerialConsole()
    feeder = threading.Timer(
        0.05, lambda: console.feed("[    3.5] Kernel panic - not syncing: sysrq triggered crash")
    )
    started = now()
    feeder.start()
    with pytest.raises(GuestCrashed, match="Kernel panic") as caught:
        console.wait_for("CVMLAB-READY", timeout=30)
    feeder.join()
    assert now() - started < 5
    assert "sysrq triggered crash" in caught.value.detail


@pytest.mark.parametrize(
    "line",
    [
        "[    2.1] Oops: general protection fault, probably for non-canonical address",
        "[    2.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "[    2.1] WARNING: CPU: 0 PID: 1 at mm/page_alloc.c:4700 __alloc_pages+0x1/0x2",
        "[    2.1] general protection fault, probably for non-canonical address 0xdead",
        "[    2.1] Call Trace:",
        "Kernel panic - not syncing: Attempted to kill init!",
    ],
)
def test_console_reports_kernel_crash_lines_to_its_owner(line: str) -> None:
    reports: list[CrashReport] = []
    console = SerialConsole(on_crash=reports.append)
    console.feed("[    2.0] before")
    console.feed(line)
    console.feed("[    2.2] after")
    assert [r.line for r in reports] == [line]
    assert reports[0].source == "serial"
    assert reports[0].evidence().splitlines() == ["[    2.0] before", line, "[    2.2] after"]


def test_console_ignores_crash_words_that_are_not_kernel_reports() -> None:
    reports: list[CrashReport] = []
    console = SerialConsole(on_crash=reports.append)
    console.feed("grep -c 'WARNING:' /var/log/messages")
    console.feed("cvmlab-init: no BUG: here, just a message")
    assert reports == [] and console.crash is None


def test_console_wait_for_raises_when_a_crash_is_noted_by_qmp() -> None:
    console = SerialConsole()
    event = CrashReport(source="qmp", t=now(), line='QMP GUEST_PANICKED {"action": "pause"}',
                        console=console)
    threading.Timer(0.05, console.note_crash, args=(event,)).start()
    with pytest.raises(GuestCrashed, match="GUEST_PANICKED"):
        console.wait_for("CVMLAB-READY", timeout=30)
    # The kernel's own line, once printed, leads the report.
    console.feed("[    3.5] Kernel panic - not syncing: Fatal exception")
    assert event.headline().startswith("[    3.5] Kernel panic")
    assert "Fatal exception" in event.evidence()


def test_console_wait_for_fails_at_once_when_the_console_ends() -> None:
    console = SerialConsole()
    console.end("QEMU exited with status 1")
    with pytest.raises(GuestError, match="QEMU exited with status 1"):
        console.wait_for("CVMLAB-READY", timeout=30)


def test_console_lines_go_to_the_timeline(tmp_path: Path) -> None:
    with Timeline(tmp_path / "timeline.jsonl") as timeline:
        console = SerialConsole(timeline)
        console.feed("hello\r\n")
    records = [json.loads(x) for x in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    assert [(r["source"], r["kind"], r["text"]) for r in records] == [("serial", "line", "hello")]


# --- a booted guest --------------------------------------------------------------------------


def _spec(image: ImageManifest) -> MachineSpec:
    return MachineSpec(
        boot=KernelBoot(kernel=str(image.kernel), initrd=str(image.initrd), cmdline=image.cmdline)
    )


class Booted:
    """One guest shared by the SSH tests of this module (TCG boots cost seconds)."""

    def __init__(self, image: ImageManifest, evidence: Path) -> None:
        self.image = image
        self.evidence = evidence
        self.timeline = Timeline(evidence / "timeline.jsonl")
        self.machine = Machine(
            _spec(image), evidence, timeline=self.timeline, ready_marker=image.ready_marker
        )
        self.machine.start()
        self.ready_at = self.machine.wait_ready(timeout=120)
        self.shell = self.machine.ssh(image.ssh_user, image.ssh_key, image.host_key)


@pytest.fixture(scope="module")
def booted(
    guest_image: ImageManifest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Booted]:
    guest = Booted(guest_image, tmp_path_factory.mktemp("booted-evidence"))
    try:
        yield guest
    finally:
        guest.machine.shutdown()
        guest.timeline.close()


@pytest.mark.vm
def test_ssh_runs_a_command_and_returns_its_output(booted: Booted) -> None:
    result = booted.shell.run("uname -r")
    assert result.exit_status == 0
    assert result.stdout.strip() == booted.image.kernel_release
    assert result.duration > 0 and result.started >= booted.ready_at


@pytest.mark.vm
def test_ssh_sends_without_nagle(booted: Booted) -> None:
    transport = booted.shell._transport()
    assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.vm
def test_dropbear_alone_skips_its_proc_seed_files_and_commands_see_them(booted: Booted) -> None:
    preload = "/usr/lib/cvmlab/dropbear-quiet-seed.so"
    # The listener started at boot: the lowest PID (the others are this session's).
    listener = min(int(pid) for pid in booted.shell.run("pidof dropbear").stdout.split())
    assert preload in booted.shell.run(["cat", f"/proc/{listener}/maps"]).stdout
    # A command over SSH: no preload in its environment, /proc as it is.
    seen = booted.shell.run('echo "${LD_PRELOAD-none}"; cat /proc/interrupts /proc/vmstat')
    assert seen.stdout.startswith("none\n") and "nr_free_pages" in seen.stdout
    # What the preload does to a program is checked on the host (test_guest_helper.py):
    # the guest's other programs are static busybox, which no preload reaches.


@pytest.mark.vm
def test_the_ssh_listener_sets_a_clock_that_fell_behind_the_rtc(booted: Booted) -> None:
    # What a restore leaves (images/minimal/guest-helper/dropbear-rtc-clock.c): the
    # guest's clock behind its RTC, which QEMU keeps on the host's time.
    image = booted.image
    listener = min(int(pid) for pid in booted.shell.run("pidof dropbear").stdout.split())
    maps = booted.shell.run(["cat", f"/proc/{listener}/maps"]).stdout
    assert "/usr/lib/cvmlab/dropbear-rtc-clock.so" in maps
    booted.shell.run("date -u -s @$((EPOCHSECONDS - 100)) >/dev/null")
    behind = int(booted.shell.run("echo $EPOCHSECONDS").stdout)
    assert behind < time.time() - 90  # this session's clock stays behind
    before = time.time()
    fresh = booted.machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
    try:
        guest = int(fresh.run("echo $EPOCHSECONDS").stdout)
        after = time.time()
        # The RTC's time: up to 2 s behind the host's (QEMU starts it at a whole second).
        assert before - 3 <= guest <= after + 1, (before, guest, after)
        log = fresh.run("dmesg").stdout
    finally:
        fresh.close()
    assert re.search(r"cvmlab: guest clock was (99|10[0-3]) s behind the RTC; set from it", log)
    # A clock within a second of the RTC is not logged: no second line for this one.
    again = booted.machine.ssh(image.ssh_user, image.ssh_key, image.host_key)
    try:
        assert again.run("dmesg").stdout.count("behind the RTC") == 1
    finally:
        again.close()


@pytest.mark.vm
def test_ssh_failing_command_reports_status_and_stderr(booted: Booted) -> None:
    result = booted.shell.run("ls /no/such/path", check=False)
    assert result.exit_status != 0
    assert "No such file or directory" in result.stderr
    with pytest.raises(GuestError, match="status") as caught:
        booted.shell.run(["ls", "/no/such/path"])
    message = str(caught.value)
    assert "ls /no/such/path" in message and "No such file or directory" in message
    assert "\n" not in message
    assert "No such file or directory" in caught.value.detail


@pytest.mark.vm
def test_ssh_list_arguments_reach_the_program_verbatim(booted: Booted) -> None:
    result = booted.shell.run(["printf", "%s|", "a b", "$HOME", "it's", ";true"])
    assert result.stdout == "a b|$HOME|it's|;true|"
    assert result.argv == ("printf", "%s|", "a b", "$HOME", "it's", ";true")


@pytest.mark.vm
def test_ssh_input_is_fed_to_the_command(booted: Booted) -> None:
    assert booted.shell.run("wc -c", input=b"x" * 100000).stdout.strip() == "100000"


@pytest.mark.vm
def test_upload_then_read_back_gives_the_same_bytes(booted: Booted, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    booted.shell.upload(local, "/tmp/payload.bin", mode=0o640)
    listing = booted.shell.run("stat -c %a:%s /tmp/payload.bin").stdout.strip()
    assert listing == f"640:{len(payload)}"
    digest = booted.shell.run("sha256sum /tmp/payload.bin").stdout.split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()


@pytest.mark.vm
def test_ssh_command_timeout_names_the_command_and_kills_it(booted: Booted) -> None:
    started = now()
    with pytest.raises(GuestError, match=r"did not finish within 0\.5 s: sleep 37"):
        booted.shell.run("sleep 37", timeout=0.5)
    assert now() - started < 5
    # The overrunning command was killed, not left running in the guest.
    assert booted.shell.run("ps | grep -c 'sleep 3[7]'", check=False).stdout.strip() == "0"


@pytest.mark.vm
def test_ssh_refuses_a_host_key_other_than_the_pinned_one(booted: Booted) -> None:
    # Any valid key that is not the guest's host key: the image's user key.
    not_the_host_key = booted.image.ssh_key.with_suffix(".pub").read_text()
    started = now()
    with pytest.raises(GuestError, match="host key does not match"):
        booted.machine.ssh(booted.image.ssh_user, booted.image.ssh_key, not_the_host_key)
    assert now() - started < 10, "a wrong host key must not be retried"


@pytest.mark.vm
def test_ssh_login_refusal_is_reported_without_retrying(booted: Booted) -> None:
    started = now()
    with pytest.raises(GuestError, match="refused"):
        booted.machine.ssh("no-such-user", booted.image.ssh_key, booted.image.host_key)
    assert now() - started < 10, "an authentication failure must not be retried"


@pytest.mark.vm
def test_clean_shutdown_uses_powerdown_and_leaves_evidence(booted: Booted) -> None:
    # Runs last in this module: it ends the shared guest.
    machine = booted.machine
    rung = machine.shutdown()
    assert rung == "powerdown"
    assert machine.returncode == 0 and not machine.running
    assert not Path(f"/proc/{machine.pid}").exists()
    for name in ("argv.json", "run.sh", "qmp.jsonl", "serial.log", "qemu.stderr"):
        assert (booted.evidence / name).is_file(), name
    qmp = [json.loads(x) for x in (booted.evidence / "qmp.jsonl").read_text().splitlines()]
    commands = [r["msg"]["execute"] for r in qmp if r["kind"] == "command"]
    assert commands[0] == "qmp_capabilities" and "system_powerdown" in commands
    shutdowns = [r["msg"] for r in qmp if r["kind"] == "event" and r["msg"]["event"] == "SHUTDOWN"]
    assert shutdowns and shutdowns[0]["data"]["reason"] == "guest-shutdown"
    assert booted.image.ready_marker in (booted.evidence / "serial.log").read_text()
    run_sh = (booted.evidence / "run.sh").read_text()
    assert run_sh.startswith("#!/bin/sh") and "-no-reboot" in run_sh
    # QMP runs over a socket pair: a run dir exists only for a human monitor.
    assert machine.rundir is None or not machine.rundir.exists()


# --- crashing on purpose -------------------------------------------------------------------


@pytest.mark.vm
def test_guest_panic_interrupts_a_running_command_at_once(
    guest_image: ImageManifest, evidence_dir: Path
) -> None:
    timeline = Timeline(evidence_dir / "timeline.jsonl")
    with Machine(
        _spec(guest_image), evidence_dir, timeline=timeline, ready_marker=guest_image.ready_marker
    ) as machine:
        machine.start()
        machine.wait_ready(timeout=120)
        shell = machine.ssh(guest_image.ssh_user, guest_image.ssh_key, guest_image.host_key)
        started = now()
        with pytest.raises(GuestCrashed) as caught:
            shell.run("echo c > /proc/sysrq-trigger; sleep 600", timeout=600)
        elapsed = now() - started
        assert elapsed < 5, f"the crash took {elapsed:.1f} s to surface"
        assert "Kernel panic - not syncing: sysrq triggered crash" in str(caught.value)
        assert "Call Trace:" in caught.value.detail
        # panic=-1 and -no-reboot: QEMU ends on its own.
        assert machine.wait_exited(30) is not None
        assert machine.crashed is not None
        assert machine.shutdown() == "exited"
    timeline.close()
    events = [e.name for e in machine.qmp.events()]
    serial = (evidence_dir / "serial.log").read_text()
    assert "GUEST_PANICKED" in events or "Kernel panic" in serial
    crash_records = [
        json.loads(x)
        for x in (evidence_dir / "timeline.jsonl").read_text().splitlines()
        if '"kind":"crash"' in x
    ]
    assert crash_records, "the crash is on the timeline"
