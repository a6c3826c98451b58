"""spec_from_params: flat parameters -> MachineSpec, and one clear error per bad input."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.qemu.spec import (
    MACHINE_KEYS,
    AnonBackend,
    FileBackend,
    KernelBoot,
    MemfdBackend,
    SnpGuest,
    TdxGuest,
    spec_from_params,
    virtio_mem_follows_ram,
)
from orchestrator.units import GiB, MiB, format_size, parse_size

IMAGE_BOOT = KernelBoot(kernel="/img/vmlinuz", initrd="/img/initrd.img", cmdline="console=ttyS0")


def test_defaults_are_a_512m_anon_tcg_guest_with_ssh_and_pvpanic() -> None:
    spec = spec_from_params({}, boot=IMAGE_BOOT)
    assert spec.memory == 512 * MiB
    assert spec.accel == "tcg"
    assert spec.backend == AnonBackend(share=False)
    assert spec.ssh_forward and spec.pvpanic
    assert spec.boot == IMAGE_BOOT


def test_memfd_backend_takes_qemu_defaults_share_and_seal_on() -> None:
    spec = spec_from_params({"backend": "memfd"}, boot=IMAGE_BOOT)
    assert spec.backend == MemfdBackend(share=True, hugetlb=False, seal=True)


def test_hugetlbsize_implies_hugetlb() -> None:
    spec = spec_from_params({"backend": "memfd", "hugetlbsize": "2M"}, boot=IMAGE_BOOT)
    assert spec.backend == MemfdBackend(hugetlb=True, hugetlbsize=2 * MiB)


def test_file_backend_needs_a_mem_path() -> None:
    with pytest.raises(SpecError, match="mem_path"):
        spec_from_params({"backend": "file"}, boot=IMAGE_BOOT)
    spec = spec_from_params({"backend": "file", "mem_path": "/dev/shm"}, boot=IMAGE_BOOT)
    assert spec.backend == FileBackend(mem_path="/dev/shm")


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(SpecError, match=r"unknown memory backend 'ramfs'.*anon, memfd, file"):
        spec_from_params({"backend": "ramfs"}, boot=IMAGE_BOOT)


def test_unknown_key_suggests_the_closest_known_key() -> None:
    with pytest.raises(SpecError, match=r"memroy \(did you mean memory\?\)"):
        spec_from_params({"memroy": "1G"}, boot=IMAGE_BOOT)


def test_string_values_from_yaml_and_cli_are_parsed() -> None:
    spec = spec_from_params(
        {"memory": "1G", "smp": "2", "share": "on", "balloon": "yes"}, boot=IMAGE_BOOT
    )
    assert spec.memory == GiB and spec.smp == 2 and spec.backend.share and spec.balloon


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"memory": "lots"}, "memory 'lots' is not a size"),
        ({"smp": "two"}, "smp='two' is not a number"),
        ({"share": "maybe"}, "share='maybe' is not a boolean"),
        ({"accel": "hvf"}, "unknown accelerator 'hvf'"),
        ({"confidential": "cca"}, "unknown confidential guest type 'cca'"),
    ],
)
def test_bad_values_are_one_clear_error(params: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_params(params, boot=IMAGE_BOOT)


def test_no_boot_source_is_an_error() -> None:
    with pytest.raises(SpecError, match="no boot source"):
        spec_from_params({})


def test_kernel_and_disk_together_are_refused() -> None:
    with pytest.raises(SpecError, match="both kernel and disk"):
        spec_from_params({"kernel": "/k", "disk": "/d.qcow2"})


def test_extra_cmdline_is_appended_to_the_image_cmdline() -> None:
    spec = spec_from_params({"cmdline": "foo=1"}, boot=IMAGE_BOOT)
    assert isinstance(spec.boot, KernelBoot)
    assert spec.boot.cmdline == "console=ttyS0 foo=1"


def test_snp_and_tdx_parameters_become_confidential_objects() -> None:
    snp = spec_from_params(
        {"accel": "kvm", "confidential": "snp", "cbitpos": 51, "reduced_phys_bits": 1},
        boot=IMAGE_BOOT,
    )
    assert snp.confidential == SnpGuest(cbitpos=51, reduced_phys_bits=1, policy=0x30000)
    tdx = spec_from_params(
        {"accel": "kvm", "cpu": "host", "confidential": "tdx", "qgs_vsock_port": 4050},
        boot=IMAGE_BOOT,
    )
    assert isinstance(tdx.confidential, TdxGuest)
    qgs = tdx.confidential.quote_generation_socket
    assert qgs is not None and (qgs.type, qgs.cid, qgs.port) == ("vsock", 2, 4050)


def test_every_documented_key_is_accepted() -> None:
    # MACHINE_KEYS is what the scenario base forwards; each must parse (or fail on value, not name).
    for key in MACHINE_KEYS:
        try:
            spec_from_params({key: "1"}, boot=IMAGE_BOOT)
        except SpecError as error:
            assert "unknown machine parameter" not in str(error), key


@pytest.mark.parametrize(
    ("text", "nbytes"), [("512M", 512 * MiB), ("2G", 2 * GiB), (4096, 4096), ("1 GiB", GiB)]
)
def test_sizes_parse_like_qemu(text: str | int, nbytes: int) -> None:
    assert parse_size(text) == nbytes


def test_format_size_is_the_shortest_exact_spelling() -> None:
    assert [format_size(n) for n in (512 * MiB, 3 * GiB, 4097, 0)] == ["512M", "3G", "4097", "0"]


@pytest.mark.parametrize(
    ("params", "needs"),
    [
        ({"virtio_mem_share": "on"}, "virtio_mem_size"),
        ({"free_page_reporting": "on"}, "balloon=on"),
        ({"cbitpos": 51}, "confidential=snp"),
        ({"hugetlb": "on"}, "backend=memfd"),
    ],
)
def test_a_known_key_without_its_switch_says_what_it_needs(
    params: dict[str, object], needs: str
) -> None:
    with pytest.raises(SpecError, match=f"have no effect here: .* needs {needs}"):
        spec_from_params(params, boot=IMAGE_BOOT)


def test_json_round_trip_gives_an_equal_spec() -> None:
    import json

    from orchestrator.qemu.spec import spec_from_json, spec_to_json

    specs = [
        spec_from_params(
            {"backend": "file", "mem_path": "/dev/shm", "balloon": "on"}, boot=IMAGE_BOOT
        ),
        spec_from_params(
            {"virtio_mem_size": "1G", "virtio_mem_backend": "memfd", "trace_events": "a b"},
            boot=IMAGE_BOOT,
        ),
        spec_from_params(
            {"accel": "kvm", "confidential": "tdx", "qgs_path": "/run/qgs.sock", "firmware": "/f"},
            boot=IMAGE_BOOT,
        ),
        spec_from_params({"disk": "/d.qcow2", "confidential": "snp", "cbitpos": 51}),
    ]
    for spec in specs:
        assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_a_malformed_saved_spec_is_a_spec_error() -> None:
    from orchestrator.qemu.spec import spec_from_json

    with pytest.raises(SpecError, match="malformed"):
        spec_from_json({"boot": {"type": "kernel"}})


def test_virtio_mem_memory_follows_the_rams_backend_unless_it_names_its_own() -> None:
    shared = {"kernel": "/k", "backend": "memfd", "share": True, "virtio_mem_size": "512M"}
    spec = spec_from_params(virtio_mem_follows_ram(shared))
    assert spec.virtio_mem is not None
    assert spec.virtio_mem.backend == MemfdBackend(share=True)
    own = {**shared, "virtio_mem_backend": "anon"}
    assert virtio_mem_follows_ram(own) == own
    # Neither given: both anon, as without the mirror.
    plain = spec_from_params(virtio_mem_follows_ram({"kernel": "/k", "virtio_mem_size": "512M"}))
    assert plain.virtio_mem is not None and plain.virtio_mem.backend == AnonBackend()
