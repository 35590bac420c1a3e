"""The sidecar as a child of `tolaria run`: started, watched for READY, its output kept.

The supervisor (`supervisor.py`) starts one `SidecarChild` per sidecar life (a restart is a
new one). The sidecar's stderr goes straight to `sidecar.log`; its stdout (the READY line,
then anything else it prints) is read by a drain thread and appended there too. A full disk
loses lines of that output (counted in `lines_lost`), never the sidecar: the pipe is read to
the end either way, so the sidecar never blocks on it. Never imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tolaria_trainer.errors import SidecarDidNotStart

logger = logging.getLogger("tolaria.supervisor")

READY_TIMEOUT_S = 60.0
"""How long a starting sidecar may take to print READY (imports, checkpoint-directory
replay) before the run fails."""
LOG_TAIL_BYTES = 4096
"""How much of the end of `sidecar.log` a failed start quotes."""


class SidecarChild:
    """One started sidecar process: `start` returns once it is READY."""

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, ready: str = "") -> None:
        self.proc = proc
        self.log_path = log_path
        self.ready = ready
        """Its READY line (the socket, control and metrics endpoints it serves)."""
        self.lines_lost = 0
        """Lines of its output `sidecar.log` could not take (disk full)."""

    @classmethod
    def start(cls, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> SidecarChild:
        """Starts the sidecar in its own process group (a terminal's Ctrl-C is for the
        supervisor alone) and waits for READY; raises `SidecarDidNotStart` quoting its log."""
        with log_path.open("a") as log:
            proc = subprocess.Popen(
                list(command),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=dict(env),
                process_group=0,
            )
        line = _read_ready(proc)
        if not line.startswith("READY"):
            proc.kill()
            proc.wait()
            tail = _tail(log_path) or line.strip() or "no output"
            raise SidecarDidNotStart(f"the sidecar did not start (see {log_path}): {tail}")
        child = cls(proc, log_path, line.strip())
        threading.Thread(target=child._drain, name="sidecar-output", daemon=True).start()
        logger.info("sidecar ready (pid %d): %s", proc.pid, line.strip())
        return child

    def _drain(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        fd = -1
        with contextlib.suppress(OSError):
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for line in stdout:
                if fd < 0:
                    self.lines_lost += 1
                    continue
                try:
                    data = line.encode("utf-8", "replace")
                    while data:
                        data = data[os.write(fd, data) :]
                except OSError as err:
                    logger.error("sidecar.log: %s; the sidecar's output is dropped", err)
                    self.lines_lost += 1
                    os.close(fd)
                    fd = -1
        finally:
            if fd >= 0:
                os.close(fd)


def _read_ready(proc: subprocess.Popen[str]) -> str:
    box: list[str] = []
    reader = threading.Thread(
        target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(READY_TIMEOUT_S)
    return box[0] if box else ""


def _tail(path: Path) -> str:
    """The last non-empty line of `path` (bounded read), or ""."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")
