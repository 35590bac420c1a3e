"""The production `FileSystem` (`protocols.py`): each method is the matching `os` call.

The WAL and the checkpoint store do every file operation through this seam, so the crash tests
can replace it with a double that drops what a power cut would lose. Nothing here adds
buffering, retries or logging: the caller's order of writes and syncs is the order the kernel
sees.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_FDATASYNC = getattr(os, "fdatasync", os.fsync)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class OsFileSystem:
    """Plain `os` calls; stateless, so one instance serves every store."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def readinto(self, fd: int, buffer: memoryview) -> int:
        return os.readv(fd, [buffer])

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        _FDATASYNC(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def is_path_of(self, fd: int, path: Path) -> bool:
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def rename(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def link(self, source: Path, target: Path) -> None:
        os.link(source, target)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def listdir(self, directory: Path) -> list[str]:
        return os.listdir(directory)

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def fsync_directory(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | _DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def advise_sequential(self, fd: int) -> None:
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is not None:
            fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


OS_FILESYSTEM = OsFileSystem()
"""The one production instance (stateless)."""
