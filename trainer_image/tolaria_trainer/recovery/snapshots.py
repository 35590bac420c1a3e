"""Shared-memory snapshots, copied in the background and fenced by the next optimizer step.

Why background and not double-buffered: a synchronous copy of 100M parameters
plus Adam (1.2 GB) costs ~110 ms of memcpy here, six times the whole 18 ms
hook. Training mutates parameters and optimizer state only in
`optimizer.step()` (and the LR controller right after it), so their copy runs
on a worker thread while the next forward and backward run, and `fence()` —
called before the next optimizer step — waits for it (CheckFreq's
snapshot/persist split). Model buffers are different: BatchNorm statistics,
step counters and spectral-norm vectors change in the *forward*, so `capture`
clones them on the training thread first (they are small); otherwise a
snapshot could hold buffers from a step later than the one it is labelled
with, and a rollback would restore a mixture. The loop
stalls only for the part of the copy the forward/backward did not hide; that
stall is measured and reported. Epoch-end snapshots overlap validation and the
hook, which never wait for them.

The writer owns slot writes: it picks the least recently written slot that the
sidecar has not pinned for persistence, hides it (`Slot.invalidate`), copies
tensors straight into it (no pickle, no temporary copy), hashes the region as
it goes (xxh3, GIL released), writes the manifest and publishes the header
last, then tells the sidecar (`CommitSnapshot`). A torn or half-written slot is
never visible. Documents (JSON) are captured on the training thread at the
capture point; tensors are copied by the worker before anything can change.

The hook never calls into this module's blocking paths.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from leyline import SCHEMA_VERSION, SnapshotManifest
from leyline.checksum import REGION_ALGORITHM, digest_bytes
from leyline.shm import SLOT_FLAG_EPOCH_BOUNDARY, ControlBlock, Slot, TornHeader
from leyline.spec import SnapshotSpec, TrainingIdentity
from tolaria_trainer.faults import NO_FAULTS, Faults
from tolaria_trainer.latency import LatencyStats
from tolaria_trainer.recovery.slotio import Placement, copy_hashing
from tolaria_trainer.state import Layout, TrainingState

logger = logging.getLogger(__name__)

WRITE_POINTS: tuple[str, ...] = (
    "snapshot.before_invalidate",
    "snapshot.after_invalidate",
    "snapshot.after_copy",
    "snapshot.after_publish",
    "snapshot.after_commit",
)
"""Where a capture may die: the slot is hidden before a byte changes and visible only after
its manifest and checksums are written, so a reader never restores a torn slot."""


@dataclass
class CaptureResult:
    """What one background capture produced (read by the training thread at the fence)."""

    slot: int
    generation: int
    global_step: int
    epoch: int
    batch_index: int
    data_bytes: int
    copy_ns: int = 0
    error: str = ""
    committed: bool = False
    sidecar_error: str = ""


class SnapshotWriter:
    """Captures the training state into shared-memory slots; see the module docstring."""

    def __init__(
        self,
        *,
        state: TrainingState,
        slots: Sequence[Slot],
        control: ControlBlock,
        spec: SnapshotSpec,
        commit: Callable[[int, int], str],
        run_id: str,
        window: int,
        instance_id: str = "",
        lineage_id: str = "",
        training: TrainingIdentity | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self._state = state
        self._slots = list(slots)
        self._control = control
        self._spec = spec
        self._commit = commit
        self._run_id = run_id
        self._instance_id = instance_id
        self._lineage_id = lineage_id or instance_id
        self._training = training
        self._faults = faults
        self._thread: threading.Thread | None = None
        self._inflight: CaptureResult | None = None
        self._next_generation = 1 + max((self._generation_of(s) for s in self._slots), default=0)
        self._written_at = {s.index: self._generation_of(s) for s in self._slots}
        self.stall = LatencyStats(budget_ms=None, window=window)
        self.results: list[CaptureResult] = []
        self.on_result: Callable[[CaptureResult], None] | None = None

    @staticmethod
    def _generation_of(slot: Slot) -> int:
        try:
            return slot.header().generation
        except TornHeader:
            return 0

    @property
    def slots(self) -> list[Slot]:
        return self._slots

    def due(self, global_step: int) -> bool:
        every = self._spec.every_steps
        return self._spec.enabled and every > 0 and global_step % every == 0

    def capture(self, *, global_step: int, epoch: int, batch_index: int, epoch_end: bool) -> None:
        """Starts a capture of the state as it is now; returns at once.

        `batch_index` is the next batch to run in `epoch` (the resume position).
        Fences any capture still in flight first.
        """
        if not self._spec.enabled:
            return
        self.fence()
        if not self._state.verified:  # never snapshot a half-restored state (R13.2)
            self._finish(
                CaptureResult(
                    -1,
                    0,
                    global_step,
                    epoch,
                    batch_index,
                    0,
                    error=f"not captured: {self._state.unverified_reason}",
                )
            )
            return
        layout = self._frozen(self._state.layout())
        slot = self._pick_slot(layout.data_bytes)
        if slot is None:
            self._finish(
                CaptureResult(
                    -1,
                    0,
                    global_step,
                    epoch,
                    batch_index,
                    layout.data_bytes,
                    error=f"no slot holds {layout.data_bytes} B or all are pinned",
                )
            )
            return
        generation = self._next_generation
        self._next_generation += 1
        manifest = SnapshotManifest(
            version=SCHEMA_VERSION,
            run_id=self._run_id,
            generation=generation,
            global_step=global_step,
            epoch=epoch,
            batch_index=batch_index,
            tensors=[t.entry() for t in layout.tensors],
            documents=self._state.documents(),
            data_bytes=layout.data_bytes,
            checksum_algorithm=REGION_ALGORITHM,
            layout_fingerprint=layout.fingerprint,
            epoch_boundary=epoch_end,
            instance_id=self._instance_id,
            lineage_id=self._lineage_id,
        )
        if self._training is not None:
            manifest.manifest_digest = self._training.digest
            manifest.training_spec_json = self._training.json
        manifest.created_at.GetCurrentTime()
        result = CaptureResult(
            slot.index, generation, global_step, epoch, batch_index, layout.data_bytes
        )
        self._faults.hit("snapshot.before_invalidate")
        slot.invalidate()  # hidden before a single byte changes
        self._faults.hit("snapshot.after_invalidate")
        self._written_at[slot.index] = generation
        self._inflight = result
        flags = SLOT_FLAG_EPOCH_BOUNDARY if epoch_end else 0
        self._thread = threading.Thread(
            target=self._copy,
            args=(slot, layout, manifest, result, flags),
            name="snapshot",
            daemon=True,
        )
        self._thread.start()

    def _frozen(self, layout: Layout) -> Layout:
        """The layout with forward-mutated tensors (model buffers) cloned as they are now."""
        mutable = self._state.forward_mutable()
        if not mutable:
            return layout
        tensors = tuple(
            replace(t, tensor=t.tensor.clone()) if t.name in mutable else t for t in layout.tensors
        )
        return replace(layout, tensors=tensors)

    def adopt(self, slot: int, generation: int) -> None:
        """Records a slot someone else wrote (the sidecar loading a checkpoint for a full
        rollback): numbering continues above it and the slot counts as just written."""
        self._next_generation = max(self._next_generation, generation + 1)
        self._written_at[slot] = generation

    def fence(self) -> int:
        """Waits for the capture in flight (before anything mutates the captured tensors).

        Returns the nanoseconds waited, also recorded in `stall`.
        """
        thread = self._thread
        if thread is None:
            return 0
        start = time.perf_counter_ns()
        thread.join()
        waited = time.perf_counter_ns() - start
        self.stall.add(waited)
        self._thread = None
        if self._inflight is not None:
            self._finish(self._inflight)
            self._inflight = None
        return waited

    def _finish(self, result: CaptureResult) -> None:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    def _pick_slot(self, data_bytes: int) -> Slot | None:
        candidates = []
        for slot in self._slots:
            if slot.capacity < data_bytes:
                continue
            state = self._control.slot_state(slot.index)
            written = self._written_at.get(slot.index, 0)
            if written and state.pinned_generation == written:
                continue  # the sidecar is persisting it: never overwrite a pinned generation
            candidates.append((written, slot.index, slot))
        if not candidates:
            return None
        return min(candidates)[2]

    def _copy(
        self,
        slot: Slot,
        layout: Layout,
        manifest: SnapshotManifest,
        result: CaptureResult,
        flags: int,
    ) -> None:
        start = time.perf_counter_ns()
        try:
            placements = [Placement(t.offset, t.nbytes, t.tensor) for t in layout.tensors]
            checksum = copy_hashing(slot, placements, total_bytes=layout.data_bytes)
            self._faults.hit("snapshot.after_copy")
            manifest.checksum = digest_bytes(checksum)
            slot.publish(
                generation=result.generation,
                manifest=manifest.SerializeToString(),
                data_length=layout.data_bytes,
                data_checksum=checksum,
                checksum_algorithm=REGION_ALGORITHM,
                global_step=result.global_step,
                epoch=result.epoch,
                flags=flags,
            )
            self._faults.hit("snapshot.after_publish")
            result.copy_ns = time.perf_counter_ns() - start
        except Exception as err:  # boundary: the training thread reads the outcome at the fence
            logger.exception("snapshot into slot %d failed", slot.index)
            result.error = f"{type(err).__name__}: {err}"
            return
        result.sidecar_error = self._commit(slot.index, result.generation)
        result.committed = not result.sidecar_error
        self._faults.hit("snapshot.after_commit")
