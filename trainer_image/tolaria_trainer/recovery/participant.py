"""The trainer's side of the emergency protocol (R7.3, R7.4).

A watcher thread polls the control block's emergency generation every
millisecond (a sleep releases the GIL, so it runs while the training thread
computes) and answers for the three participants living in this process:
the trainer, Kasmina and Tamiyo. CRITICAL (FREEZE): the training thread stops
at its next step boundary and the watcher acknowledges for all three with the
frozen flag. Resolution thaws it. HALT: the watcher asks the sidecar to make
the last snapshot durable, then hands the halt to the training thread; if that
thread does not react (a hung step), the watcher writes the report itself and
exits the process with code 3. Other levels are acknowledged by the trainer
and queued as actions the training thread takes at its next step boundary
(fast or full rollback requested from outside, e.g. a cluster incident).

The training thread calls `heartbeat` every step (one shared-memory store) and
`checkpoint` at step boundaries; nothing here blocks it otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from leyline import EmergencyAction, EmergencyLevel, EmergencyState, Participant
from leyline.shm import ControlBlock, EmergencyRecord, ShmError

logger = logging.getLogger(__name__)

IN_PROCESS = (
    Participant.PARTICIPANT_TRAINER,
    Participant.PARTICIPANT_KASMINA,
    Participant.PARTICIPANT_TAMIYO,
)
POLL_S = 0.001
HALT_GRACE_S = 3.0
EXIT_HALTED = 3
POD_MODE_ENV = "TOLARIA_POD_TERMINATION_LOG"
"""Set by the worker in a pod: final outcomes exit 0 with a termination message."""


@dataclass(frozen=True)
class Action:
    """Something the training thread must do at its next step boundary."""

    record: EmergencyRecord


class EmergencyParticipant:
    """Acknowledges, freezes and halts on behalf of the trainer process."""

    def __init__(
        self,
        control: ControlBlock,
        *,
        attempt: int,
        on_halt_hung: Callable[[EmergencyRecord], None],
        request_final_checkpoint: Callable[[], None],
    ) -> None:
        self._control = control
        self._attempt = attempt
        self._on_halt_hung = on_halt_hung
        self._final_checkpoint = request_final_checkpoint
        self._seen = control.emergency_generation()
        self._own: set[int] = set()
        self._thawed = threading.Event()
        self._thawed.set()
        self._stop = threading.Event()
        self.halt: EmergencyRecord | None = None
        self.halt_handled = threading.Event()
        self.actions: deque[Action] = deque()
        self.acks: list[
            tuple[int, int, int, int]
        ] = []  # generation, participant, level, latency ns
        self.frozen_records: list[EmergencyRecord] = []
        self._thread = threading.Thread(target=self._watch, name="emergency-watcher", daemon=True)

    def start(self) -> None:
        pid = os.getpid()
        for participant in IN_PROCESS:
            self._control.register(participant, pid, self._attempt)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thawed.set()
        self._thread.join(timeout=2.0)

    # -- training thread ---------------------------------------------------------------------
    def heartbeat(self, step: int, epoch: int) -> None:
        self._control.heartbeat(Participant.PARTICIPANT_TRAINER, step, epoch)

    def own(self, generation: int) -> None:
        """Marks a generation the trainer raised itself (it is already acting on it)."""
        self._own.add(generation)

    def freeze_now(self) -> None:
        """Freezes at once for a CRITICAL this trainer raised (the broadcast follows)."""
        self._thawed.clear()

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def wait_while_frozen(self, stop: threading.Event, heartbeat: Callable[[], None]) -> None:
        """Blocks the training thread while a CRITICAL freeze holds (heartbeating meanwhile)."""
        while not self._thawed.wait(0.05):
            heartbeat()
            if stop.is_set() or self.halt is not None:
                return

    # -- watcher thread ----------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                generation = self._control.emergency_generation()
                if generation != self._seen:
                    self._handle(self._control.read_emergency())
            except ShmError:
                logger.exception("emergency record unreadable; retrying")
            except Exception:  # boundary: the watcher must survive anything
                logger.exception("emergency watcher error")
            time.sleep(POLL_S)

    def _ack_all(self, record: EmergencyRecord, *, frozen: bool) -> None:
        for participant in IN_PROCESS:
            at = self._control.ack(participant, record.generation, record.level, frozen=frozen)
            self.acks.append((record.generation, participant, record.level, at - record.raised_ns))

    def _handle(self, record: EmergencyRecord) -> None:
        self._seen = record.generation
        if (
            record.action == EmergencyAction.EMERGENCY_ACTION_HALT
            or record.state == EmergencyState.EMERGENCY_STATE_HALTED
        ):
            logger.critical("HALT received (generation %d): %s", record.generation, record.reason)
            self._ack_all(record, frozen=True)
            self._halt(record)
            return
        if record.state == EmergencyState.EMERGENCY_STATE_RESOLVED:
            if self.frozen:
                logger.warning("emergency %d resolved: training resumes", record.generation)
            self._ack_all(record, frozen=False)
            self._thawed.set()
            return
        if record.level == EmergencyLevel.EMERGENCY_LEVEL_CRITICAL:
            logger.critical("CRITICAL freeze (generation %d): %s", record.generation, record.reason)
            self._thawed.clear()
            self.frozen_records.append(record)
            self._ack_all(record, frozen=True)
            return
        self._ack_all(record, frozen=False)
        raised_here = (
            record.source == Participant.PARTICIPANT_TRAINER or record.generation in self._own
        )
        if not raised_here and record.level > EmergencyLevel.EMERGENCY_LEVEL_MINOR:
            self.actions.append(Action(record))  # raised outside (operator, cluster): act on it

    def _halt(self, record: EmergencyRecord) -> None:
        self.halt = record
        try:
            self._final_checkpoint()
        except Exception:  # boundary: the halt goes on without a final checkpoint
            logger.exception("final checkpoint request failed")
        self._thawed.set()  # wake a frozen training thread so it can halt cleanly
        if self.halt_handled.wait(HALT_GRACE_S):
            return
        logger.critical(
            "training thread did not react to HALT within %.0f s; halting from the watcher",
            HALT_GRACE_S,
        )
        self._on_halt_hung(record)  # writes the report and the pod's termination message
        os._exit(0 if os.environ.get(POD_MODE_ENV) else EXIT_HALTED)
