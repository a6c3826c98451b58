"""The argv builder against QEMU's documentation, the installed QEMU's property names, and a
real QEMU 10.0 that must accept what it builds.

Expected values are written from QEMU's docs (research/interfaces.md sections 1-4):
objects are compared as parsed JSON, never by key order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.qemu.argv import (
    BALLOON_ID,
    CGS_ID,
    PVPANIC_ID,
    RAM_ID,
    VMEM_BACKEND_ID,
    VMEM_DEVICE_ID,
    Plumbing,
    build_argv,
    render_run_sh,
)
from orchestrator.qemu.introspect import QemuFacts, introspect_qemu
from orchestrator.qemu.spec import (
    AnonBackend,
    Backend,
    Balloon,
    DiskBoot,
    FileBackend,
    Firmware,
    KernelBoot,
    MachineSpec,
    MemfdBackend,
    QuoteGenerationSocket,
    SnpGuest,
    TdxGuest,
    VirtioMem,
)
from orchestrator.units import GiB, MiB

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

KERNEL = KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img", cmdline="console=ttyS0")
PLUMBING = Plumbing(qmp_socket="/run/x/qmp.sock", serial="stdio")

# QEMU 11.1.3's `qom-list-properties {"typename": "tdx-guest"}` (ENVIRONMENT.md): documented
# facts, because the QEMU 10.0 here has no tdx-guest to ask.
TDX_GUEST_PROPERTIES_11_1 = frozenset(
    {
        "type",
        "quote-generation-socket",
        "mrowner",
        "mrconfigid",
        "sept-ve-disable",
        "attributes",
        "mrownerconfig",
    }
)


def spec(**changes: Any) -> MachineSpec:
    fields: dict[str, Any] = {"boot": KERNEL}
    fields.update(changes)
    return MachineSpec(**fields)


def values(argv: list[str], option: str) -> list[str]:
    """Every value given to `option`, in order."""
    return [value for opt, value in itertools.pairwise(argv) if opt == option]


def objects(argv: list[str]) -> dict[str, dict[str, Any]]:
    """-object JSON values by id."""
    parsed = [json.loads(value) for value in values(argv, "-object")]
    return {obj["id"]: obj for obj in parsed}


def device_props(value: str) -> tuple[str, dict[str, str]]:
    """`virtio-mem-pci,id=vm0,memdev=vmem0` -> ("virtio-mem-pci", {"id": "vm0", ...})."""
    driver, *items = value.split(",")
    return driver, dict(item.split("=", 1) for item in items)


def devices(argv: list[str]) -> dict[str, dict[str, str]]:
    return dict(device_props(value) for value in values(argv, "-device"))


# --- memory backends ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (AnonBackend(share=False), {"qom-type": "memory-backend-ram", "share": False}),
        (AnonBackend(share=True), {"qom-type": "memory-backend-ram", "share": True}),
        (MemfdBackend(), {"qom-type": "memory-backend-memfd", "share": True, "seal": True}),
        (
            MemfdBackend(share=False, seal=False),
            {"qom-type": "memory-backend-memfd", "share": False, "seal": False},
        ),
        (
            MemfdBackend(hugetlb=True),
            {"qom-type": "memory-backend-memfd", "share": True, "seal": True, "hugetlb": True},
        ),
        (
            MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB, seal=False),
            {
                "qom-type": "memory-backend-memfd",
                "share": True,
                "seal": False,
                "hugetlb": True,
                "hugetlbsize": 2 * MiB,
            },
        ),
        (
            FileBackend(mem_path="/dev/shm/guest,ram", discard_data=True),
            {
                "qom-type": "memory-backend-file",
                "mem-path": "/dev/shm/guest,ram",
                "share": True,
                "discard-data": True,
            },
        ),
        (
            FileBackend(mem_path="/var/tmp/g", share=False),
            {
                "qom-type": "memory-backend-file",
                "mem-path": "/var/tmp/g",
                "share": False,
                "discard-data": False,
            },
        ),
    ],
    ids=[
        "anon",
        "anon-shared",
        "memfd",
        "memfd-private-unsealed",
        "memfd-hugetlb",
        "memfd-hugetlbsize",
        "file-discard-data",
        "file-private",
    ],
)
def test_guest_ram_backend_object(backend: Backend, expected: dict[str, Any]) -> None:
    argv = build_argv(spec(backend=backend), PLUMBING)
    assert objects(argv)[RAM_ID] == {"id": RAM_ID, "size": 512 * MiB, **expected}
    assert values(argv, "-machine") == [f"q35,memory-backend={RAM_ID}"]
    assert values(argv, "-m") == ["512M"]


def test_accel_cpu_smp_and_tsc_frequency() -> None:
    argv = build_argv(spec(accel="kvm", cpu="host", smp=4, tsc_frequency=2_500_000_000), PLUMBING)
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-cpu") == ["host,tsc-frequency=2500000000"]
    assert values(argv, "-smp") == ["4"]


def test_tcg_guests_go_without_fast_string_features_unless_the_spec_names_them() -> None:
    # TCG emulates rep movsb/stosb one iteration at a time (argv.TCG_CPU_FEATURES_OFF).
    assert values(build_argv(spec(), PLUMBING), "-cpu") == ["max,erms=off,fsrm=off"]
    named = build_argv(spec(cpu="max,erms=on,-fsrm"), PLUMBING)
    assert values(named, "-cpu") == ["max,erms=on,-fsrm"]
    assert values(build_argv(spec(accel="kvm", cpu="max"), PLUMBING), "-cpu") == ["max"]


# --- devices ----------------------------------------------------------------------------


def test_balloon_device_with_free_page_reporting() -> None:
    argv = build_argv(spec(balloon=Balloon(free_page_reporting=True)), PLUMBING)
    assert devices(argv)["virtio-balloon-pci"] == {
        "id": BALLOON_ID,
        "free-page-reporting": "on",
        "deflate-on-oom": "off",
    }


def test_virtio_mem_as_in_qemu_docs() -> None:
    # docs: -m 4G,maxmem=36G -object memory-backend-ram,id=vmem0,size=32G
    #       -device virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0,block-size=2M
    vmem = VirtioMem(size=32 * GiB, requested_size=0, block_size=2 * MiB)
    argv = build_argv(spec(memory=4 * GiB, virtio_mem=vmem), PLUMBING)
    assert values(argv, "-m") == ["4G,maxmem=36G"]
    assert objects(argv)[VMEM_BACKEND_ID] == {
        "qom-type": "memory-backend-ram",
        "id": VMEM_BACKEND_ID,
        "size": 32 * GiB,
        "share": False,
    }
    assert devices(argv)["virtio-mem-pci"] == {
        "id": VMEM_DEVICE_ID,
        "memdev": VMEM_BACKEND_ID,
        "requested-size": "0",
        "block-size": "2M",
    }


def test_virtio_mem_with_its_own_memfd_backend() -> None:
    vmem = VirtioMem(size=1 * GiB, requested_size=256 * MiB, backend=MemfdBackend())
    argv = build_argv(spec(virtio_mem=vmem), PLUMBING)
    assert objects(argv)[VMEM_BACKEND_ID]["qom-type"] == "memory-backend-memfd"
    assert devices(argv)["virtio-mem-pci"]["requested-size"] == "256M"
    assert "block-size" not in devices(argv)["virtio-mem-pci"]


def test_pvpanic_is_on_by_default_and_can_be_left_out() -> None:
    assert devices(build_argv(spec(), PLUMBING))["pvpanic-pci"] == {"id": PVPANIC_ID}
    assert "pvpanic-pci" not in devices(build_argv(spec(pvpanic=False), PLUMBING))


def test_ssh_forward_binds_loopback_with_a_port_qemu_picks() -> None:
    argv = build_argv(spec(), PLUMBING)
    assert values(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:0-:22"]
    assert devices(argv)["virtio-net-pci"] == {"netdev": "net0", "romfile": ""}
    assert "-netdev" not in build_argv(spec(ssh_forward=False), PLUMBING)


# --- boot and firmware ---------------------------------------------------------------------


def test_kernel_boot() -> None:
    argv = build_argv(spec(), PLUMBING)
    assert values(argv, "-kernel") == ["/img/vmlinuz"]
    assert values(argv, "-initrd") == ["/img/initrd.img"]
    assert values(argv, "-append") == ["console=ttyS0"]
    assert "-drive" not in argv and "-bios" not in argv


def test_disk_boot_is_a_snapshot_and_escapes_commas() -> None:
    argv = build_argv(spec(boot=DiskBoot(disk="/lab/a,b.qcow2")), PLUMBING)
    assert values(argv, "-drive") == ["if=virtio,format=qcow2,snapshot=on,file=/lab/a,,b.qcow2"]
    assert "-kernel" not in argv


def test_bios_firmware() -> None:
    boot = KernelBoot(kernel="/k", firmware=Firmware(path="/fw/OVMF.fd"))
    argv = build_argv(spec(boot=boot), PLUMBING)
    assert values(argv, "-bios") == ["/fw/OVMF.fd"]


def test_pflash_firmware_with_a_writable_vars_copy() -> None:
    firmware = Firmware(path="/fw/CODE.fd", interface="pflash", vars_path="/run/VARS.fd")
    argv = build_argv(spec(boot=DiskBoot(disk="/d.qcow2", firmware=firmware)), PLUMBING)
    assert values(argv, "-drive")[:2] == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd",
        "if=pflash,format=raw,unit=1,file=/run/VARS.fd",
    ]
    assert "-bios" not in argv


# --- confidential guests ------------------------------------------------------------------------


def test_snp_object_as_in_qemu_docs() -> None:
    # docs: -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1
    snp = SnpGuest(cbitpos=51, reduced_phys_bits=1)
    argv = build_argv(spec(accel="kvm", confidential=snp), PLUMBING)
    assert objects(argv)[CGS_ID] == {
        "qom-type": "sev-snp-guest",
        "id": CGS_ID,
        "cbitpos": 51,
        "reduced-phys-bits": 1,
        "policy": 0x30000,
    }
    assert values(argv, "-machine") == [
        f"q35,memory-backend={RAM_ID},confidential-guest-support={CGS_ID}"
    ]


def test_snp_object_with_every_optional_property() -> None:
    snp = SnpGuest(
        cbitpos=51,
        reduced_phys_bits=1,
        policy=0x30000,
        kernel_hashes=True,
        author_key_enabled=True,
        vcek_disabled=False,
        guest_visible_workarounds="A" * 24,
        id_block="B" * 128,
        id_auth="C" * 5464,
        host_data="D" * 44,
    )
    obj = objects(build_argv(spec(accel="kvm", confidential=snp), PLUMBING))[CGS_ID]
    assert obj["kernel-hashes"] is True
    assert obj["author-key-enabled"] is True  # not "auth-key-enabled" (interfaces.md 8.7)
    assert obj["vcek-disabled"] is False
    assert obj["host-data"] == "D" * 44  # not "host_data"
    assert {"guest-visible-workarounds", "id-block", "id-auth"} <= set(obj)


def test_tdx_object_with_vsock_quote_socket_as_in_qemu_docs() -> None:
    # docs: '{"qom-type":"tdx-guest","id":"tdx0","quote-generation-socket":
    #         {"type":"vsock","cid":"2","port":"4050"}}'
    qgs = QuoteGenerationSocket(type="vsock", cid=2, port=4050)
    tdx = TdxGuest(quote_generation_socket=qgs)
    argv = build_argv(spec(accel="kvm", cpu="host", confidential=tdx), PLUMBING)
    assert objects(argv)[CGS_ID] == {
        "qom-type": "tdx-guest",
        "id": CGS_ID,
        "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"},
    }
    assert values(argv, "-machine") == [
        f"q35,memory-backend={RAM_ID},confidential-guest-support={CGS_ID},kernel-irqchip=split"
    ]


def test_tdx_object_with_unix_quote_socket_and_measurements() -> None:
    digest = "A" * 64  # base64 of 48 bytes
    qgs = QuoteGenerationSocket(type="unix", path="/var/run/tdx-qgs/qgs.socket")
    tdx = TdxGuest(
        attributes=0x10000000,
        sept_ve_disable=True,
        mrconfigid=digest,
        mrowner=digest,
        mrownerconfig=digest,
        quote_generation_socket=qgs,
    )
    obj = objects(build_argv(spec(accel="kvm", cpu="host", confidential=tdx), PLUMBING))[CGS_ID]
    assert obj == {
        "qom-type": "tdx-guest",
        "id": CGS_ID,
        "attributes": 0x10000000,
        "sept-ve-disable": True,
        "mrconfigid": digest,
        "mrowner": digest,
        "mrownerconfig": digest,
        "quote-generation-socket": {"type": "unix", "path": "/var/run/tdx-qgs/qgs.socket"},
    }


# --- channels ------------------------------------------------------------------------------------


def test_qmp_serial_and_trace_channels() -> None:
    plumbing = Plumbing(qmp_socket="/run/a,b/qmp.sock", serial="/run/x/serial.log", trace_file="/t")
    argv = build_argv(spec(trace_events=("kvm_convert_memory", "virtio_mem_*")), plumbing)
    assert values(argv, "-chardev") == [
        "socket,id=qmp0,path=/run/a,,b/qmp.sock,server=on,wait=off",
        "file,id=serial0,path=/run/x/serial.log",
    ]
    assert values(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert values(argv, "-trace") == ["enable=kvm_convert_memory", "enable=virtio_mem_*"]
    assert values(argv, "-D") == ["/t"]


# --- property names the installed QEMU reports ----------------------------------------------------

SPECS_FOR_PROPERTY_NAMES = {
    "anon": spec(backend=AnonBackend(share=True)),
    "memfd-hugetlb": spec(backend=MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB, seal=False)),
    "file": spec(backend=FileBackend(mem_path="/dev/shm/g", discard_data=True)),
    "devices": spec(
        balloon=Balloon(free_page_reporting=True, deflate_on_oom=True),
        virtio_mem=VirtioMem(size=1 * GiB, block_size=2 * MiB, backend=MemfdBackend()),
    ),
    "snp": spec(
        accel="kvm",
        confidential=SnpGuest(
            cbitpos=51,
            reduced_phys_bits=1,
            kernel_hashes=True,
            author_key_enabled=False,
            vcek_disabled=False,
            guest_visible_workarounds="A" * 24,
            id_block="B" * 128,
            id_auth="C" * 5464,
            host_data="D" * 44,
        ),
    ),
}


def used_properties(argv: list[str]) -> dict[str, set[str]]:
    """QOM type -> property names set on -object and -device (ids excluded)."""
    used: dict[str, set[str]] = {}
    for obj in objects(argv).values():
        used.setdefault(obj["qom-type"], set()).update(set(obj) - {"qom-type", "id"})
    for value in values(argv, "-device"):
        driver, props = device_props(value)
        used.setdefault(driver, set()).update(set(props) - {"id"})
    return used


@pytest.fixture(scope="module")
def installed() -> QemuFacts:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return introspect_qemu(use_cache=False)


@pytest.mark.parametrize("name", sorted(SPECS_FOR_PROPERTY_NAMES))
def test_generated_properties_exist_in_the_installed_qemu(name: str, installed: QemuFacts) -> None:
    used = used_properties(build_argv(SPECS_FOR_PROPERTY_NAMES[name], PLUMBING))
    assert used, "the spec set no properties: the test would prove nothing"
    for qom_type, props in used.items():
        assert qom_type in installed.properties, f"{installed.describe()} has no {qom_type}"
        unknown = props - installed.property_names(qom_type)
        assert not unknown, f"{qom_type}: {sorted(unknown)} unknown to {installed.describe()}"


def test_generated_tdx_properties_match_qemu_11_1_documented_list() -> None:
    """Documented facts (ENVIRONMENT.md, QEMU 11.1.3): QEMU 10.0 here has no tdx-guest."""
    digest = "A" * 64
    tdx = TdxGuest(
        attributes=0x10000000,
        sept_ve_disable=True,
        mrconfigid=digest,
        mrowner=digest,
        mrownerconfig=digest,
        quote_generation_socket=QuoteGenerationSocket(type="vsock", cid=2, port=4050),
    )
    used = used_properties(build_argv(spec(accel="kvm", cpu="host", confidential=tdx), PLUMBING))
    assert used["tdx-guest"] == TDX_GUEST_PROPERTIES_11_1 - {"type"}


# --- a real QEMU accepts what we build ----------------------------------------------------------


def free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def rundir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cvmlab-"))
    path.chmod(0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _qmp_answers(
    sock: Path, proc: subprocess.Popen[bytes], deadline: float
) -> dict[str, Any]:
    from qemu.qmp import ConnectError, QMPClient

    client = QMPClient("test-argv")
    # The socket appears once QEMU has parsed its options: wait for it or for QEMU to exit.
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with status {proc.returncode} before QMP")
        if time.monotonic() > deadline:
            raise AssertionError("QEMU's QMP socket did not answer before the deadline")
        try:
            await client.connect(str(sock))
            break
        except ConnectError:
            await asyncio.sleep(0.01)  # poll interval for the condition above, not a sync point
    try:
        answers = {
            "memdev": await client.execute("query-memdev"),
            "ram-type": await client.execute(
                "qom-get", {"path": f"/objects/{RAM_ID}", "property": "type"}
            ),
            "memory-devices": await client.execute("query-memory-devices"),
            "peripherals": await client.execute("qom-list", {"path": "/machine/peripheral"}),
        }
        for prop in ("seal", "hugetlb", "mem-path", "discard-data"):
            try:
                answers[prop] = await client.execute(
                    "qom-get", {"path": f"/objects/{RAM_ID}", "property": prop}
                )
            except Exception:  # the property belongs to another backend type
                continue
        await client.execute("quit")
        return answers
    finally:
        # QEMU closes the socket after quit: the reader's EOFError is expected.
        with contextlib.suppress(EOFError):
            await client.disconnect()


def start_paused(machine: MachineSpec, rundir: Path) -> dict[str, Any]:
    """Start QEMU with -S on `machine`'s argv, ask QMP about its memory, quit it."""
    assert QEMU is not None
    plumbing = Plumbing(qmp_socket=str(rundir / "qmp.sock"), serial=str(rundir / "serial.log"))
    argv = [*build_argv(machine, plumbing, QEMU), "-S"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            deadline = time.monotonic() + 20
            answers = asyncio.run(
                asyncio.wait_for(_qmp_answers(rundir / "qmp.sock", proc, deadline), 25)
            )
            assert proc.wait(timeout=10) == 0
        except BaseException:
            stderr.seek(0)
            print(stderr.read().decode(errors="replace"))
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return answers


def disk_boot(rundir: Path) -> DiskBoot:
    # A paused machine never reads its disk: an empty raw image is enough.
    disk = rundir / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    return DiskBoot(disk=str(disk), disk_format="raw")


ACCEPTANCE_BACKENDS: dict[str, Backend] = {
    "anon": AnonBackend(),
    "anon-shared": AnonBackend(share=True),
    "memfd": MemfdBackend(),
    "memfd-unsealed-private": MemfdBackend(share=False, seal=False),
}


@needs_qemu
@pytest.mark.parametrize("name", sorted(ACCEPTANCE_BACKENDS))
def test_real_qemu_accepts_backend(name: str, rundir: Path) -> None:
    backend = ACCEPTANCE_BACKENDS[name]
    machine = spec(boot=disk_boot(rundir), memory=256 * MiB, backend=backend)
    answers = start_paused(machine, rundir)
    (memdev,) = [m for m in answers["memdev"] if m["id"] == RAM_ID]
    assert memdev["size"] == 256 * MiB
    assert memdev["share"] is backend.share
    expected_type = (
        "memory-backend-ram" if isinstance(backend, AnonBackend) else "memory-backend-memfd"
    )
    assert answers["ram-type"] == expected_type
    if isinstance(backend, MemfdBackend):
        assert answers["seal"] is backend.seal
        assert answers["hugetlb"] is False


@needs_qemu
def test_real_qemu_accepts_file_backend_with_discard_data(rundir: Path) -> None:
    backing = rundir / "guest-ram"
    backend = FileBackend(mem_path=str(backing), discard_data=True)
    answers = start_paused(spec(boot=disk_boot(rundir), memory=128 * MiB, backend=backend), rundir)
    assert answers["ram-type"] == "memory-backend-file"
    assert answers["mem-path"] == str(backing)
    assert answers["discard-data"] is True
    assert backing.stat().st_size == 128 * MiB  # QEMU sized the file it mapped


@needs_qemu
@pytest.mark.skipif(free_hugepages() < 64, reason="the host has no free 2 MiB huge pages reserved")
def test_real_qemu_accepts_hugetlb_memfd(rundir: Path) -> None:
    backend = MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB)
    answers = start_paused(spec(boot=disk_boot(rundir), memory=128 * MiB, backend=backend), rundir)
    assert answers["hugetlb"] is True


@needs_qemu
def test_real_qemu_accepts_balloon_virtio_mem_and_pvpanic(rundir: Path) -> None:
    vmem = VirtioMem(size=512 * MiB, requested_size=128 * MiB, block_size=2 * MiB)
    machine = spec(
        boot=disk_boot(rundir),
        memory=256 * MiB,
        balloon=Balloon(free_page_reporting=True),
        virtio_mem=vmem,
    )
    answers = start_paused(machine, rundir)
    (device,) = answers["memory-devices"]
    assert device["type"] == "virtio-mem"
    assert device["data"]["memdev"] == f"/objects/{VMEM_BACKEND_ID}"
    assert device["data"]["requested-size"] == 128 * MiB
    assert device["data"]["block-size"] == 2 * MiB
    peripherals = {p["name"] for p in answers["peripherals"]}
    assert {VMEM_DEVICE_ID, BALLOON_ID, PVPANIC_ID} <= peripherals


# --- run.sh --------------------------------------------------------------------------------------

RUN_SH_SPECS = {
    "plain": spec(),
    "awkward-paths": spec(
        boot=KernelBoot(
            kernel="/img/it's here/vmlinuz",
            initrd="/img/a b/initrd.img",
            cmdline='console=ttyS0 quiet "x=$HOME" `id`',
        ),
        backend=FileBackend(mem_path="/dev/shm/a,b c"),
    ),
    "tdx": spec(
        accel="kvm",
        cpu="host",
        boot=KernelBoot(kernel="/k", firmware=Firmware(path="/fw/OVMF.inteltdx.fd")),
        confidential=TdxGuest(
            quote_generation_socket=QuoteGenerationSocket(type="vsock", cid=2, port=4050)
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(RUN_SH_SPECS))
def test_run_sh_passes_sh_n(name: str, tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(RUN_SH_SPECS[name], header="reproducer\nline two"))
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sh_n_would_catch_a_broken_script(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(spec()) + "exec 'unterminated\n")
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode != 0


@pytest.mark.parametrize("name", sorted(RUN_SH_SPECS))
def test_run_sh_runs_exactly_the_built_argv(name: str, tmp_path: Path) -> None:
    """Run the script with a stand-in QEMU that prints its arguments: the shell's quoting
    must hand over every argument byte for byte."""
    fake_qemu = tmp_path / "fake-qemu"
    fake_qemu.write_text('#!/bin/sh\nfor arg in "$@"; do printf "%s\\0" "$arg"; done\n')
    fake_qemu.chmod(0o755)
    script = tmp_path / "run.sh"
    script.write_text(render_run_sh(RUN_SH_SPECS[name], binary=str(fake_qemu)))
    rundir = tmp_path / "run dir"
    rundir.mkdir()
    result = subprocess.run(
        ["sh", str(script)],
        capture_output=True,
        env={**os.environ, "RUNDIR": str(rundir)},
        check=True,
    )
    printed = result.stdout.decode().split("\0")[:-1]
    expected = build_argv(
        RUN_SH_SPECS[name], Plumbing(qmp_socket=f"{rundir}/qmp.sock", serial="stdio")
    )[1:]
    assert printed == expected
