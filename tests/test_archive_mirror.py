"""The Debian mirror comes from the host's apt configuration, never from the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.archive_mirror import MIRROR_ENV, apt_sources, archive_mirror
from orchestrator.errors import ImageError

REPO = Path(__file__).resolve().parents[1]


def apt_tree(root: Path, files: dict[str, str], codename: str = "bookworm") -> Path:
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'ID=debian\nVERSION_CODENAME="{codename}"\n')
    for name, text in files.items():
        (root / "etc/apt" / name).write_text(text)
    return root


@pytest.fixture(autouse=True)
def no_mirror_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def test_a_deb822_stanza_of_the_hosts_suite_names_the_mirror(tmp_path: Path) -> None:
    root = apt_tree(
        tmp_path,
        {
            "sources.list.d/debian.sources": (
                "Types: deb\nURIs: http://mirror.lab/debian-security\nSuites: bookworm-security\n"
                "Components: main\n\n"
                "Types: deb\n# a comment\nURIs: http://mirror.lab/debian/\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n"
            )
        },
    )
    assert archive_mirror(root=root) == "http://mirror.lab/debian"


def test_a_one_line_entry_with_options_names_the_mirror(tmp_path: Path) -> None:
    root = apt_tree(
        tmp_path,
        {
            "sources.list": (
                "# deb http://commented.example/debian bookworm main\n"
                "deb https://packages.vendor.example/apt stable main\n"
                "deb [arch=amd64 signed-by=/k.gpg] http://proxy:3142/debian bookworm main\n"
            )
        },
    )
    assert archive_mirror(root=root) == "http://proxy:3142/debian"


def test_disabled_files_and_security_suites_are_not_mirrors(tmp_path: Path) -> None:
    root = apt_tree(
        tmp_path,
        {
            "sources.list.d/old.list.disabled-by-farm": (
                "deb http://old.example/debian bookworm main\n"
            ),
            "sources.list.d/sec.list": (
                "deb http://sec.example/debian-security bookworm-security main\n"
            ),
        },
    )
    with pytest.raises(ImageError) as info:
        archive_mirror(root=root)
    assert "http://sec.example/debian-security" in info.value.problem
    assert MIRROR_ENV in info.value.fix


def test_the_environment_and_an_explicit_mirror_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = apt_tree(tmp_path, {"sources.list": "deb http://host.example/debian bookworm main\n"})
    monkeypatch.setenv(MIRROR_ENV, "http://env.example/debian/")
    assert archive_mirror(root=root) == "http://env.example/debian"
    assert archive_mirror("http://recipe.example/debian", root=root) == "http://recipe.example/debian"


def test_this_hosts_mirror_is_the_one_apt_policy_lists() -> None:
    """Compared with an independent reading of the same host: apt-cache policy's origins."""
    policy = subprocess.run(
        ["apt-cache", "policy"], capture_output=True, text=True, check=True
    ).stdout
    mirror = archive_mirror()
    assert f" {mirror} " in policy or f" {mirror}/ " in policy, policy
    assert [s for s in apt_sources() if s.uri.rstrip("/") == mirror]


def test_the_setup_script_and_python_agree_on_one_mirror() -> None:
    """ci/setup-host.sh runs this module with the system python3, before the venv exists."""
    result = subprocess.run(
        ["/usr/bin/python3", "-m", "orchestrator.archive_mirror"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == archive_mirror()


def test_no_archive_address_is_written_in_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    hits = []
    for name in tracked:
        path = REPO / name
        if path.suffix in (".py", ".sh", ".yaml", ".yml", ".md", ".toml") or name == "Makefile":
            text = path.read_text(errors="replace")
            if "deb.debian.org" in text and path.name != Path(__file__).name:
                hits.append(name)
    assert not hits, f"archive address written in: {hits}"
