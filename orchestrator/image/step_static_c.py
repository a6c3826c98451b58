"""Build steps `static-c` and `shared-c`: compile small C code and install it in the image.

The minimal image has no C library of its own (busybox is static, dropbear brings
its few libraries), so guest helpers are linked statically with the host's gcc and
glibc (`libc.a`, package libc6-dev). Recipe form:

    steps:
      - kind: static-c
        sources: [guest-helper/cvmlab-mem.c]   # relative to the recipe directory
        dest: /usr/bin/cvmlab-mem
        mode: "0755"                           # optional, default 0755
        cflags: [-DX=1]                        # optional, after the fixed flags
        host_packages: [gcc-12, libc6-dev]     # the planner hashes their versions

The fixed flags (`-static -O2 -Wall -Wextra -Werror`) make a warning a build error,
so a helper that builds here builds the same in CI. The result is checked to be
static: a dynamically linked binary would fail in the guest with a bare "not found".

`shared-c` (same form) builds a shared object instead (`-shared -fPIC`), for
LD_PRELOAD into one of the image's host binaries: those come with the host's own
libraries (`ldd`), so an object built against the host's libc runs against the
guest's. The result is checked to be a shared object, not an executable.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ImageError
from orchestrator.image import elf

if TYPE_CHECKING:  # builder imports this module to register the step: no import cycle
    from orchestrator.image.builder import BuildContext

STEP_KIND = "static-c"
SHARED_STEP_KIND = "shared-c"
COMPILER = "gcc"
FIXED_CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")
SHARED_CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror")
_ET_DYN = 3
_COMPILE_TIMEOUT = 300


def static_c_argv(
    sources: Sequence[Path],
    output: Path,
    cflags: Sequence[str] = (),
    compiler: str = COMPILER,
    shared: bool = False,
) -> list[str]:
    """The compiler command line (pure)."""
    fixed = SHARED_CFLAGS if shared else FIXED_CFLAGS
    return [compiler, *fixed, *cflags, "-o", str(output), *(str(s) for s in sources)]


def is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no PT_INTERP header (no dynamic loader)."""
    if not elf.is_elf64_le(data):
        return False
    try:
        return all(header.p_type != elf.PT_INTERP for header in elf.program_headers(data))
    except elf.CutOff:
        return False


def is_shared_object(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF of type ET_DYN with no dynamic loader of its
    own (an executable built as PIE has PT_INTERP)."""
    if not elf.is_elf64_le(data) or int.from_bytes(data[16:18], "little") != _ET_DYN:
        return False
    return is_static_elf(data)


def compile_static_c(
    sources: Sequence[Path],
    output: Path,
    cflags: Sequence[str] = (),
    compiler: str = COMPILER,
    shared: bool = False,
) -> bytes:
    """Compile `sources` into the static executable (or, `shared`, the shared object)
    `output` and return its bytes.

    ImageError (with the compiler's messages) when the compiler is missing, the code does
    not compile warning-free, or the result is not what was asked for.
    """
    if shutil.which(compiler) is None:
        raise ImageError(
            f"the C compiler {compiler!r} is not installed (needed for static guest helpers)",
            "install gcc and libc6-dev (ci/setup-host.sh does)",
        )
    for source in sources:
        if not source.is_file():
            raise ImageError(f"C source {source} does not exist", "fix the recipe's sources")
    argv = static_c_argv(sources, output, cflags, compiler, shared)
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise ImageError(
            f"compiling {', '.join(s.name for s in sources)} failed: `{shlex.join(argv)}`",
            "fix the C code (warnings are errors) or install libc6-dev for libc.a",
            detail=(result.stdout + result.stderr)[-4000:],
        )
    data = output.read_bytes()
    if shared and not is_shared_object(data):
        raise ImageError(f"{output.name} is not a shared object", "keep -shared in the flags")
    if not shared and not is_static_elf(data):
        raise ImageError(f"{output.name} is not a static executable", "keep -static in the flags")
    return data


def _string_list(params: dict[str, Any], key: str, kind: str = STEP_KIND) -> list[str]:
    value = params.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{kind} step: '{key}' must be a list of strings", "fix the recipe")
    return value


def build_static_c(ctx: BuildContext, params: dict[str, Any], shared: bool = False) -> None:
    """The `static-c` step handler (signature of builder.StepHandler); with `shared`,
    `shared-c`'s."""
    kind = SHARED_STEP_KIND if shared else STEP_KIND
    sources = _string_list(params, "sources", kind)
    if not sources:
        raise ImageError(f"{kind} step: 'sources' is empty", "name the C files to compile")
    dest = params.get("dest")
    if not isinstance(dest, str) or not dest.startswith("/") or ".." in PurePosixPath(dest).parts:
        raise ImageError(
            f"{kind} step: dest {dest!r} is not an absolute guest path",
            "write e.g. dest: /usr/bin/cvmlab-mem",
        )
    mode_text = str(params.get("mode", "0755"))
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise ImageError(
            f"{kind} step: mode {mode_text!r} is not octal", 'write "0755"'
        ) from None
    recipe_dir = ctx.recipe.directory.resolve()
    paths = [(recipe_dir / s).resolve() for s in sources]
    for path in paths:
        if not path.is_relative_to(recipe_dir):
            raise ImageError(f"{kind} step: source {path} is outside the recipe", "fix sources")
    output = ctx.work / PurePosixPath(dest).name
    ctx.progress(f"step: {kind} {', '.join(sources)} -> {dest}")
    data = compile_static_c(paths, output, _string_list(params, "cflags", kind), shared=shared)
    ctx.archive.add_file(dest, data, mode)


def build_shared_c(ctx: BuildContext, params: dict[str, Any]) -> None:
    """The `shared-c` step handler (signature of builder.StepHandler)."""
    build_static_c(ctx, params, shared=True)
