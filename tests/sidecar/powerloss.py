"""A `FileSystem` double that cuts the power: real files, and what a crash of the machine keeps.

`PowerLossFileSystem` stands in for `fs.OsFileSystem` under the WAL and the checkpoint store
(the `FileSystem` seam in `tolaria_sidecar.protocols`). Every call really happens on real files
in one directory, so the store reads back what it wrote exactly as with the page cache; the
double also keeps what is *durable*, and when the power is cut (at the `cut_at`-th call) it
rewrites the directory to what a machine that lost power would find on its disk, closes every
descriptor it handed out (releasing their locks, as a dead process does) and raises
`PowerLost` from that call and every later one.

The model is Linux ext4 (data=ordered, the default) as far as POSIX lets a program rely on it,
and never kinder:

* File data. `write`, `pwrite` and `ftruncate` change the file in the page cache; only `fsync`
  or `fdatasync` of a descriptor of that file makes its current content (data and size)
  durable. A file never synced has no durable data: it comes back empty.
* Writeback. The kernel may write dirty pages back at any moment, and ext4 journals the size
  with them. With `torn_appends`, a file that only grew since its last sync (an append log,
  a file being written) may keep a random prefix of the unsynced bytes: a torn last append.
  Without it, every unsynced byte is lost.
* Names. Creating a file (`open` with `O_CREAT` of a new name), `rename`, `link` and `unlink`
  change the directory at once but are durable only after `fsync_directory` of it; `fsync`
  of a file does not make its name durable. ext4's journal commits these operations in
  order, and a commit can happen at any moment, so after a cut a random prefix of the
  pending ones survives (with `names_prefix`; without it, none does).
* Reads, `exists`, `listdir`, `size` see the page cache (the real files), as on Linux.
* Locks (`try_lock`) are real `flock`s, released when the power goes with the descriptors.

Only the directory given (flat, as a checkpoint directory is) is modelled; paths outside it
pass through unmodelled. Every call counts as one operation, reads included, so a cut can land
anywhere: inside a write, a retention, a compaction, recovery at open, or a load.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Callable
from pathlib import Path


class PowerLost(BaseException):
    """The machine lost power at operation `at`. A `BaseException`: no store boundary may
    catch it and carry on as a live process would."""

    def __init__(self, at: int, label: str) -> None:
        super().__init__(f"power lost at operation {at} ({label})")
        self.at = at
        self.label = label


class PowerLossFileSystem:
    """Real files under `root`, with what survives a power cut; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        cut_at: int | None = None,
        rng: random.Random | None = None,
        torn_appends: bool = True,
        names_prefix: bool = True,
        label: Callable[[str], str] = lambda operation: operation,
    ) -> None:
        """`cut_at`: the operation (counting from 1) at which the power goes, before it runs;
        None never cuts. `label(operation)` names where the program is when the power goes (for
        the report of cuts), given the name of the call being cut."""
        self.root = root.resolve()
        self.cut_at = cut_at
        self.ops = 0
        self.dead = False
        self.cut_label = ""
        self._rng = rng or random.Random(0)
        self._torn_appends = torn_appends
        self._names_prefix = names_prefix
        self._label = label
        self._next_inode = 0
        self._names: dict[str, int] = {}
        self._durable_names: dict[str, int] = {}
        self._pending: list[tuple[str, str, str | int]] = []
        self._durable_data: dict[int, bytes] = {}
        self._fds: dict[int, int | None] = {}
        by_inode: dict[int, int] = {}
        for name in sorted(os.listdir(self.root)):
            path = self.root / name
            real = os.stat(path).st_ino
            if real not in by_inode:
                by_inode[real] = self._new_inode()
                self._durable_data[by_inode[real]] = path.read_bytes()
            self._names[name] = by_inode[real]
        self._durable_names = dict(self._names)

    # -- the model ------------------------------------------------------------------------------

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _name(self, path: Path) -> str | None:
        """The modelled name of `path`, or None outside the directory."""
        resolved = path.resolve().parent / path.name
        return path.name if resolved.parent == self.root else None

    def _tick(self, operation: str) -> None:
        if self.dead:
            raise PowerLost(self.ops, self.cut_label)
        self.ops += 1
        if self.cut_at is not None and self.ops == self.cut_at:
            self.cut_label = self._label(operation)
            self._cut()
            raise PowerLost(self.ops, self.cut_label)

    def _cut(self) -> None:
        self.dead = True
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()
        names = dict(self._durable_names)
        keep = self._rng.randint(0, len(self._pending)) if self._names_prefix else 0
        for op, first, second in self._pending[:keep]:
            _replay(names, op, first, second)
        contents: dict[int, bytes] = {}
        for inode in set(names.values()):
            contents[inode] = self._after_cut(inode, names)
        for name in os.listdir(self.root):
            os.unlink(self.root / name)
        written: dict[int, str] = {}
        for name, inode in sorted(names.items()):
            if inode in written:
                os.link(self.root / written[inode], self.root / name)
                continue
            (self.root / name).write_bytes(contents[inode])
            written[inode] = name

    def _after_cut(self, inode: int, names: dict[str, int]) -> bytes:
        durable = self._durable_data.get(inode, b"")
        if not self._torn_appends:
            return durable
        current = self._current_data(inode)
        if current is None or len(current) <= len(durable) or not current.startswith(durable):
            return durable
        if self._rng.random() < 0.5:
            return durable
        return current[: self._rng.randint(len(durable), len(current))]

    def _current_data(self, inode: int) -> bytes | None:
        """The page-cache content of `inode`, read by any name it still has."""
        for name, held in self._names.items():
            if held == inode:
                return (self.root / name).read_bytes()
        return None

    def _sync(self, fd: int) -> None:
        inode = self._fds.get(fd)
        if inode is None:
            return
        # Read through /proc: `fd` may be write-only (a checkpoint being written).
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            self._durable_data[inode] = f.read()

    # -- the FileSystem seam ----------------------------------------------------------------------

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        self._tick("open")
        name = self._name(path)
        existed = os.path.lexists(path)
        fd = os.open(path, flags, mode)
        if name is None:
            self._fds[fd] = None
            return fd
        if not existed or name not in self._names:
            inode = self._new_inode()
            self._names[name] = inode
            self._durable_data[inode] = b""
            self._pending.append(("create", name, inode))
        self._fds[fd] = self._names[name]
        return fd

    def close(self, fd: int) -> None:
        self._tick("close")
        os.close(fd)
        self._fds.pop(fd, None)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._tick("write")
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._tick("pwrite")
        return os.pwrite(fd, data, offset)

    def readinto(self, fd: int, buffer: memoryview) -> int:
        self._tick("readinto")
        return os.readv(fd, [buffer])

    def size(self, fd: int) -> int:
        self._tick("size")
        return os.fstat(fd).st_size

    def fsync(self, fd: int) -> None:
        self._tick("fsync")
        self._sync(fd)

    def fdatasync(self, fd: int) -> None:
        self._tick("fdatasync")
        self._sync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self._tick("ftruncate")
        os.ftruncate(fd, length)

    def try_lock(self, fd: int) -> bool:
        self._tick("try_lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def is_path_of(self, fd: int, path: Path) -> bool:
        self._tick("is_path_of")
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def rename(self, source: Path, target: Path) -> None:
        self._tick("rename")
        os.replace(source, target)
        first, second = self._name(source), self._name(target)
        if first is not None and second is not None:
            self._names[second] = self._names.pop(first)
            self._pending.append(("rename", first, second))

    def link(self, source: Path, target: Path) -> None:
        self._tick("link")
        os.link(source, target)
        first, second = self._name(source), self._name(target)
        if first is not None and second is not None:
            self._names[second] = self._names[first]
            self._pending.append(("link", first, second))

    def unlink(self, path: Path) -> None:
        self._tick("unlink")
        os.unlink(path)
        name = self._name(path)
        if name is not None:
            self._names.pop(name, None)
            self._pending.append(("unlink", name, ""))

    def exists(self, path: Path) -> bool:
        self._tick("exists")
        return os.path.lexists(path)

    def listdir(self, directory: Path) -> list[str]:
        self._tick("listdir")
        return os.listdir(directory)

    def mkdir(self, path: Path) -> None:
        self._tick("mkdir")
        path.mkdir(parents=True, exist_ok=True)

    def fsync_directory(self, directory: Path) -> None:
        self._tick("fsync_directory")
        if directory.resolve() == self.root:
            for op, first, second in self._pending:
                _replay(self._durable_names, op, first, second)
            self._pending.clear()

    def advise_sequential(self, fd: int) -> None:
        self._tick("advise_sequential")

    def release(self) -> None:
        """Closes what a finished (not cut) run left open; a test's tidy-up, not a seam call."""
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()


def _replay(names: dict[str, int], op: str, first: str, second: str | int) -> None:
    """Applies one namespace operation to a name -> inode map."""
    if op == "create" and isinstance(second, int):
        names[first] = second
    elif op == "rename" and isinstance(second, str) and first in names:
        names[second] = names.pop(first)
    elif op == "link" and isinstance(second, str) and first in names:
        names[second] = names[first]
    elif op == "unlink":
        names.pop(first, None)
