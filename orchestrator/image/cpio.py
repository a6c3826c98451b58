"""A newc ("070701") cpio writer, the format the Linux kernel unpacks as an initramfs.

Written in Python rather than calling `cpio -o` so that every entry's owner, mode and
type is exactly what the recipe says (root-owned files, a 0600 host key, /dev/console as
a character device) without needing root on the build host or touching the file system.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
# Parent directories created implicitly get this mode.
_DEFAULT_DIR_MODE = 0o755


@dataclass(frozen=True)
class CpioEntry:
    """One member: `path` is relative to the archive root, `mode` includes the type bits."""

    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _normalise(path: str | PurePosixPath) -> str:
    """'/usr/bin/x' and 'usr/bin/x' name the same member; '..' is refused."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path {str(path)!r}")
    return "/".join(parts)


class CpioArchive:
    """An in-memory set of entries, written in path order so parents precede children.

    Adding a path twice replaces the earlier entry (later recipe steps may override).
    Missing parent directories are created with mode 0755, owned by root.
    """

    def __init__(self, mtime: int = 0) -> None:
        self._entries: dict[str, CpioEntry] = {}
        # One timestamp for every entry: the archive depends only on its contents.
        self.mtime = mtime

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def entries(self) -> Iterator[CpioEntry]:
        """Entries in the order they are written."""
        for path in sorted(self._entries):
            yield self._entries[path]

    def get(self, path: str) -> CpioEntry | None:
        return self._entries.get(_normalise(path))

    @property
    def data_size(self) -> int:
        """Total size of file and symlink contents (uncompressed payload)."""
        return sum(len(e.data) for e in self._entries.values())

    def _put(self, entry: CpioEntry) -> None:
        parent = PurePosixPath(entry.path).parent
        while str(parent) != ".":
            key = str(parent)
            existing = self._entries.get(key)
            if existing is None:
                self._entries[key] = CpioEntry(key, stat.S_IFDIR | _DEFAULT_DIR_MODE)
            elif not existing.is_dir:
                raise ValueError(f"{entry.path!r} needs {key!r} to be a directory")
            parent = parent.parent
        self._entries[entry.path] = entry

    def add_directory(self, path: str, mode: int = _DEFAULT_DIR_MODE) -> None:
        self._put(CpioEntry(_normalise(path), stat.S_IFDIR | stat.S_IMODE(mode)))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(CpioEntry(_normalise(path), stat.S_IFREG | stat.S_IMODE(mode), data))

    def add_host_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """Copy a host file's contents; its mode unless `mode` is given (owner is root)."""
        st = source.stat()
        self.add_file(path, source.read_bytes(), stat.S_IMODE(st.st_mode) if mode is None else mode)

    def add_symlink(self, path: str, target: str) -> None:
        self._put(CpioEntry(_normalise(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        entry = CpioEntry(
            _normalise(path), stat.S_IFCHR | stat.S_IMODE(mode), rdev_major=major, rdev_minor=minor
        )
        self._put(entry)

    def write(self, stream: BinaryIO) -> int:
        """Write the archive (with its trailer) to `stream`; return the bytes written."""
        written = 0
        for ino, entry in enumerate(self.entries(), start=1):
            nlink = 2 if entry.is_dir else 1
            written += _write_member(stream, entry, ino, nlink, self.mtime)
        trailer = CpioEntry(_TRAILER, 0)
        written += _write_member(stream, trailer, 0, 1, 0)
        # The kernel does not need it, but cpio(1) and many tools expect 512-byte blocks.
        padding = -written % 512
        stream.write(b"\0" * padding)
        return written + padding


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _write_member(stream: BinaryIO, entry: CpioEntry, ino: int, nlink: int, mtime: int) -> int:
    name = entry.path.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        mtime,
        len(entry.data),
        0,  # devmajor: the device holding the file, meaningless here
        0,  # devminor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check: only used by the "070702" crc variant
    )
    header = _MAGIC + b"".join(b"%08X" % value for value in fields)
    head = header + name
    head += _pad4(len(head))
    stream.write(head)
    stream.write(entry.data)
    tail = _pad4(len(entry.data))
    stream.write(tail)
    return len(head) + len(entry.data) + len(tail)
