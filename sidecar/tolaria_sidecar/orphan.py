"""What the sidecar does when its launcher died: serve the trainer until it is gone (R13.5).

Under `tolaria run` both children get SIGTERM as their parent-death signal, so a supervisor
killed by SIGKILL stops the trainer and the sidecar at the same moment. The trainer then
finishes its step, detaches and asks the sidecar for the status its report is built from; a
sidecar that went away at once would take the run's checkpoints and emergencies out of that
report. So `server.run`, on SIGTERM under a launcher, first waits (bounded) for the trainer
process it served to end, then stops as usual: segments unlinked, socket and socket directory
removed. A launcher that is alive stops the trainer before the sidecar, so then the wait ends
at once. In a pod the trainer's pid is not ours to see, and nothing here runs.

Never used by a servicer; blocks only the sidecar's main thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from pathlib import Path

logger = logging.getLogger(__name__)

POLL_S = 0.1
"""Fallback poll period where `pidfd_open` is missing (Linux < 5.3)."""


def process_running(pid: int) -> bool:
    """True while `pid` runs; an exited process not yet reaped (a zombie) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"])


def wait_for_trainer(pid: int, timeout_s: float) -> bool:
    """Waits until process `pid` ends or `timeout_s` passes; True when it ended."""
    if pid <= 0 or not process_running(pid):
        return True
    logger.warning("launcher gone: waiting up to %.0f s for trainer pid %d to end", timeout_s, pid)
    deadline = time.monotonic() + timeout_s
    fd = -1
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)
    try:
        while process_running(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("trainer pid %d still running after %.0f s; stopping", pid, timeout_s)
                return False
            if fd >= 0:
                select.select([fd], [], [], left)  # readable once the process has exited
            else:
                time.sleep(min(POLL_S, left))
    finally:
        if fd >= 0:
            os.close(fd)
    return True
