"""The conversion module's build step (step_kmod) and its driver's parsing (guest.convert).

The module itself runs in a guest (scenarios/conversion_driver.py); here: its JSON as the
module prints it (lines captured from a TCG guest) becomes typed results or one clear
GuestError, and the headers for the image's kernel are found in the real archive index,
with a mismatch or a missing package refused by name before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from orchestrator.errors import GuestError, ImageError
from orchestrator.guest.convert import parse_result, request_text, skipped_at_build
from orchestrator.image.debian import PrivateApt
from orchestrator.image.kernel import KernelChoice, resolve_archive_kernel
from orchestrator.image.step_kmod import (
    _check_tree,
    _depends,
    _point_at_unpacked_common,
    kmod_packages,
    missing_compiler,
    module_vermagic,
)

# Printed by cvmlab_convert in a TCG guest (6.12.95+deb12-cloud-amd64) for
# "pages=1000 seed=24304 loops=1 chunk=7".
PLAIN_RESULT = (
    '{"error":0,"message":"ok","platform":"none","contents_after_conversion":"preserved",'
    '"pages":1000,"seed":24304,"loops":1,"chunk":7,"chunks":143,'
    '"decrypt":{"calls":143,"ok":143,"failed":0},"encrypt":{"calls":143,"ok":143,"failed":0},'
    '"preserved":{"checked_pages":2000,"mismatched_pages":0},'
    '"roundtrip":{"checked_pages":2000,"mismatched_pages":0},"first_call_error":0,'
    '"injected_failures":0,"leaked_pages":0,"leaked_pages_total":0,"elapsed_ns":26627414,"first_mismatch":null}\n'
)
REFUSED = '{"error":-22,"message":"pages=0 out of range 1..65536"}\n'
HEADERS_DEPENDS = (
    "linux-base (>= 4.12~), linux-headers-6.12.95+deb12-common (= 6.12.95-1~bpo12+1), "
    "linux-image-6.12.95+deb12-cloud-amd64 (= 6.12.95-1~bpo12+1) | "
    "linux-image-6.12.95+deb12-cloud-amd64-unsigned (= 6.12.95-1~bpo12+1), "
    "linux-kbuild-6.12.95+deb12, gcc-12"
)


# --- the driver's side -----------------------------------------------------------------


def test_module_json_becomes_a_typed_result() -> None:
    result = parse_result(PLAIN_RESULT)
    assert result.platform == "none"
    assert result.contents_after_conversion == "preserved"
    assert (result.pages, result.chunk, result.chunks, result.loops) == (1000, 7, 143, 1)
    assert result.decrypt.calls == result.encrypt.ok == result.expected_calls == 143
    assert result.all_calls_succeeded and result.contents_ok
    assert result.first_mismatch is None


def test_a_mismatch_is_reported_with_where_and_the_two_values() -> None:
    data = json.loads(PLAIN_RESULT)
    data["roundtrip"]["mismatched_pages"] = 1
    data["first_mismatch"] = {
        "check": "roundtrip-shared", "chunk": 3, "page": 1, "word": 17,
        "expected": "0x00000000deadbeef", "seen": "0x0000000000000000",
    }  # fmt: skip
    result = parse_result(json.dumps(data))
    assert not result.contents_ok
    assert result.first_mismatch is not None
    assert (result.first_mismatch.chunk, result.first_mismatch.word) == (3, 17)
    assert result.first_mismatch.expected == 0xDEADBEEF


def test_a_failed_call_counts_and_leaks_are_visible() -> None:
    data = json.loads(PLAIN_RESULT)
    data["encrypt"] = {"calls": 143, "ok": 142, "failed": 1}
    data.update(first_call_error=-5, injected_failures=1, leaked_pages=7, leaked_pages_total=7)
    result = parse_result(json.dumps(data))
    assert not result.all_calls_succeeded
    assert (result.first_call_error, result.injected_failures, result.leaked_pages) == (-5, 1, 7)


def test_a_refusal_is_a_guest_error_with_the_module_message_and_errno_name() -> None:
    with pytest.raises(GuestError, match=r"pages=0 out of range 1\.\.65536 \(EINVAL\)"):
        parse_result(REFUSED)


def test_output_that_is_not_the_module_json_is_a_guest_error() -> None:
    with pytest.raises(GuestError, match="no valid result"):
        parse_result("sh: can't create /sys/kernel/debug/cvmlab_convert/run: nonexistent\n")


def test_a_result_missing_a_count_is_a_guest_error() -> None:
    data = json.loads(PLAIN_RESULT)
    del data["encrypt"]
    with pytest.raises(GuestError, match="incomplete result"):
        parse_result(json.dumps(data))


@pytest.mark.parametrize(
    ("pages", "seed", "loops", "chunk", "bad"),
    [(0, 1, 1, 1, "pages"), (8, 1, 1, 9, "chunk"), (8, -1, 1, 1, "seed"), (8, 1, 0, 1, "loops")],
)
def test_requests_out_of_range_are_refused_before_the_guest(
    pages: int, seed: int, loops: int, chunk: int, bad: str
) -> None:
    with pytest.raises(GuestError, match=f"{bad}="):
        request_text(pages, seed, loops, chunk)


def test_request_is_one_line_of_key_value_pairs() -> None:
    assert request_text(64, 7, 3, 8) == "pages=64 seed=7 loops=3 chunk=8"
    assert request_text(8, 1, 3, 2, fail_call=4) == "pages=8 seed=1 loops=3 chunk=2 fail_call=4"


# --- the build step -----------------------------------------------------------------------


def test_headers_depends_name_the_common_tree_and_kbuild() -> None:
    names = {d.name: d.version for d in _depends(HEADERS_DEPENDS)}
    assert names["linux-headers-6.12.95+deb12-common"] == "6.12.95-1~bpo12+1"
    assert "linux-kbuild-6.12.95+deb12" in names
    # Only the first alternative of "a | b" counts.
    assert "linux-image-6.12.95+deb12-cloud-amd64-unsigned" not in names


def test_vermagic_is_read_from_modinfo_bytes() -> None:
    modinfo = b"\0license=GPL\0vermagic=6.12.95+deb12-cloud-amd64 SMP preempt mod_unload \0"
    assert module_vermagic(modinfo) == "6.12.95+deb12-cloud-amd64 SMP preempt mod_unload "
    assert module_vermagic(b"\0license=GPL\0") is None


def test_headers_tree_of_another_release_is_refused_naming_both(tmp_path: Path) -> None:
    (tmp_path / "include" / "config").mkdir(parents=True)
    (tmp_path / "include" / "config" / "kernel.release").write_text("6.12.90+deb12-cloud-amd64\n")
    with pytest.raises(ImageError) as caught:
        _check_tree(tmp_path, "6.12.95+deb12-cloud-amd64")
    assert "6.12.90+deb12-cloud-amd64" in str(caught.value)
    assert "6.12.95+deb12-cloud-amd64" in str(caught.value)


@pytest.fixture(scope="module")
def archive_kernel() -> tuple[PrivateApt, KernelChoice]:
    """The default image's kernel in bookworm-backports, from the builder's private index."""
    from orchestrator.image.builder import cache_root

    apt = PrivateApt(cache_root() / "apt" / "bookworm-backports", "bookworm-backports")
    try:
        apt.ensure_lists(False, lambda message: None)
    except ImageError as error:
        pytest.skip(f"the archive index cannot be fetched: {error}")
    return apt, resolve_archive_kernel(apt, "cloud-amd64", None)


def test_headers_common_and_kbuild_of_the_kernel_are_found(
    archive_kernel: tuple[PrivateApt, KernelChoice],
) -> None:
    apt, kernel = archive_kernel
    packages = kmod_packages(apt, kernel.package, kernel.release)
    names = [p.name for p in packages]
    assert names[0] == f"linux-headers-{kernel.release}"
    assert names[1].startswith("linux-headers-") and names[1].endswith("-common")
    assert names[2].startswith("linux-kbuild-")
    assert packages[0].version == packages[1].version == kernel.package.version


def test_headers_of_another_version_than_the_kernel_are_refused_naming_both(
    archive_kernel: tuple[PrivateApt, KernelChoice],
) -> None:
    apt, kernel = archive_kernel
    older = dataclasses.replace(kernel.package, version="6.12.0-0~fake")
    with pytest.raises(ImageError) as caught:
        kmod_packages(apt, older, kernel.release)
    assert "6.12.0-0~fake" in str(caught.value)
    assert kernel.package.version in str(caught.value)


def test_a_kernel_without_headers_in_the_suite_is_refused(
    archive_kernel: tuple[PrivateApt, KernelChoice],
) -> None:
    apt, kernel = archive_kernel
    with pytest.raises(
        ImageError, match=re.escape("has no linux-headers-6.12.0-nosuch-cloud-amd64")
    ):
        kmod_packages(apt, kernel.package, "6.12.0-nosuch-cloud-amd64")


def _kernelvariables(tree: Path, gcc: str) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    (tree / ".kernelvariables").write_text(
        "override ARCH = x86\n"
        f"CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE){gcc}\n"
        "override CROSS_COMPILE = x86_64-linux-gnu-\n"
    )


def test_a_kernel_compiler_the_host_lacks_is_named(tmp_path: Path) -> None:
    _kernelvariables(tmp_path, "gcc-99")
    assert missing_compiler(tmp_path) == "x86_64-linux-gnu-gcc-99"


def test_the_hosts_own_kernel_compiler_is_not_missing(tmp_path: Path) -> None:
    if shutil.which("x86_64-linux-gnu-gcc-12") is None:
        pytest.skip("the host has no gcc-12")
    _kernelvariables(tmp_path, "gcc-12")
    assert missing_compiler(tmp_path) is None


def test_absolute_usr_src_paths_of_debian_makefiles_point_into_the_unpacked_copy(
    tmp_path: Path,
) -> None:
    headers = tmp_path / "usr/src/linux-headers-7.2.12+deb13-cloud-amd64"
    headers.mkdir(parents=True)
    (headers / "Makefile").write_text(
        "KBUILD_OUTPUT=/usr/src/linux-headers-7.2.12+deb13-cloud-amd64\n"
        "include /usr/src/linux-headers-7.2.12+deb13-common/Makefile\n"
    )
    _point_at_unpacked_common(headers, tmp_path)
    assert (headers / "Makefile").read_text() == (
        f"KBUILD_OUTPUT={tmp_path}/usr/src/linux-headers-7.2.12+deb13-cloud-amd64\n"
        f"include {tmp_path}/usr/src/linux-headers-7.2.12+deb13-common/Makefile\n"
    )


def test_an_image_built_without_the_module_says_why(tmp_path: Path) -> None:
    reason = "kernel 7.2.12+deb13-cloud-amd64 was built with x86_64-linux-gnu-gcc-14"
    notes = {"kmods": {"cvmlab_convert": {"skipped": reason}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "build": notes}))
    assert skipped_at_build(tmp_path) == reason
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "build": {}}))
    assert skipped_at_build(tmp_path) is None
