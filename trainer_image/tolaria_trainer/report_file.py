"""Puts `report.json` on disk however full the disk is (R13.5).

A run may fill its disk (checkpoints, telemetry, a neighbour's files) and must still say what
happened. So the space of the report is taken when the run starts: `reserve` writes a
placeholder report (status `Running`) padded with spaces to a size that fits the final report,
its blocks allocated with `posix_fallocate`. At the end `write` first tries the ordinary way (a
temporary file renamed over the placeholder, so a reader never sees half a report); when that
fails for lack of space it overwrites the reserved file in place, which needs no new blocks.
If even the reservation is too small, it writes a smaller report: without the per-epoch detail,
then without any list, each saying so in `warnings`.

An in-place write blanks the rest of the reservation with spaces (JSON whitespace) instead of
truncating it: under `tolaria run` the supervisor rewrites the trainer's report, and it must
still find the space. Called by the runtime at build and at the end of a run, and by the
supervisor; never on the hot path. Raises only `ReportNotWritten`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from leyline import RunPhase, RunReport
from tolaria_trainer.errors import TrainerError
from tolaria_trainer.report import report_json

logger = logging.getLogger(__name__)

RESERVE_BASE_BYTES = 128 << 10
"""Reserved for everything but the epochs: a 10-epoch report is ~14 KB, and the LR history
(at most 1000 changes, R3.3) ~250 B each; what does not fit is left out (`compact`)."""
RESERVE_PER_EPOCH_BYTES = 1 << 10
"""Per planned epoch: an epoch record is ~500 B of JSON; the rest is for its LR changes,
checkpoints and rollbacks."""
RESERVE_MAX_BYTES = 16 << 20
"""A 10,000-epoch run reserves ~10 MiB; beyond this its report is written compacted."""
FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ReportNotWritten(TrainerError):
    """`report.json` could not be written at all: log it; the exit code still says what
    happened."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(f"{path}: report not written: {cause.strerror or cause}")
        self.path = path
        self.cause = cause


def reserve_bytes(epochs: int) -> int:
    """How much to reserve for a run of `epochs` planned epochs."""
    return min(RESERVE_BASE_BYTES + RESERVE_PER_EPOCH_BYTES * max(epochs, 0), RESERVE_MAX_BYTES)


def placeholder(run_id: str, instance_id: str = "") -> RunReport:
    """What `report.json` says while the run goes: status `Running`, nothing final."""
    return RunReport(
        version=1, run_id=run_id, instance_id=instance_id, status=RunPhase.Running, exit_code=0
    )


def is_placeholder(report: RunReport) -> bool:
    """True for the reservation's placeholder: no final status was ever written over it."""
    return report.status in (RunPhase.Running, RunPhase.RUN_PHASE_UNSPECIFIED)


def reserve(path: Path, report: RunReport, size: int) -> str:
    """Makes `path` a `size`-byte file holding `report`, its blocks allocated now.

    Returns "" on success, else what went wrong (the disk is already full, ...), for the
    report's `warnings`; the previous file at `path`, if any, is then left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _padded(_encode(report), size)
    tmp = path.with_name(path.name + ".reserve")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC | _O_NOFOLLOW, 0o644)
        try:
            os.posix_fallocate(fd, 0, len(data))
            _pwrite_all(fd, data, 0)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        logger.warning("cannot reserve %d B for %s: %s", size, path, err)
        return f"no space reserved for report.json at the start of the run ({err.strerror})"
    return ""


def write(report: RunReport, path: Path) -> None:
    """Writes the final `report` to `path`: atomically when the disk has room, else into the
    reservation, smaller if it must be (see the module docstring). Raises `ReportNotWritten`
    when nothing could be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(report)
    tmp = path.with_suffix(".json.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        first = err
    logger.error("cannot write %s the usual way (%s); using the space reserved for it", path, first)
    try:
        _write_in_place(report, path, first)
    except OSError as err:
        raise ReportNotWritten(path, err) from first


def _write_in_place(report: RunReport, path: Path, why: OSError) -> None:
    fd = os.open(path, os.O_RDWR | _O_CLOEXEC | _O_NOFOLLOW)
    try:
        reserved = os.fstat(fd).st_size
        last: OSError = why
        for candidate in _candidates(report, why):
            data = _encode(candidate)
            payload = _padded(data, reserved)
            try:
                _pwrite_all(fd, payload, 0)
            except OSError as err:
                if err.errno not in FULL_DISK:
                    raise
                last = err
                continue
            if os.fstat(fd).st_size > len(payload):  # a longer candidate failed past the end
                os.ftruncate(fd, len(payload))
            return
        raise last
    finally:
        os.close(fd)


def _candidates(report: RunReport, why: OSError) -> Iterator[RunReport]:
    """The report as it is, without per-epoch detail, then without any list."""
    note = (
        f"disk full at the end of the run ({why.strerror}): report.json written into the "
        "space reserved for it at the start"
    )
    full = RunReport()
    full.CopyFrom(report)
    if note not in full.warnings:  # the supervisor rewrites what the trainer wrote this way
        full.warnings.append(note)
    yield full
    compact = RunReport()
    compact.CopyFrom(full)
    dropped = (len(compact.epochs), len(compact.lr_changes), len(compact.optimizer_rebuilds))
    for name in ("epochs", "lr_changes", "optimizer_rebuilds", "conservative_intervals"):
        compact.ClearField(name)
    compact.warnings.append(
        "the reserved space was too small: per-epoch detail left out "
        f"({dropped[0]} epoch records, {dropped[1]} LR changes, {dropped[2]} optimizer rebuilds)"
    )
    yield compact
    minimal = RunReport()
    for field in RunReport.DESCRIPTOR.fields:
        if field.name == "warnings" or field.message_type is not None:
            continue
        if not field.is_repeated:
            setattr(minimal, field.name, getattr(report, field.name))
    minimal.warnings.extend(compact.warnings)
    minimal.warnings.append("every list but warnings left out: the disk had no room for them")
    yield minimal


def _encode(report: RunReport) -> bytes:
    return (report_json(report) + "\n").encode("utf-8")


def _padded(data: bytes, size: int) -> bytes:
    """`data` followed by spaces up to `size` bytes, ending in a newline (still valid JSON)."""
    if len(data) >= size:
        return data
    return data.rstrip(b"\n") + b" " * (size - len(data)) + b"\n"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
