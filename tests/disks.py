"""Filling a real file system in tests: a disk or a /dev/shm that runs out of space."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fill_disk(directory: Path) -> Path:
    """Writes `directory/filler` until the file system holding it is full (ENOSPC, to the
    last block); returns the filler's path (remove it to free the space)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path
