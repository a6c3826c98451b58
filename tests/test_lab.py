"""The kernel-under-test lab: its pure parts, its refusals, and real lab boots.

Tests marked `lab` boot Debian's 7.3 kernel under TCG (tens of seconds each): the
command's status and streams come back apart, a panic is reported with its console
lines, a command that is not there is one error, and a killed `cvmlab lab` leaves no QEMU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import LabError
from orchestrator.image.pvh import KernelEntry
from orchestrator.lab.cli import parse_memory
from orchestrator.lab.initramfs import _early_module_files
from orchestrator.lab.kernels import LabKernel, _check_request, check_kvm_modules, local_kernel
from orchestrator.lab.machine import (
    KERNEL_CMDLINE,
    LabConfig,
    lab_argv,
    lab_environment,
    share_list,
    sweep_stale_rundirs,
)

REPO = Path(__file__).resolve().parents[1]
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


def fake_kernel(tmp_path: Path) -> LabKernel:
    return LabKernel("7.3.4+deb13-amd64", tmp_path / "vmlinuz", None, "test")


def config(tmp_path: Path, **overrides: object) -> LabConfig:
    fields: dict[str, object] = {
        "kernel": fake_kernel(tmp_path),
        "argv": ("true",),
        "cwd": tmp_path,
        "writable": (tmp_path,),
    }
    fields.update(overrides)
    return LabConfig(**fields)  # type: ignore[arg-type]


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_the_outer_qemu_is_tcg_with_svm_and_the_hosts_root_read_only(tmp_path: Path) -> None:
    argv = lab_argv(config(tmp_path), tmp_path / "initrd", tmp_path / "run")
    assert option_values(argv, "-accel") == ["tcg,thread=multi"]
    assert option_values(argv, "-cpu") == ["max"]
    assert option_values(argv, "-append") == [KERNEL_CMDLINE]
    assert "-no-reboot" in argv and "panic=-1" in KERNEL_CMDLINE
    fsdevs = option_values(argv, "-fsdev")
    assert fsdevs[0] == "local,id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on"
    assert f"local,id=rw0,path={tmp_path},security_model=none,multidevs=remap" in fsdevs
    assert not [f for f in fsdevs[1:] if "readonly" in f]


def test_the_outer_qemu_enters_the_kernel_the_entry_names(tmp_path: Path) -> None:
    bzimage = lab_argv(config(tmp_path), tmp_path / "initrd", tmp_path / "run")
    assert option_values(bzimage, "-kernel") == [str(tmp_path / "vmlinuz")]
    elf = KernelEntry(tmp_path / "k.vmlinux", True, "PVH entry")
    pvh = lab_argv(config(tmp_path, entry=elf), tmp_path / "initrd", tmp_path / "run")
    assert option_values(pvh, "-kernel") == [str(elf.path)]
    assert option_values(pvh, "-initrd") == [str(tmp_path / "initrd")]


def test_numa_nodes_split_memory_and_cpus_and_refuse_an_uneven_split(tmp_path: Path) -> None:
    argv = lab_argv(config(tmp_path, numa_nodes=2), tmp_path / "i", tmp_path / "r")
    assert option_values(argv, "-numa") == [
        "node,nodeid=0,cpus=0-0,memdev=lab-ram0",
        "node,nodeid=1,cpus=1-1,memdev=lab-ram1",
    ]
    assert "memory-backend-ram,id=lab-ram1,size=2048M" in option_values(argv, "-object")
    with pytest.raises(LabError, match="cannot be split evenly over 3 NUMA nodes"):
        lab_argv(config(tmp_path, numa_nodes=3), tmp_path / "i", tmp_path / "r")


def test_writable_shares_are_deduplicated_and_never_the_root(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    assert share_list([inner, tmp_path, tmp_path / "a"]) == [tmp_path]
    with pytest.raises(LabError, match="root cannot be writable"):
        share_list([Path("/")])
    with pytest.raises(LabError, match="is not a directory"):
        share_list([tmp_path / "missing"])


def test_the_environment_inside_names_the_lab_and_drops_host_only_paths(tmp_path: Path) -> None:
    env = lab_environment({"TMPDIR": "/tmp/x", "PATH": "/bin"}, fake_kernel(tmp_path), "QEMU 10")
    assert "TMPDIR" not in env and env["PATH"] == "/bin"
    assert env["CVMLAB_LAB"] == "1" and env["CVMLAB_LAB_KERNEL"] == "7.3.4+deb13-amd64"
    assert env["CVMLAB_LAB_HOST_KERNEL"] == os.uname().release


@pytest.mark.parametrize("bad", ["seven", "7", "7.3-rc1", "linux-image-7.3", "7.3.4+deb13-arm64"])
def test_a_kernel_that_is_neither_series_version_nor_release_is_refused(bad: str) -> None:
    with pytest.raises(LabError, match="neither a series"):
        _check_request(bad)


def test_a_vmlinuz_that_is_not_a_bzimage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"\0" * 4096)
    with pytest.raises(LabError, match="is not a bzImage"):
        local_kernel(tmp_path / "vmlinuz", None)
    with pytest.raises(LabError, match="is not a file"):
        local_kernel(tmp_path / "missing", None)


def modules_dir(tmp_path: Path, dep: str, builtin: str = "") -> LabKernel:
    directory = tmp_path / "lib/modules/7.3.4+deb13-amd64"
    directory.mkdir(parents=True)
    (directory / "modules.dep").write_text(dep)
    (directory / "modules.builtin").write_text(builtin)
    return LabKernel("7.3.4+deb13-amd64", tmp_path / "vmlinuz", directory, "test")


def test_a_kernel_without_kvm_or_without_kvm_amd_is_refused_before_booting(
    tmp_path: Path,
) -> None:
    with pytest.raises(LabError, match="has no KVM modules"):
        check_kvm_modules(modules_dir(tmp_path / "a", "kernel/fs/9p/9p.ko.xz:\n"))
    with pytest.raises(LabError, match="has KVM but no kvm_amd"):
        check_kvm_modules(
            modules_dir(
                tmp_path / "b",
                "kernel/arch/x86/kvm/kvm-intel.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz\n"
                "kernel/arch/x86/kvm/kvm.ko.xz:\n",
            )
        )  # fmt: skip
    check_kvm_modules(modules_dir(tmp_path / "c", "", "kernel/arch/x86/kvm/kvm.ko\n"
                                  "kernel/arch/x86/kvm/kvm-amd.ko\n"))  # fmt: skip


def test_kvm_and_its_dependencies_go_into_the_initramfs_in_load_order(tmp_path: Path) -> None:
    kernel = modules_dir(
        tmp_path,
        "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n"
        "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n"
        "kernel/virt/lib/irqbypass.ko:\n",
    )
    assert kernel.modules_dir is not None
    for path in ("arch/x86/kvm/kvm-amd.ko", "arch/x86/kvm/kvm.ko", "virt/lib/irqbypass.ko"):
        (kernel.modules_dir / "kernel" / path).parent.mkdir(parents=True, exist_ok=True)
        (kernel.modules_dir / "kernel" / path).write_bytes(b"\x7fELF" + path.encode())
    early = _early_module_files(kernel, ("kvm_amd",), set())
    assert [name for name, _ in early] == [
        "kernel/virt/lib/irqbypass.ko",
        "kernel/arch/x86/kvm/kvm.ko",
        "kernel/arch/x86/kvm/kvm-amd.ko",
    ]
    skipped = _early_module_files(kernel, ("kvm_amd",), {"kernel/virt/lib/irqbypass.ko"})
    assert next(name for name, _ in skipped) == "kernel/arch/x86/kvm/kvm.ko"
    assert _early_module_files(kernel, (), set()) == []


def test_memory_sizes_parse_and_nonsense_is_refused() -> None:
    assert parse_memory("4G") == 4096 and parse_memory("3072M") == 3072
    with pytest.raises(LabError, match="is not a size"):
        parse_memory("lots")


def test_run_dirs_of_dead_lab_runs_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"cvmlab-lab-{dead.pid}-x").mkdir()
    (tmp_path / f"cvmlab-lab-{os.getpid()}-y").mkdir()
    sweep_stale_rundirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"cvmlab-lab-{os.getpid()}-y"]


def test_an_unknown_debian_kernel_lists_the_series_the_archive_has() -> None:
    result = cvmlab_lab("--kernel", "5.4", "--", "true")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("cvmlab: error: Debian's bookworm-backports and trixie-backports")
    assert "choose one of the series they have:" in lines[-1] and "7.3" in lines[-1]


# --- real lab boots --------------------------------------------------------------------------


def cvmlab_lab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "lab", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.lab
@needs_qemu
def test_the_commands_status_and_streams_come_back_apart(tmp_path: Path) -> None:
    script = tmp_path / "cmd.sh"
    # The command's Python reads the launcher's entry point table instead of scanning.
    table = ("import sys; from orchestrator.lab import entry_points as e; e.table(); "
             "print('table read:', 'importlib.metadata' not in sys.modules)")  # fmt: skip
    script.write_text(f'echo "out $(uname -r)"; echo "err $PWD" >&2\n'
                      f'{sys.executable} -c "{table}"; exit 3\n')  # fmt: skip
    result = cvmlab_lab("--quiet", "--rw", str(tmp_path), "--results", str(tmp_path / "r"),
                        "--", "sh", str(script))  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.startswith("out 7.3."), result.stdout
    assert "table read: True" in result.stdout
    assert f"err {REPO}" in result.stderr
    (evidence,) = (tmp_path / "r" / "lab").iterdir()
    assert "cvmlab-lab: root mounted" in (evidence / "console.log").read_text()
    assert "kvm_amd" in (evidence / "kernel-dmesg.txt").read_text()
    # /init loaded KVM from the initramfs: the runner had nothing left to modprobe.
    facts = json.loads((evidence / "lab.json").read_text())
    inside = facts["inside"]
    assert inside["modprobe"] == {"kvm_amd": "ok (initramfs)"}, inside
    # Entered through PVH: the ELF QEMU got is the one the evidence names.
    entry = facts["kernel_entry"]
    assert entry["entry"] == "pvh", entry
    argv = facts["qemu_argv"]
    assert argv[argv.index("-kernel") + 1] == entry["kernel"]
    assert Path(entry["kernel"]).read_bytes()[:4] == b"\x7fELF"


@pytest.mark.lab
@needs_qemu
def test_a_command_not_found_inside_is_one_error_line(tmp_path: Path) -> None:
    result = cvmlab_lab("--quiet", "--results", str(tmp_path), "--", "no-such-command-here")
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("cvmlab: error: command not found inside the lab: no-such-command")
    assert "Traceback" not in result.stderr


@pytest.mark.lab
@needs_qemu
def test_a_kernel_panic_is_reported_with_its_console_lines(tmp_path: Path) -> None:
    script = tmp_path / "panic.sh"
    script.write_text("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger\n")
    started = time.monotonic()
    result = cvmlab_lab("--quiet", "--rw", str(tmp_path), "--results", str(tmp_path / "r"),
                        "--", "sh", str(script))  # fmt: skip
    assert result.returncode == 2
    assert "panicked in the lab: " in result.stderr
    assert "Kernel panic - not syncing" in result.stderr
    assert "sysrq" in result.stderr.lower()  # the console lines around the panic
    assert time.monotonic() - started < 600
    assert not list(Path("/tmp").glob(f"cvmlab-lab-{os.getpid()}-*"))


@pytest.mark.lab
@needs_qemu
def test_a_kernel_that_does_not_reach_the_command_in_time_is_stopped_and_named(
    tmp_path: Path,
) -> None:
    # A hung boot, made certain: no kernel gets from QEMU's start to init in 1 s under TCG.
    started = time.monotonic()
    result = cvmlab_lab("--quiet", "--boot-timeout", "1", "--results", str(tmp_path / "r"),
                        "--", "true")  # fmt: skip
    assert result.returncode == 2
    assert "did not start the lab's command within 1 s of QEMU's start (stopped)" in result.stderr
    assert "--boot-timeout" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120
    assert not list(Path("/tmp").glob(f"cvmlab-lab-{os.getpid()}-*"))


@needs_qemu
def test_a_timeout_that_is_not_positive_is_refused() -> None:
    result = cvmlab_lab("--boot-timeout", "0", "--", "true")
    assert result.returncode == 2
    assert "--boot-timeout 0 is not a positive number of seconds" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.lab
@needs_qemu
def test_killing_cvmlab_lab_stops_its_qemu(tmp_path: Path) -> None:
    results = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "lab", "--results", str(results),
         "--", "sleep", "1000"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        qemu = wait_for_child_qemu(proc.pid, deadline=time.monotonic() + 300)
        # Wait for the command to be running inside (its marker on the lab's console).
        console = next_console(results, deadline=time.monotonic() + 600)
        wait_for_text(console, "CVMLAB-LAB-RUNNING", deadline=time.monotonic() + 600)
        pidfd = os.pidfd_open(qemu)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        import select

        ready, _, _ = select.select([pidfd], [], [], 30)
        os.close(pidfd)
        assert ready, f"QEMU {qemu} outlived the SIGKILLed cvmlab lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_child_qemu(parent: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                if "qemu-system" in Path(f"/proc/{child}/cmdline").read_text():
                    return int(child)
        time.sleep(0.2)  # polling /proc: there is no event for "a child was exec'd"
    raise AssertionError("cvmlab lab started no QEMU in time")


def next_console(results: Path, deadline: float) -> Path:
    while time.monotonic() < deadline:
        found = list(results.glob("lab/*/console.log"))
        if found:
            return found[0]
        time.sleep(0.2)  # polling the file system for the evidence dir to appear
    raise AssertionError("no console.log")


def wait_for_text(path: Path, text: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)  # the console file grows as QEMU writes it
    raise AssertionError(f"{text!r} never appeared in {path}")
