"""Durable persistence of one committed slot: pin it, verify it if the verifier has not,
hand it to the durable store, mark it durable, unpin it (R6.3).

Called by `slots.SlotManager.persist` on the sidecar's persister thread (seconds of disk I/O,
never on the trainer's hot path). Pin contract: while `ControlBlock.slot_state(i)
.pinned_generation` equals the generation slot `i` holds, the trainer must not invalidate or
overwrite slot `i`; it picks another one. A trainer that overwrites a pinned slot anyway is
caught: the generation is checked again right after the data is copied into the checkpoint
file (`persist_guard.PersistGuard`), and a changed slot makes the store abandon the write
(WAL ABORT), reported as `checkpoint_failed` "overwritten during persist"; the previous
checkpoint stays the latest. The writer never writes slot bytes, and never persists a
generation that failed verification (R13.2).
"""

from __future__ import annotations

import errno
import logging
from typing import NoReturn

from google.protobuf.message import DecodeError

from leyline import CheckpointFailure, CheckpointRecord, SnapshotManifest
from leyline.shm import Slot, SlotHeader
from leyline.v1.resilience_pb2 import CheckpointOutcome
from tolaria_sidecar.errors import CheckpointWriteFailed, PersistFailed
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import Overwritten, PersistGuard
from tolaria_sidecar.protocols import Clock, DurableStore, EventSink
from tolaria_sidecar.slot_table import SlotTable, read_header
from tolaria_sidecar.verification import SlotChecker, check

logger = logging.getLogger(__name__)


def manifest_digest_of(manifest: bytes) -> str:
    """The manifest's training-spec digest, recorded in the checkpoint's WAL record."""
    try:
        return SnapshotManifest.FromString(manifest).manifest_digest
    except DecodeError:
        return ""


class CheckpointWriter:
    """Makes committed slots of `table` durable, one at a time; see the module docstring."""

    def __init__(
        self,
        *,
        table: SlotTable,
        checker: SlotChecker,
        store: DurableStore,
        guard: PersistGuard,
        events: EventSink,
        metrics: SidecarMetrics,
        clock: Clock,
    ) -> None:
        self._table = table
        self._checker = checker
        self._store = store
        self._guard = guard
        self._events = events
        self._metrics = metrics
        self._clock = clock

    def persist(self, index: int, generation: int) -> CheckpointRecord:
        """Makes slot `index`'s `generation` durable (persister thread; seconds).

        Pins the generation, verifies it if the verifier has not yet, hands header fields,
        manifest and the slot's data view straight to `DurableStore.write`, unpins. Emits
        `checkpoint` or `checkpoint_failed` and raises `PersistFailed` on failure; the
        previous checkpoint then stays the latest.
        """
        start = self._clock.now_ns()
        control = self._table.control
        slot = self._table.slot(index)
        header = read_header(slot)
        if header is None or not header.visible or header.generation != generation:
            found = "nothing committed" if header is None else f"generation {header.generation}"
            self._failed(
                slot,
                header,
                generation,
                f"slot holds {found} now",
                CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
            )
        state = control.slot_state(index)
        if state.rejected_generation == generation:
            self._failed(
                slot,
                header,
                generation,
                "rejected by verification",
                CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
            )
        control.set_pinned(index, generation)
        self._table.refresh_gauges()
        try:
            if read_header(slot) != header:
                self._failed(
                    slot,
                    header,
                    generation,
                    "overwritten before the pin took hold",
                    CheckpointOutcome.CHECKPOINT_OUTCOME_DISCARDED,
                )
            if state.verified_generation != generation:
                reason = check(slot, header)
                if reason is not None:
                    self._checker.reject(slot, header, reason)
                    self._failed(
                        slot,
                        header,
                        generation,
                        reason,
                        CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
                    )
                control.set_verified(index, generation)
            manifest = slot.manifest_bytes(header)

            def still_there() -> None:
                if read_header(slot) != header:
                    raise Overwritten(errno.ESTALE, "overwritten during persist")

            try:
                with self._guard.guarding(still_there, epoch=header.epoch):
                    record = self._store.write(
                        manifest=manifest,
                        data=slot.data[: header.data_length],
                        epoch=header.epoch,
                        global_step=header.global_step,
                        snapshot_generation=generation,
                        manifest_digest=manifest_digest_of(manifest),
                    )
            except CheckpointWriteFailed as err:
                overwritten = isinstance(err.__cause__, Overwritten)
                reason = "overwritten during persist" if overwritten else err.failure.error
                outcome = (
                    CheckpointOutcome.CHECKPOINT_OUTCOME_DISCARDED
                    if overwritten
                    else CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED
                )
                self._failed(slot, header, generation, reason, outcome, cause=err)
            except OSError as err:
                self._failed(
                    slot,
                    header,
                    generation,
                    f"{type(err).__name__}: {err}",
                    CheckpointOutcome.CHECKPOINT_OUTCOME_FAILED,
                    cause=err,
                )
            control.set_durable(index, generation)
        finally:
            control.set_pinned(index, 0)
            self._table.refresh_gauges()
        elapsed_s = (self._clock.now_ns() - start) / 1e9
        self._metrics.checkpoint_writes.labels(
            CheckpointOutcome.Name(CheckpointOutcome.CHECKPOINT_OUTCOME_COMMITTED)
        ).inc()
        self._metrics.checkpoint_seconds.observe(elapsed_s)
        self._metrics.checkpoint_bytes.inc(len(manifest) + header.data_length)
        self._metrics.checkpoint_committed(record.committed_at.ToNanoseconds() / 1e9)
        self._events.publish("checkpoint", record)
        logger.info(
            "slot %d generation %d (epoch %d, step %d) durable as %s in %.2f s",
            index,
            generation,
            header.epoch,
            header.global_step,
            record.file_name,
            elapsed_s,
        )
        return record

    def _failed(
        self,
        slot: Slot,
        header: SlotHeader | None,
        generation: int,
        reason: str,
        outcome: CheckpointOutcome.ValueType,
        cause: BaseException | None = None,
    ) -> NoReturn:
        self._metrics.checkpoint_writes.labels(CheckpointOutcome.Name(outcome)).inc()
        failure = CheckpointFailure(
            epoch=header.epoch if header else 0,
            global_step=header.global_step if header else 0,
            error=f"slot {slot.index} generation {generation}: {reason}",
            snapshot_generation=generation,
        )
        failure.at.GetCurrentTime()
        self._events.publish("checkpoint_failed", failure)
        logger.error("checkpoint not written: %s", failure.error)
        raise PersistFailed(slot.index, generation, reason) from cause
