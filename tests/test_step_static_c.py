"""The image build step `static-c`: compile, check it is static, install with its mode."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ImageError
from orchestrator.image.builder import BuildContext
from orchestrator.image.cpio import CpioArchive
from orchestrator.image.recipe import load_recipe
from orchestrator.image.step_static_c import (
    build_shared_c,
    build_static_c,
    is_shared_object,
    is_static_elf,
    static_c_argv,
)

HELPER_STEP = {"sources": ["guest-helper/cvmlab-mem.c"], "dest": "/usr/bin/cvmlab-mem"}


def context(tmp_path: Path, recipe_dir: Path | None = None) -> BuildContext:
    recipe = load_recipe("minimal")
    if recipe_dir is not None:
        recipe = dataclasses.replace(recipe, directory=recipe_dir)
    return BuildContext(
        recipe=recipe,
        archive=CpioArchive(),
        work=tmp_path,
        kernel_release="0",
        modules_dir=tmp_path,
        package_root=tmp_path,
        progress=lambda _message: None,
    )


def test_compiler_flags_make_warnings_errors_and_link_statically() -> None:
    argv = static_c_argv([Path("a.c")], Path("out"), ["-DX=1"])
    assert argv[:6] == ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror"]
    assert argv[6:] == ["-DX=1", "-o", "out", "a.c"]


def test_a_shared_step_builds_a_shared_object_not_an_executable(tmp_path: Path) -> None:
    argv = static_c_argv([Path("a.c")], Path("out.so"), shared=True)
    assert argv[:3] == ["gcc", "-shared", "-fPIC"] and "-static" not in argv
    ctx = context(tmp_path)
    build_shared_c(ctx, {"sources": ["guest-helper/dropbear-quiet-seed.c"],
                         "dest": "/usr/lib/cvmlab/q.so", "mode": "0644"})  # fmt: skip
    entry = ctx.archive.get("/usr/lib/cvmlab/q.so")
    assert entry is not None and stat.S_IMODE(entry.mode) == 0o644
    assert is_shared_object(entry.data) and is_static_elf(entry.data)  # no loader of its own
    build_static_c(ctx, dict(HELPER_STEP))
    helper = ctx.archive.get("/usr/bin/cvmlab-mem")
    assert helper is not None and not is_shared_object(helper.data)


def test_the_helper_step_installs_an_executable_into_the_archive(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    build_static_c(ctx, dict(HELPER_STEP))
    entry = ctx.archive.get("/usr/bin/cvmlab-mem")
    assert entry is not None
    assert stat.S_IMODE(entry.mode) == 0o755 and entry.data[:4] == b"\x7fELF"


def test_code_with_a_warning_fails_with_the_compiler_message(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (recipe_dir / "bad.c").write_text("int main(void) { int unused; return 0; }\n")
    ctx = context(tmp_path, recipe_dir)
    with pytest.raises(ImageError) as info:
        build_static_c(ctx, {"sources": ["bad.c"], "dest": "/usr/bin/bad"})
    assert "unused" in info.value.detail


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"dest": "/usr/bin/x"}, "sources"),
        ({"sources": "a.c", "dest": "/usr/bin/x"}, "sources"),
        ({"sources": ["guest-helper/cvmlab-mem.c"], "dest": "usr/bin/x"}, "dest"),
        ({"sources": ["guest-helper/cvmlab-mem.c"], "dest": "/usr/../x"}, "dest"),
        ({"sources": ["guest-helper/cvmlab-mem.c"], "dest": "/x", "mode": "rwx"}, "mode"),
        ({"sources": ["../../pyproject.toml"], "dest": "/x"}, "outside"),
        ({"sources": ["missing.c"], "dest": "/x"}, "does not exist"),
    ],
)
def test_a_malformed_step_is_an_image_error_naming_the_field(
    tmp_path: Path, params: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ImageError, match=complaint):
        build_static_c(context(tmp_path), params)
