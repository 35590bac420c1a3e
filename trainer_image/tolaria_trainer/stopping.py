"""How a run is asked to stop: SIGINT/SIGTERM become a stop request with an exit code and a
reason (R13.5).

The trainer worker and `tolaria run --no-sidecar` call `install_stop_handlers` before they
train. The first signal sets the `StopRequest`; the loop polls it after every step and the run
ends `Stopped`, with its report, its shared memory released and exit code 128 + the signal
(130 for SIGINT, 143 for SIGTERM), like a shell. A second signal raises `Interrupted` on the
main thread: the step in progress is abandoned and the run still ends with a report, promptly
and without a traceback (the caller catches it where the run ends); later signals are logged
and ignored, so they cannot cut the report short (a supervisor that must end it sends SIGKILL).
A handler never writes to disk or logs more than one line: it may run in the middle of
anything.

Under `tolaria run` the supervisor stops its trainer with SIGINT and the trainer's
parent-death signal is SIGTERM, so a SIGTERM there means the supervisor died, and the reason
says so (`supervisor_cause`). The supervisor uses the exit codes and `stop_reason` without
importing torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from leyline.lifecycle import supervised, supervisor_gone

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABANDONED = "a second signal abandoned the step in progress"


def exit_code_for(signum: int) -> int:
    """A shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_reason(
    signum: int, *, global_step: int, epochs_completed: int, epochs: int, cause: str = ""
) -> str:
    """The report's reason for a stopped run: which signal, where, and why it came.

    Example: "stopped by SIGINT at step 57 (3 of 200 epochs completed)".
    """
    reason = (
        f"stopped by {signal_name(signum)} at step {global_step} "
        f"({epochs_completed} of {epochs} epochs completed)"
    )
    return f"{reason}; {cause}" if cause else reason


class Interrupted(BaseException):
    """A second stop signal: abandon the step in progress and end the run now.

    A `BaseException`, like `KeyboardInterrupt`, so that no `except Exception` boundary inside
    the run (a rollback, a sink) swallows it; caught where the run ends (`run_training`, the
    worker's `main`), which write the report and exit with `exit_code_for(signum)`.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(
            f"{signal_name(signum)} received twice: the step in progress was abandoned"
        )
        self.signum = signum


class StopRequest(threading.Event):
    """The event the loop polls after every step, remembering which signal set it and why.

    It is a `threading.Event`, so components that only wait on or poll the event (the loop,
    the frozen wait) need nothing else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signum = 0
        """The first signal received (0: stopped without a signal, by a caller's `set`)."""
        self.cause = ""
        """Why the signal came, when the caller of `request` knew."""
        self.explain: Callable[[int], str] = lambda signum: ""
        """Asked when the reason is written (not in the handler: it may wait a moment) why
        signal `signum` came, e.g. the supervising `tolaria run` died."""
        self.interrupted = False
        """A second signal abandoned the step in progress."""
        self.interruptible = False
        """True while training runs (`run_training` sets it around the loop): only then does
        a second signal raise `Interrupted`. Before, the loop has not started and stops at its
        first check; after, the run is writing its report, which must not be cut short."""

    def request(self, signum: int, cause: str = "") -> None:
        """Records the first signal and sets the event; later requests only set the event."""
        if not self.is_set():
            self.signum = signum
            self.cause = cause
        self.set()

    @property
    def exit_code(self) -> int:
        """130/143 after SIGINT/SIGTERM; 143 when stopped without a signal (a polite stop)."""
        return exit_code_for(self.signum or signal.SIGTERM)

    def reason(self, *, global_step: int, epochs_completed: int, epochs: int) -> str:
        reason = stop_reason(
            self.signum or signal.SIGTERM,
            global_step=global_step,
            epochs_completed=epochs_completed,
            epochs=epochs,
            cause=self.cause or self.explain(self.signum),
        )
        if self.interrupted:
            reason += f"; {ABANDONED}"
        return reason


SUPERVISOR_DEATH_WAIT_S = 1.0
"""How long a SIGTERM'd trainer looks for its supervisor's death before calling the signal a
plain request: a killed process is gone within milliseconds."""


def supervisor_cause(signum: int) -> str:
    """Why a signal came: SIGTERM is the parent-death signal under `tolaria run` (which itself
    stops its trainer with SIGINT), so it means the supervisor died if it is gone now."""
    if signum != signal.SIGTERM or not supervised():
        return ""
    return "the supervising `tolaria run` died" if supervisor_gone(SUPERVISOR_DEATH_WAIT_S) else ""


def ignore_stop_signals() -> None:
    """After the report is written: a late Ctrl-C must neither kill the exiting process (its
    exit code is the run's) nor raise into the interpreter's shutdown."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_now(code: int) -> NoReturn:
    """Ends a process that has trained with `code`, skipping the interpreter's teardown.

    Call once the report is written and the exit code decided. torch's C++ teardown at
    interpreter exit sometimes aborts (SIGABRT, "terminate called without an active
    exception") in a process a signal interrupted; that would turn a stopped or finished
    run into a crash, which a supervisor restarts. Output and logs are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def install_stop_handlers(
    stop: StopRequest, *, cause: Callable[[int], str] = supervisor_cause
) -> dict[int, object]:
    """Routes SIGINT and SIGTERM to `stop` (see the module docstring); returns the previous
    handlers. Call on the main thread, before training starts."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        if stop.is_set() and (stop.interrupted or not stop.interruptible):
            logger.warning("%s: already stopping", signal_name(signum))
            return
        if stop.is_set():
            stop.interrupted = True
            raise Interrupted(stop.signum or signum)
        stop.request(signum)
        logger.warning("%s: stopping after the current step", signal_name(signum))

    stop.explain = cause
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
