"""`tolaria checkpoints DIR`: what a checkpoint directory holds, verified, without the sidecar.

Called by `cli.py`. Prints one row per checkpoint file (sequence, step, epoch, instance,
lineage, what the WAL says, whether every byte verifies and why) and the state of the WAL, as a
table or as JSON. Exit codes: 0 when everything verifies (a torn WAL tail or a leftover temp
file, what any crash leaves, is shown but is not damage), 1 on any damage (a file that does
not verify, a committed file missing, a damaged, missing or unreadable WAL), 2 when DIR is not
a directory. READ-ONLY (`leyline.durable.inspect_directory`): it never writes, truncates,
deletes or locks, so it is safe beside a running sidecar. Never imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from leyline.durable import DirectoryReport, Fate, FileReport, NotADirectory, inspect_directory

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_INVALID = 2

_COLUMNS = ("FILE", "SEQ", "STEP", "EPOCH", "INSTANCE", "LINEAGE", "WAL", "NEXT OPEN", "VERIFIED")


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _row(f: FileReport) -> tuple[str, ...]:
    return (
        f.name,
        str(f.sequence),
        _cell(f.global_step),
        _cell(f.epoch),
        _cell(f.instance_id),
        _cell(f.lineage_id),
        f.wal_state.value,
        f.fate.value,
        "yes" if f.verified else "NO",
    )


def render_table(report: DirectoryReport) -> str:
    """The report for people: a table of files, then the WAL, then what is wrong."""
    rows = [_COLUMNS, *(_row(f) for f in report.files)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = [f"{report.directory}:"]
    if report.files:
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        ]
    else:
        lines.append("  no checkpoint files")
    lines.append("")
    lines.append(f"  wal.log: {_wal_summary(report)}")
    for damage in report.wal_damage:
        lines.append(f"    {damage.length} B damaged at byte {damage.offset}: {damage.reason}")
    for name in report.preserved_logs:
        lines.append(f"  {name}: a damaged log an earlier recovery kept for inspection")
    for name in report.missing:
        lines.append(f"  {name}: committed in the WAL, but the file is missing")
    for f in report.files:
        if not f.verified or f.fate is not Fate.COMMITTED:
            lines.append(f"  {f.name}: {f.why}")
    lines.append("")
    lines.append(f"  {_verdict(report)}")
    return "\n".join(lines)


def _wal_summary(report: DirectoryReport) -> str:
    if report.wal_error:
        return report.wal_error
    if not report.wal_present:
        return "missing"
    text = f"{report.wal_bytes} B, {report.wal_records} records"
    if report.torn_tail:
        return f"{text}; torn tail ({report.recovery.damaged_bytes} B: an unfinished append)"
    if report.wal_damaged:
        return f"{text}; DAMAGED ({report.recovery.damaged_bytes} B unreadable)"
    return f"{text}; intact"


def _verdict(report: DirectoryReport) -> str:
    if report.is_damaged:
        return f"DAMAGED: {report.recovery.reason or 'see above'}"
    return "ok: every checkpoint file verifies"


def render_json(report: DirectoryReport) -> str:
    """The report for machines: one JSON object (`DirectoryReport.to_dict`)."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True)


def cmd_checkpoints(
    directory: Path, *, as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Prints the report of `directory` and returns the exit code (see the module docstring)."""
    try:
        report = inspect_directory(directory)
    except NotADirectory as refused:
        (err or sys.stderr).write(f"error: {refused}\n")
        return EXIT_INVALID
    (out or sys.stdout).write((render_json(report) if as_json else render_table(report)) + "\n")
    return EXIT_DAMAGED if report.is_damaged else EXIT_OK
