"""What `tolaria run` may do with a run directory: lock it, refuse it, resume it, move it aside.

A run directory (`<workdir>/<name>/`, plus `spec.checkpoints.directory` when the manifest puts
checkpoints elsewhere) belongs to one run instance at a time (R13.1). `tolaria run` holds an
exclusive lock on it for as long as the run lives, so a second run of the same manifest in the
same workdir is refused instead of sharing files. A directory that already holds checkpoints
belongs to another instance (an earlier run): it is refused with exit code 2 and a message
saying what to do, unless the user asked for one of

* `--resume`: continue that run from its newest valid checkpoint. The manifest's
  `spec.training` must equal the one the checkpoint was taken with; a difference is refused
  naming each field. The new instance joins the old run's lineage, so its sidecar may load
  that lineage's checkpoints.
* `--fresh`: move the old directory aside to `<name>.<UTC time>` and start from nothing.

Called by the supervisor before any child starts; never imports torch, never deletes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from leyline.durable import CheckpointFile, checkpoint_files, newest_valid_checkpoint
from leyline.durable.wal_format import WAL_NAME
from leyline.spec import TolariaRun, training_differences
from tolaria_trainer.errors import TrainerError


class RunDirectoryRefused(TrainerError):
    """The run directory cannot be used as asked: exit 2 with this message (nothing changed)."""


@dataclass(frozen=True)
class Prepared:
    """What `prepare` decided."""

    lineage_id: str
    """The lineage the new instance joins: its own id, or the resumed run's."""
    resume: CheckpointFile | None
    """`--resume`: the checkpoint the run continues from."""
    moved_aside: tuple[Path, ...] = ()
    """`--fresh`: where the old directories went."""


class RunLock:
    """An exclusive `flock` on `<workdir>/.<name>.lock`, held while the run lives.

    The lock file sits beside the run directory (not inside it), so `--fresh` can move the
    directory while the lock is held; it is removed when released. A crashed holder's lock
    is released by the kernel, so a stale file never blocks a new run.
    """

    def __init__(self, workdir: Path, name: str) -> None:
        self.path = workdir / f".{name}.lock"
        self._fd = -1

    def acquire(self, instance_id: str) -> None:
        """Takes the lock or raises `RunDirectoryRefused` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise RunDirectoryRefused(
                    f"{self.path.parent / self.path.name[1:-5]} is in use by another "
                    f"`tolaria run` ({holder or 'holder unknown'}); wait for it to end, or use "
                    "another --workdir or metadata.name"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not unlinked by a releasing holder between our open and our flock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, instance {instance_id}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1


def holds_checkpoints(directory: Path) -> bool:
    """True when `directory` has checkpoint files or a non-empty WAL of an earlier instance."""
    if checkpoint_files(directory):
        return True
    wal = directory / WAL_NAME
    with contextlib.suppress(OSError):
        return wal.stat().st_size > 0
    return False


def prepare(
    run: TolariaRun,
    *,
    run_dir: Path,
    checkpoint_dir: Path,
    instance_id: str,
    resume: bool,
    fresh: bool,
) -> Prepared:
    """Decides what the new instance does with what it finds; see the module docstring.

    Raises `RunDirectoryRefused` with what to do. Changes nothing on disk except `--fresh`'s
    moves.
    """
    if resume and fresh:
        raise RunDirectoryRefused("--resume and --fresh exclude each other: pick one")
    found = holds_checkpoints(checkpoint_dir)
    if fresh:
        return Prepared(
            instance_id,
            None,
            _move_aside(run_dir, checkpoint_dir) if found or run_dir.exists() else (),
        )
    if resume:
        return _resume(run, checkpoint_dir)
    if found:
        raise RunDirectoryRefused(
            f"{checkpoint_dir} holds checkpoints of an earlier run of {run.name!r}; a new run "
            "never mixes with them. Pass --resume to continue that run from its newest valid "
            f"checkpoint, --fresh to move {run_dir} aside and start over, or another --workdir "
            "(`tolaria checkpoints "
            f"{checkpoint_dir}` lists them)"
        )
    return Prepared(instance_id, None)


def _resume(run: TolariaRun, checkpoint_dir: Path) -> Prepared:
    newest = newest_valid_checkpoint(checkpoint_dir)
    if newest is None or newest.manifest is None:
        what = "no checkpoint" if not checkpoint_files(checkpoint_dir) else "no valid checkpoint"
        raise RunDirectoryRefused(
            f"--resume: {checkpoint_dir} holds {what} to resume from "
            f"(`tolaria checkpoints {checkpoint_dir}` shows what is there)"
        )
    manifest = newest.manifest
    if not manifest.lineage_id and not manifest.instance_id:
        raise RunDirectoryRefused(
            f"--resume: {newest.path.name} names no run instance (written by an older "
            "Tolaria); it cannot be resumed safely: use --fresh"
        )
    differences = training_differences(manifest.training_spec_json, run.spec.training)
    if differences:
        lines = "\n  ".join(differences)
        raise RunDirectoryRefused(
            f"--resume: the manifest's training section differs from the one "
            f"{newest.path.name} was taken with; resuming would train something else:\n  {lines}"
            "\nRestore those fields, or use --fresh to start over."
        )
    return Prepared(manifest.lineage_id or manifest.instance_id, newest)


def _move_aside(run_dir: Path, checkpoint_dir: Path) -> tuple[Path, ...]:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for directory in dict.fromkeys((run_dir, checkpoint_dir)):
        if not directory.exists() or (directory != run_dir and run_dir in directory.parents):
            continue
        target = directory.with_name(f"{directory.name}.{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = directory.with_name(f"{directory.name}.{stamp}-{n}")
        directory.rename(target)
        moved.append(target)
    return tuple(moved)
