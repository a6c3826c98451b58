"""The sw-protected kernel build: config generation and checking, cache keys, bad input, failures.

The config tests run Kconfig itself (`scripts/config`, `make olddefconfig`) on Debian's
real `linux-source-7.3` (downloaded and unpacked once into the kernel cache); the build
failure tests run real `make` on a tree whose Makefile fails, through the command line.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.lab import kernel_build as kb
from orchestrator.lab.kernel_build import (
    FRAGMENT,
    KernelBuildError,
    KernelSource,
    build_inputs,
    config_mismatches,
    digest,
    fragment_text,
    kernel_build_main,
    kernelversion,
    run_logged,
    scripts_config_argv,
    unknown_series_error,
    user_tree,
)

ARCHIVE = KernelSource(
    Path("/nonexistent"),
    "7.3",
    {"package": "linux-source-7.3", "version": "7.3.4-1", "sha256": "ab" * 32, "suite": "s"},
)
TOOLS = {"gcc": "gcc (Debian 12.2.0-14) 12.2.0", "ld": "GNU ld 2.40"}


def _lines() -> tuple[list[str], kb.Progress]:
    seen: list[str] = []
    return seen, seen.append


def assert_ends(pid: int, deadline: float = 30) -> None:
    """`pid` ends (or has ended) within `deadline` seconds: its pidfd turns readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], deadline)
        assert ready, f"pid {pid} is still running after {deadline} s"
    finally:
        os.close(pidfd)


def fake_tree(root: Path, makefile_body: str = "") -> Path:
    """A directory that passes `user_tree`'s checks; its Makefile is `makefile_body`."""
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "Kconfig").write_text("# top Kconfig\n")
    (root / "Makefile").write_text(
        "VERSION = 9\nPATCHLEVEL = 8\nSUBLEVEL = 7\nEXTRAVERSION = -rc1\n" + makefile_body
    )
    return root


# --------------------------------------------------------------------------- config


def test_fragment_enables_what_the_lab_needs_and_disables_modules() -> None:
    wanted = dict(FRAGMENT)
    for symbol in (
        "KVM",
        "KVM_AMD",
        "KVM_SW_PROTECTED_VM",
        "EXPERT",
        "NET_9P_VIRTIO",
        "9P_FS",
        "VIRTIO_PCI",
        "VIRTIO_CONSOLE",
        "VIRTIO_BALLOON",
        "VIRTIO_MEM",
        "NUMA",
        "MEMCG",
        "IO_URING",
        "DEVTMPFS",
        "TMPFS",
        "SERIAL_8250_CONSOLE",
        "PVPANIC",
    ):
        assert wanted[symbol] == "y", symbol
    for symbol in ("MODULES", "DRM", "SOUND", "USB_SUPPORT", "WLAN"):
        assert wanted[symbol] == "n", symbol
    text = fragment_text()
    assert "CONFIG_KVM_SW_PROTECTED_VM=y\n" in text
    assert "# CONFIG_MODULES is not set\n" in text
    assert f'CONFIG_LOCALVERSION="{kb.LOCALVERSION}"' in text


def test_scripts_config_argv_is_one_option_per_symbol() -> None:
    argv = scripts_config_argv(
        Path("/src"), Path("/obj/.config"), [("KVM", "y"), ("DRM", "n"), ("NR_CPUS", "8")]
    )
    assert argv[:3] == ["/src/scripts/config", "--file", "/obj/.config"]
    assert argv[3:8] == ["--set-str", "LOCALVERSION", kb.LOCALVERSION, "-d", "LOCALVERSION_AUTO"]
    assert argv[8:] == ["-e", "KVM", "-d", "DRM", "--set-val", "NR_CPUS", "8"]


def test_config_mismatches_names_each_lost_symbol() -> None:
    """The check that catches a symbol Kconfig dropped (the bug: a kernel without it)."""
    fragment = [("KVM_SW_PROTECTED_VM", "y"), ("MODULES", "n"), ("DRM", "n"), ("KVM", "y")]
    config = "\n".join(
        [
            "CONFIG_KVM=y",
            "# CONFIG_KVM_SW_PROTECTED_VM is not set",
            "CONFIG_MODULES=y",
        ]
    )
    assert config_mismatches(config, fragment) == [
        "KVM_SW_PROTECTED_VM=n, wanted y",
        "MODULES=y, wanted n",
    ]
    assert config_mismatches("CONFIG_KVM=y\n", [("KVM_AMD", "y")]) == ["KVM_AMD=absent, wanted y"]
    good = "CONFIG_KVM=y\nCONFIG_KVM_SW_PROTECTED_VM=y\n# CONFIG_MODULES is not set\n"
    assert config_mismatches(good, fragment) == []


@pytest.fixture(scope="module")
def source_73() -> KernelSource:
    """Debian's linux-source-7.3, unpacked in the kernel cache (downloaded on first use)."""
    return kb.fetch_source("7.3", lambda line: None)


@pytest.fixture(scope="module")
def configured_73(
    source_73: KernelSource, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, list[str]]:
    """`configure()` run once on the real 7.3 source: (object dir, .config text, progress)."""
    objects = tmp_path_factory.mktemp("objects")
    seen, progress = _lines()
    return objects, kb.configure(source_73, objects, objects / "log", progress), seen


def test_real_kconfig_keeps_every_symbol_of_the_fragment(
    configured_73: tuple[Path, str, list[str]],
) -> None:
    """defconfig + kvm_guest.config + FRAGMENT + olddefconfig on the real 7.3 source."""
    _, config, seen = configured_73
    assert config_mismatches(config) == []
    values = kb.parse_config(config)
    assert values["KVM_SW_PROTECTED_VM"] == "y"
    assert values.get("MODULES", "n") == "n"
    assert any(line.startswith("olddefconfig: done") for line in seen)


def test_real_kconfig_drop_is_reported(
    source_73: KernelSource, configured_73: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    """Kconfig drops a symbol whose dependency is off; the check names it (the build refuses)."""
    _, config, _ = configured_73
    (tmp_path / ".config").write_text(config)
    # KVM_SW_PROTECTED_VM depends on EXPERT: without EXPERT, olddefconfig loses it.
    run_logged(
        scripts_config_argv(source_73.tree, tmp_path / ".config", [("EXPERT", "n")]),
        tmp_path / "log",
        "fragment",
        lambda line: None,
    )
    run_logged(
        ["make", "-C", str(source_73.tree), f"O={tmp_path}", "olddefconfig"],
        tmp_path / "log",
        "olddefconfig",
        lambda line: None,
    )
    wrong = config_mismatches((tmp_path / ".config").read_text())
    assert "KVM_SW_PROTECTED_VM=absent, wanted y" in wrong
    assert "EXPERT=n, wanted y" in wrong


# --------------------------------------------------------------------------- cache keys


def test_cache_key_is_stable_and_follows_every_input() -> None:
    key = digest(build_inputs(ARCHIVE, TOOLS))
    assert key == digest(build_inputs(ARCHIVE, dict(TOOLS)))
    assert len(key) == 16
    other_sha = KernelSource(ARCHIVE.tree, "7.3", {**ARCHIVE.identity, "sha256": "cd" * 32})
    other_version = KernelSource(ARCHIVE.tree, "7.3", {**ARCHIVE.identity, "version": "7.3.5-1"})
    changed = {
        digest(build_inputs(other_sha, TOOLS)),
        digest(build_inputs(other_version, TOOLS)),
        digest(build_inputs(ARCHIVE, {**TOOLS, "gcc": "gcc (Debian 14.2.0) 14.2.0"})),
    }
    assert key not in changed and len(changed) == 3


def test_cache_key_follows_the_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = digest(build_inputs(ARCHIVE, TOOLS))
    monkeypatch.setattr(kb, "FRAGMENT", (*FRAGMENT, ("KSM", "n")))
    assert digest(build_inputs(ARCHIVE, TOOLS)) != key


def test_cache_dir_is_env_overridable_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kb.CACHE_ENV, str(tmp_path / "k"))
    assert kb.kernel_cache() == tmp_path / "k"
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv(kb.CACHE_ENV, "relative/dir")
    with pytest.raises(KernelBuildError, match="not an absolute path"):
        kb.kernel_cache()


# --------------------------------------------------------------------------- bad input


def test_series_must_look_like_one() -> None:
    for bad in ("7", "7.3.4", "latest", "../7.3"):
        with pytest.raises(KernelBuildError, match="is not a kernel series"):
            kb.check_series(bad)


def test_unknown_series_lists_what_the_archive_has() -> None:
    error = unknown_series_error(
        "9.99", {"7.3": "trixie-backports", "6.12": "bookworm-backports", "7.2": "trixie-backports"}
    )
    assert "no suite of the archive has linux-source-9.99" in str(error)
    assert error.fix.endswith(
        "6.12 (bookworm-backports), 7.2 (trixie-backports), 7.3 (trixie-backports)"
    )


def test_unknown_series_from_the_real_archive() -> None:
    """The archive is asked: the error lists the series it really carries."""
    with pytest.raises(KernelBuildError) as caught:
        kb.fetch_source("1.0", lambda line: None)
    assert "linux-source-1.0" in caught.value.problem
    assert "choose one of:" in caught.value.fix
    assert "(" in caught.value.fix  # each series with its suite


def test_a_directory_that_is_not_a_kernel_tree(tmp_path: Path) -> None:
    with pytest.raises(KernelBuildError, match="is not a Linux kernel source tree"):
        user_tree(tmp_path)
    with pytest.raises(KernelBuildError, match="is not a directory"):
        user_tree(tmp_path / "missing")


def test_a_tree_configured_in_place_is_refused(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("CONFIG_KVM=y\n")
    with pytest.raises(KernelBuildError, match="mrproper"):
        user_tree(tree)


def test_a_user_tree_is_identified_by_path_and_version(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    source = user_tree(tree)
    assert kernelversion(tree) == "9.8.7-rc1"
    assert source.series == "9.8"
    assert source.identity == {"tree": str(tree.resolve()), "kernelversion": "9.8.7-rc1"}
    assert not source.from_archive


def test_command_line_bad_input_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernel_build_main(["--tree", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvmlab: error: ") and "Traceback" not in err
    assert kernel_build_main(["--jobs", "0"]) == 2
    assert "--jobs 0 is not a positive number" in capsys.readouterr().err


# --------------------------------------------------------------------------- running make


def test_a_failed_step_shows_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    script = "for i in $(seq 1 40); do echo line$i; done; echo 'error: boom' >&2; exit 3"
    with pytest.raises(KernelBuildError) as caught:
        run_logged(["sh", "-c", script], log, "build bzImage", lambda line: None)
    error = caught.value
    assert "build bzImage failed (exit status 3)" in error.problem
    assert str(log) in error.fix
    assert error.detail.splitlines()[-1] == "error: boom"
    assert "line40" in error.detail and "line1\n" not in error.detail  # the tail, not all
    assert "line1" in log.read_text()  # the whole output is in the log


def test_a_step_past_its_deadline_is_stopped_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with pytest.raises(KernelBuildError, match="did not finish"):
        run_logged(["sh", "-c", script], tmp_path / "log", "slow", lambda line: None, timeout=2)
    assert time.monotonic() - started < 60
    # The grandchild was in the step's process group: it ends too.
    assert_ends(int(pidfile.read_text()))


def test_progress_lines_name_the_phase_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kb, "PROGRESS_EVERY_S", 0.2)
    seen, progress = _lines()
    script = "for i in 1 2 3 4 5 6 7 8; do echo '  CC      x'$i'.o'; sleep 0.1; done"
    run_logged(["sh", "-c", script], tmp_path / "log", "build bzImage", progress)
    assert seen[0].startswith("build bzImage: started")
    assert seen[-1].startswith("build bzImage: done in ")
    assert all(line.startswith("build bzImage: ") for line in seen)
    # Whatever the machine's speed, every compiled file is counted once by the end.
    counts = [int(line.split(", ")[1].split()[0]) for line in seen if "files compiled" in line]
    assert counts == sorted(counts) and all(c <= 8 for c in counts)


def test_a_failing_tree_build_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cvmlab lab kernel build --tree` on a tree whose make fails: status 2, the tail shown."""
    tree = fake_tree(
        tmp_path / "linux", "defconfig:\n\t@echo configuring; echo 'Kconfig: no' >&2; exit 2\n"
    )
    env = {**os.environ, kb.CACHE_ENV: str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.lab.kernel_build", "--tree", str(tree)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "cvmlab: error: configure (defconfig + kvm_guest.config) failed (exit status 2)" in (
        result.stderr
    )
    assert "Kconfig: no" in result.stderr
    assert "Traceback" not in result.stderr
    assert "configure (defconfig + kvm_guest.config): started" in result.stdout


def _fake_bzimage(path: Path, release: str) -> None:
    """A file with a bzImage setup header: "HdrS" at 0x202, the version string's pointer
    (minus 0x200) at 0x20e (Documentation/arch/x86/boot.rst, kernel_version)."""
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    version = f"{release} (cvmlab@test) #1 SMP".encode() + b"\0"
    data[0x300 : 0x300 + len(version)] = version
    path.write_bytes(bytes(data))


def fake_kbuild_tree(tmp_path: Path) -> Path:
    """A tree whose Makefile stands for kbuild: O= objects, the four targets cvmlab runs
    (its olddefconfig writes the fragment, so the config check passes), a bzImage."""
    tree = fake_tree(tmp_path / "linux")
    (tmp_path / "fragment").write_text(fragment_text())
    bzimage = tmp_path / "prebuilt-bzImage"
    _fake_bzimage(bzimage, "9.8.7-rc1-cvmlab-sw-protected")
    (tree / "scripts").mkdir()
    config_script = tree / "scripts" / "config"
    config_script.write_text("#!/bin/sh\nexit 0\n")
    config_script.chmod(0o755)
    with (tree / "Makefile").open("a") as makefile:
        makefile.write(
            "defconfig kvm_guest.config:\n\t@echo CONFIG_X=y > $(O)/.config\n"
            f"olddefconfig:\n\t@cp {tmp_path / 'fragment'} $(O)/.config\n"
            "bzImage:\n\t@mkdir -p $(O)/arch/x86/boot\n"
            f"\t@echo '  CC      init/main.o'\n\t@cp {bzimage} $(O)/arch/x86/boot/bzImage\n"
        )
    return tree


def test_a_tree_build_publishes_and_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The success path through real make: config kept, bzImage, manifest, printed path."""
    tree = fake_kbuild_tree(tmp_path)
    bzimage = tmp_path / "prebuilt-bzImage"
    monkeypatch.setenv(kb.CACHE_ENV, str(tmp_path / "cache"))
    assert kernel_build_main(["--tree", str(tree), "--jobs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    built = Path(out[-1])
    assert built.name == "bzImage" and built.read_bytes() == bzimage.read_bytes()
    manifest = kb.BuiltKernel(built.parent).manifest
    assert manifest["release"] == "9.8.7-rc1-cvmlab-sw-protected"
    assert manifest["series"] == "9.8"
    assert manifest["inputs"]["source"] == {
        "tree": str(tree.resolve()),
        "kernelversion": "9.8.7-rc1",
    }
    assert set(manifest["seconds"]) == {"configure", "bzImage", "bzImage_cpu"}
    assert (built.parent / "config").read_text() == fragment_text()
    assert any("kernel 9.8.7-rc1-cvmlab-sw-protected (bzImage built in" in line for line in out)
    # A tree is rebuilt every time (make is its cache); its object directory is kept.
    assert kernel_build_main(["--tree", str(tree), "--jobs", "1"]) == 0
    assert Path(capsys.readouterr().out.splitlines()[-1]) == built
    assert (tmp_path / "cache" / "build" / built.parent.name / "build.log").exists()


def test_an_archive_build_is_a_cache_hit_the_second_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same inputs, same key: nothing is built again (make would fail now) and the object
    directory of the first build is gone."""
    tree = fake_kbuild_tree(tmp_path)
    monkeypatch.setenv(kb.CACHE_ENV, str(tmp_path / "cache"))
    source = KernelSource(tree, "9.8", dict(ARCHIVE.identity))
    first = kb.build_kernel(source, lambda line: None, jobs=1)
    assert not (tmp_path / "cache" / "build" / first.directory.name).exists()
    (tree / "Makefile").write_text("VERSION = 9\nPATCHLEVEL = 8\n%:\n\t@exit 1\n")
    seen, progress = _lines()
    again = kb.build_kernel(source, progress, jobs=1)
    assert again == first
    assert seen == [f"kernel linux-7.3.4-1 (sw-protected) is cached: {first.bzimage}"]
    changed = KernelSource(tree, "9.8", {**ARCHIVE.identity, "sha256": "ef" * 32})
    with pytest.raises(KernelBuildError, match="failed"):
        kb.build_kernel(changed, lambda line: None, jobs=1)
