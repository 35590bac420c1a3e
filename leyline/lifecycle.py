"""The process contract between `tolaria run` (or a pod) and its children (trainer, sidecar).

A supervising parent sets `TOLARIA_PARENT_PID` and `TOLARIA_PARENT_DEATH_SIGNAL`
in a child's environment; the child calls `adopt_parent_death_signal()` first
thing, so that if the parent dies — even by SIGKILL — the child gets that
signal (Linux `PR_SET_PDEATHSIG`) instead of living on as an orphan holding
shared memory. Done in the child rather than in a `preexec_fn`, which is not
safe in a parent that runs threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

PARENT_PID_ENV = "TOLARIA_PARENT_PID"
PARENT_DEATH_SIGNAL_ENV = "TOLARIA_PARENT_DEATH_SIGNAL"
INSTANCE_ENV = "TOLARIA_INSTANCE_ID"
"""The run instance shared by a trainer and its sidecar (R13.1): set by `tolaria run` for
both children, and from the pod's UID (downward API) in a pod."""
LINEAGE_ENV = "TOLARIA_LINEAGE_ID"
"""The run an instance continues: the resumed instance's lineage, or the TolariaRun's UID."""
RESUME_ENV = "TOLARIA_RESUME"
"""`1`: this instance may continue its lineage from the newest valid checkpoint of that
lineage (a recreated pod: a fresh start when none exists); `required`: it must (`tolaria run
--resume`: a run that cannot resume fails instead of starting over); `0` or unset: only this
instance's own state is ever restored."""
RESUME_ALLOWED = "1"
RESUME_REQUIRED = "required"
_PR_SET_PDEATHSIG = 1


def child_environment(parent_death_signal: int) -> dict[str, str]:
    """The variables a supervising parent adds to a child's environment."""
    return {PARENT_PID_ENV: str(os.getpid()), PARENT_DEATH_SIGNAL_ENV: str(parent_death_signal)}


def supervised() -> bool:
    """True in a child started by a supervising parent (`tolaria run`), dead or alive."""
    return os.environ.get(PARENT_PID_ENV, "").isdigit()


def supervisor_gone(wait_s: float = 0.0) -> bool:
    """True in a child whose supervising parent has died since it started it.

    The kernel sends the parent-death signal when the *thread* that forked the child exits,
    which can be a moment before the whole parent is gone (the child is first handed to a
    surviving thread of the same process); `wait_s` gives it that moment. Never call with a
    wait from a signal handler.
    """
    parent = os.environ.get(PARENT_PID_ENV, "")
    if not parent.isdigit():
        return False
    deadline = time.monotonic() + wait_s
    while os.getppid() == int(parent) and not _ended(int(parent)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _ended(pid: int) -> bool:
    """True when `pid` is gone or a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"])


def adopt_parent_death_signal() -> None:
    """Asks the kernel for the agreed signal when the parent dies; exits if it is gone already."""
    parent = os.environ.get(PARENT_PID_ENV)
    sig = os.environ.get(PARENT_DEATH_SIGNAL_ENV)
    if not parent or not sig:
        return
    with contextlib.suppress(OSError, AttributeError, ValueError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), int(sig) if sig.isdigit() else signal.SIGTERM)
