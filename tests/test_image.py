"""The guest image builder: cpio writer, module selection, cache, manifest, and a real boot.

Tests that need the default image build it on first use (a cold build downloads the
kernel, ~34 MB) and reuse it afterwards; the boot test runs the raw boot-and-poweroff
cycle under TCG, the floor the orchestrator's own boot cycle is compared against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.archive_mirror import MIRROR_ENV
from orchestrator.errors import ImageError
from orchestrator.image import (
    BuildContext,
    ImageManifest,
    build_image,
    default_image,
    load_manifest,
    verify_image,
)
from orchestrator.image.builder import (
    UNUSED_PRUNE_S,
    apt_for_suite,
    cache_root,
    prune_unused_images,
    run_command_step,
)
from orchestrator.image.cpio import CpioArchive
from orchestrator.image.debian import host_package_versions, sha256_file
from orchestrator.image.kernel import bzimage_release, module_name, select_modules
from orchestrator.image.recipe import images_root, load_recipe

REPO = Path(__file__).resolve().parents[1]
BOOT_DEADLINE_S = 60
# What a kernel prints when something went wrong (the guest log must have none of these).
BAD_CONSOLE = re.compile(r"WARNING:|BUG:|Oops|Kernel panic|Call Trace|cvmlab-init:")


@pytest.fixture(scope="module")
def image() -> ImageManifest:
    return default_image(progress=lambda _message: None)


@pytest.fixture
def image_copy(image: ImageManifest, tmp_path: Path) -> ImageManifest:
    """A copy of the default image's directory, safe to damage."""
    copy = tmp_path / image.directory.name
    shutil.copytree(image.directory, copy)
    return load_manifest(copy)


# --------------------------------------------------------------------------- cpio


def test_cpio_archive_extracts_with_real_cpio_keeping_modes_and_contents(tmp_path: Path) -> None:
    archive = CpioArchive()
    archive.add_directory("/root", 0o700)
    archive.add_directory("/tmp", 0o1777)
    archive.add_file("/root/.ssh/authorized_keys", b"ssh-ed25519 AAAA test\n", 0o600)
    archive.add_file("/init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_file("/empty", b"", 0o644)
    archive.add_file("/odd", b"x" * 4097, 0o640)  # a size that needs padding
    archive.add_symlink("/bin/sh", "busybox")
    image = tmp_path / "initrd.cpio"
    with image.open("wb") as stream:
        written = archive.write(stream)
    assert written == image.stat().st_size and written % 512 == 0

    out = tmp_path / "out"
    out.mkdir()
    with image.open("rb") as stream:
        subprocess.run(
            ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
            stdin=stream,
            cwd=out,
            check=True,
            timeout=30,
        )
    expected_modes = {
        "root": stat.S_IFDIR | 0o700,
        "tmp": stat.S_IFDIR | 0o1777,
        "root/.ssh": stat.S_IFDIR | 0o755,  # created implicitly
        "root/.ssh/authorized_keys": stat.S_IFREG | 0o600,
        "init": stat.S_IFREG | 0o755,
        "empty": stat.S_IFREG | 0o644,
        "odd": stat.S_IFREG | 0o640,
        "bin/sh": stat.S_IFLNK | 0o777,
    }
    for path, mode in expected_modes.items():
        assert (out / path).lstat().st_mode == mode, path
    assert (out / "root/.ssh/authorized_keys").read_bytes() == b"ssh-ed25519 AAAA test\n"
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"x" * 4097
    assert os.readlink(out / "bin/sh") == "busybox"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create device nodes with cpio")
def test_cpio_device_node_extracts_as_a_character_device(tmp_path: Path) -> None:
    archive = CpioArchive()
    archive.add_char_device("/dev/console", 5, 1, 0o600)
    image = tmp_path / "dev.cpio"
    with image.open("wb") as stream:
        archive.write(stream)
    out = tmp_path / "out"
    out.mkdir()
    with image.open("rb") as stream:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=stream, cwd=out, check=True, timeout=30)
    console = (out / "dev/console").lstat()
    assert stat.S_ISCHR(console.st_mode) and stat.S_IMODE(console.st_mode) == 0o600
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)


def test_cpio_refuses_a_path_that_leaves_the_archive_root() -> None:
    with pytest.raises(ValueError, match="bad archive path"):
        CpioArchive().add_file("/etc/../../x", b"")


def test_cpio_refuses_a_file_where_a_directory_is_needed() -> None:
    archive = CpioArchive()
    archive.add_file("/etc", b"not a directory")
    with pytest.raises(ValueError, match="to be a directory"):
        archive.add_file("/etc/passwd", b"")


# --------------------------------------------------------------------------- modules


def _modules_dir(tmp_path: Path) -> Path:
    """A modules dir shaped like Debian's: virtio_net needs net_failover, which needs failover."""
    modules = tmp_path / "6.0.0-test"
    modules.mkdir()
    (modules / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz "
        "kernel/net/core/failover.ko.xz\n"
        "kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n"
        "kernel/net/core/failover.ko.xz:\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko.xz:\n"
        "kernel/drivers/virt/coco/tsm.ko.xz:\n"
        "kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko.xz: kernel/drivers/virt/coco/tsm.ko.xz\n"
    )
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_balloon.ko\n")
    return modules


def test_module_selection_loads_dependencies_first(tmp_path: Path) -> None:
    selection = select_modules(_modules_dir(tmp_path), ["virtio_net"], ["virtio_rng"], [])
    assert [module_name(p) for p in selection.load] == [
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_rng",
    ]


def test_module_selection_skips_builtin_and_absent_optional_modules(tmp_path: Path) -> None:
    selection = select_modules(
        _modules_dir(tmp_path), ["virtio_balloon"], ["pvpanic_pci"], ["tdx_guest"]
    )
    assert selection.load == ()
    assert selection.builtin == ("virtio_balloon",)
    assert selection.absent == ("pvpanic_pci",)
    # On-demand modules are shipped with their dependencies but not loaded.
    assert [module_name(p) for p in selection.ship] == ["tsm", "tdx_guest"]


def test_a_missing_boot_module_is_an_image_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no module 'virtio_mem'"):
        select_modules(_modules_dir(tmp_path), ["virtio_mem"], [], [])


def test_bzimage_release_is_read_from_the_setup_header(image: ImageManifest) -> None:
    assert bzimage_release(image.kernel) == image.kernel_release


def test_a_file_that_is_no_bzimage_is_an_image_error(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageError, match="not a bzImage"):
        bzimage_release(bogus)


# --------------------------------------------------------------------------- bad input


def test_vmlinuz_without_modules_dir_is_an_image_error(image: ImageManifest) -> None:
    with pytest.raises(ImageError, match="--vmlinuz and --modules-dir go together"):
        build_image(vmlinuz=image.kernel)


def test_a_vmlinuz_that_does_not_exist_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        build_image(vmlinuz=tmp_path / "nope", modules_dir=tmp_path)


def test_an_unknown_kernel_version_lists_the_versions_the_suite_has(image: ImageManifest) -> None:
    with pytest.raises(ImageError) as info:
        build_image(kernel_version="1.2.3", progress=lambda _message: None)
    assert "no cloud-amd64 kernel '1.2.3'" in info.value.problem
    assert image.kernel_release in info.value.fix


def test_an_unreachable_archive_is_an_image_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    mirror = "http://127.0.0.1:9/debian"
    monkeypatch.setenv(MIRROR_ENV, mirror)
    with pytest.raises(ImageError) as info:
        build_image(progress=lambda _message: None)
    assert f"cannot fetch the package index of bookworm-backports from {mirror}" in str(info.value)
    assert mirror in info.value.fix
    # A mirror that never answered leaves no apt state behind.
    assert not (cache_root() / "apt" / apt_for_suite("bookworm-backports").root.name).exists()


def test_a_recipe_mirror_overrides_the_hosts(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipe"
    shutil.copytree(images_root() / "minimal", recipe_dir)
    mirror = "http://127.0.0.1:9/debian"
    text = (recipe_dir / "recipe.yaml").read_text()
    (recipe_dir / "recipe.yaml").write_text(
        text.replace("kernel:\n", f"kernel:\n  mirror: {mirror}\n", 1)
    )
    with pytest.raises(ImageError) as info:
        build_image(str(recipe_dir), progress=lambda _message: None)
    assert f"from {mirror}" in str(info.value)


def test_a_missing_host_package_is_named_with_the_setup_script() -> None:
    with pytest.raises(ImageError) as info:
        host_package_versions(["busybox-static", "cvmlab-no-such-package"])
    assert "cvmlab-no-such-package is not installed" in info.value.problem
    assert "ci/setup-host.sh" in info.value.fix


def test_an_unknown_restored_clock_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipe"
    shutil.copytree(images_root() / "minimal", recipe_dir)
    text = (recipe_dir / "recipe.yaml").read_text()
    assert "\nrestored_clock: rtc\n" in text  # the default image's guest sets its own
    recipe_file = recipe_dir / "recipe.yaml"
    recipe_file.write_text(text.replace("restored_clock: rtc", "restored_clock: ntp"))
    with pytest.raises(ImageError) as info:
        load_recipe(str(recipe_dir))
    assert "restored_clock 'ntp' unknown" in info.value.problem
    assert "'ssh', 'rtc'" in info.value.fix
    # Without the key, cvmlab sets a restored guest's clock over SSH.
    (recipe_dir / "recipe.yaml").write_text(text.replace("restored_clock: rtc\n", ""))
    assert load_recipe(str(recipe_dir)).restored_clock == "ssh"


def test_a_manifest_without_restored_clock_means_ssh_and_a_bad_one_is_refused(
    image_copy: ImageManifest,
) -> None:
    assert image_copy.restored_clock == "rtc"
    path = image_copy.directory / "manifest.json"
    data = json.loads(path.read_text())
    del data["restored_clock"]  # written before the field existed
    path.write_text(json.dumps(data))
    assert load_manifest(image_copy.directory).restored_clock == "ssh"
    data["restored_clock"] = "guess"
    path.write_text(json.dumps(data))
    with pytest.raises(ImageError) as info:
        load_manifest(image_copy.directory)
    assert "restored_clock 'guess' unknown" in info.value.problem


def test_an_unknown_recipe_names_the_ones_that_exist() -> None:
    with pytest.raises(ImageError) as info:
        load_recipe("no-such-recipe")
    assert "minimal" in info.value.fix


# --------------------------------------------------------------------------- cache, manifest


def test_a_second_build_with_the_same_inputs_is_a_cache_hit(image: ImageManifest) -> None:
    messages: list[str] = []
    again = default_image(progress=messages.append)
    assert again == image
    assert f"cache hit {image.directory.name}" in messages
    assert not any(m.startswith(("built ", "downloading ", "writing initrd")) for m in messages)


def test_the_image_directory_is_named_by_recipe_and_hash_in_the_cache(image: ImageManifest) -> None:
    assert image.directory.parent == cache_root() / "images"
    assert re.fullmatch(r"minimal-[0-9a-f]{12}", image.directory.name)
    assert stat.S_IMODE(image.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(image.ssh_key.stat().st_mode) == 0o600


def test_the_manifest_hashes_match_the_files(image: ImageManifest) -> None:
    assert set(image.outputs) >= {"vmlinuz", "initrd.img", "id_ed25519", "id_ed25519.pub"}
    for name, digest in image.outputs.items():
        assert sha256_file(image.directory / name) == digest, name
    recipe_dir = images_root() / "minimal"
    recipe_inputs = {k: v for k, v in image.inputs.items() if k.startswith("recipe/")}
    assert "recipe/recipe.yaml" in recipe_inputs and "recipe/init" in recipe_inputs
    for name, digest in recipe_inputs.items():
        assert sha256_file(recipe_dir / name.removeprefix("recipe/")) == digest, name
    for name, digest in image.inputs.items():
        if name.startswith("deb/"):
            deb = cache_root() / "debs" / name.removeprefix("deb/")
            assert sha256_file(deb) == digest, name


def test_the_manifest_records_exact_package_versions(image: ImageManifest) -> None:
    kernel_package = f"linux-image-{image.kernel_release}"
    for package in (kernel_package, "busybox-static", "dropbear-bin", "openssh-sftp-server"):
        assert re.match(r"^[0-9:]*[0-9][\w.+~:-]*$", image.packages[package]), package
    assert image.host_key.startswith("ssh-ed25519 AAAA")
    public = (image.directory / "id_ed25519.pub").read_text().split()
    assert public[0] == "ssh-ed25519"


def test_verify_image_names_an_output_whose_hash_changed(image_copy: ImageManifest) -> None:
    verify_image(image_copy)
    with image_copy.initrd.open("r+b") as stream:
        stream.seek(100)
        byte = stream.read(1)
        stream.seek(100)
        stream.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ImageError, match=r"initrd\.img changed"):
        verify_image(image_copy)


def test_verify_image_refuses_a_key_readable_by_others(image_copy: ImageManifest) -> None:
    image_copy.ssh_key.chmod(0o644)
    with pytest.raises(ImageError, match="mode 0644, wider than 0600"):
        verify_image(image_copy)


def test_concurrent_builds_of_one_image_build_it_once(tmp_path: Path) -> None:
    """Two processes build a new image at once: one builds, the other waits and reuses it."""
    recipe_dir = tmp_path / "recipe"
    shutil.copytree(images_root() / "minimal", recipe_dir)
    text = (recipe_dir / "recipe.yaml").read_text()
    (recipe_dir / "recipe.yaml").write_text(text.split("\nsteps:")[0] + "\nsteps: []\n")
    (recipe_dir / "etc" / "unique").write_text(uuid.uuid4().hex)  # a new image hash
    code = (
        "import sys; from orchestrator.image import build_image; "
        "print(build_image(sys.argv[1]).directory)"
    )
    argv = [sys.executable, "-c", code, str(recipe_dir)]
    workers = [
        subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=300)
            results.append((worker.returncode, out.strip(), err))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    directories = {out for _, out, _ in results}
    try:
        assert [rc for rc, _, _ in results] == [0, 0], results
        assert len(directories) == 1
        logs = [err for _, _, err in results]
        assert sum("image: built minimal-" in log for log in logs) == 1, logs
        assert sum("image: cache hit minimal-" in log for log in logs) == 1, logs
        assert not list(Path(directories.pop()).parent.glob(".build-*")), "temp dir left"
    finally:
        for directory in directories:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)


def test_a_build_prunes_images_of_its_recipe_unused_for_days(tmp_path: Path) -> None:
    images = tmp_path / "images"
    old, recent, other, new = (
        images / name
        for name in (
            "minimal-aaaaaaaaaaaa",
            "minimal-bbbbbbbbbbbb",
            "kmod-cccccccccccc",
            "minimal-d",
        )
    )
    for directory in (old, recent, other, new):
        directory.mkdir(parents=True)
    long_ago = time.time() - UNUSED_PRUNE_S - 60
    for directory in (old, other):
        os.utime(directory, (long_ago, long_ago))
    messages: list[str] = []
    prune_unused_images(images, new, messages.append)
    assert not old.exists()
    assert recent.exists() and other.exists() and new.exists()
    assert messages == ["pruned minimal-aaaaaaaaaaaa (unused for 3 days)"]


def test_a_command_step_installs_what_it_produced(tmp_path: Path) -> None:
    ctx = BuildContext(
        recipe=load_recipe("minimal"),
        archive=CpioArchive(),
        work=tmp_path,
        kernel_release="6.0.0-test",
        modules_dir=tmp_path,
        package_root=tmp_path,
        progress=lambda _message: None,
    )
    params = {
        "argv": ["sh", "-c", "echo {release} > out.txt"],
        "install": [{"from": "out.txt", "dest": "/etc/release", "mode": "0600"}],
    }
    run_command_step(ctx, params)
    entry = ctx.archive.get("/etc/release")
    assert entry is not None and entry.data == b"6.0.0-test\n"
    assert stat.S_IMODE(entry.mode) == 0o600


# --------------------------------------------------------------------------- boot


@pytest.fixture(scope="module")
def raw_boot(image: ImageManifest) -> tuple[subprocess.CompletedProcess[str], float]:
    """One raw boot-and-poweroff cycle of the default image under TCG (no network)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (run ci/setup-host.sh)")
    argv = [
        "qemu-system-x86_64",
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} cvmlab.poweroff=1",
        "-serial", "stdio",
    ]  # fmt: skip
    started = time.monotonic()
    # subprocess.run kills QEMU if the deadline passes (TimeoutExpired fails the test).
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=BOOT_DEADLINE_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return result, time.monotonic() - started


@pytest.mark.vm
def test_the_image_boots_prints_the_marker_and_powers_off(
    raw_boot: tuple[subprocess.CompletedProcess[str], float],
    image: ImageManifest,
    record_property: Callable[[str, object], None],
) -> None:
    result, wall = raw_boot
    match = re.search(rf"^{image.ready_marker} uptime=([0-9.]+)\r?$", result.stdout, re.M)
    assert match, result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    record_property("raw_boot_wall_s", round(wall, 2))
    record_property("guest_uptime_at_marker_s", float(match.group(1)))
    print(f"raw boot cycle {wall:.2f} s wall, marker at {match.group(1)} s guest uptime")


@pytest.mark.vm
def test_the_guest_console_has_no_warning_bug_or_oops(
    raw_boot: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    result, _ = raw_boot
    bad = [line for line in result.stdout.splitlines() if BAD_CONSOLE.search(line)]
    assert not bad, result.stdout


@pytest.mark.vm
def test_every_guest_process_has_settled_before_the_ready_line(
    raw_boot: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    """A snapshot is taken at the ready line: init says on the console when a service
    was not yet asleep in its wait, or eth0's link-up work had not run (the work every
    restored guest would otherwise redo before its first answer)."""
    result, _ = raw_boot
    complaints = [line for line in result.stdout.splitlines() if "cvmlab-init:" in line]
    assert not complaints, result.stdout


# --------------------------------------------------------------------------- CLI


def test_the_cli_prints_the_image_directory_last(image: ImageManifest) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.image.cli", "build"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(image.directory)
    assert f"image: cache hit {image.directory.name}" in result.stderr


def test_the_cli_reports_bad_input_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.image.cli", "build", "--vmlinuz", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "cvmlab: --vmlinuz and --modules-dir go together: pass both (the kernel image and "
        "its /lib/modules/<release> directory)"
    ]
