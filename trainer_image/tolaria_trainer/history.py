"""What happened in a run so far: the record the run report is built from.

`RunHistory` collects the per-epoch records, rollbacks, emergencies, resumes,
skipped windows, drills and the latency samples. It is a document in every
snapshot, but a rollback keeps the live history (a rollback does not undo the
fact that it happened); only a crash-resumed trainer, whose memory is gone,
loads it from the snapshot. Serialised as JSON through the Leyline messages'
canonical JSON, never pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from leyline import (
    CheckpointRejection,
    ConservativeInterval,
    DrillRecord,
    EmergencyRecord,
    EpochRecord,
    RecoveryDecision,
    ReplayPolicy,
    ResumeRecord,
    RollbackReport,
    SkippedWindow,
    SnapshotRejection,
)
from tolaria_trainer.protocols import JsonDict

M = TypeVar("M", bound=Message)

HISTORY_DOCUMENT = "history"
RECORDS_KEPT = 64
"""Records of each kind a snapshot keeps (the newest); older ones are counted in `omitted`.
The run's own process keeps them all for its report; only a crash-resumed trainer, whose
memory is gone, reports the newest of each and how many it lost. Bounds every manifest."""
EPOCHS_KEPT = 256
"""Epoch records a snapshot keeps (one per epoch, ~0.4 KB each)."""
SAMPLES_KEPT = 2048
"""Latency samples (hook, validation) a snapshot keeps for the report's percentiles."""
DOCUMENT_BYTES_BOUND = 512 * 1024
"""What the history document can grow to within those bounds (records of ~1 KB at most),
reserved in every slot's manifest region."""


def _dump(messages: list[M]) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]


def _load(cls: type[M], items: list[Mapping[str, Any]]) -> list[M]:
    out = []
    for item in items:
        msg = cls()
        json_format.ParseDict(dict(item), msg)
        out.append(msg)
    return out


@dataclass
class RunHistory:
    """The run's record; see the module docstring."""

    epochs: list[EpochRecord] = field(default_factory=list)
    rollbacks: list[RollbackReport] = field(default_factory=list)
    emergencies: list[EmergencyRecord] = field(default_factory=list)
    resumes: list[ResumeRecord] = field(default_factory=list)
    skipped: list[SkippedWindow] = field(default_factory=list)
    rejections: list[SnapshotRejection] = field(default_factory=list)
    past_intervals: list[ConservativeInterval] = field(default_factory=list)
    drills_fired: list[DrillRecord] = field(default_factory=list)
    hook_ns: list[int] = field(default_factory=list)
    validation_ns: list[int] = field(default_factory=list)
    fallbacks: int = 0
    decisions: list[RecoveryDecision] = field(default_factory=list)
    checkpoint_rejections: list[CheckpointRejection] = field(default_factory=list)
    omitted: int = 0
    """Records dropped to bound the snapshot document (see `RECORDS_KEPT`)."""

    def skips_for(self, epoch: int) -> frozenset[int]:
        """Batch indexes of `epoch` to skip (windows before data-dependent anomalies)."""
        out: set[int] = set()
        for w in self.skipped:
            if w.epoch == epoch and w.policy == ReplayPolicy.REPLAY_POLICY_SKIP:
                out.update(range(w.first_batch, w.last_batch + 1))
        return frozenset(out)

    def reshuffles_for(self, epoch: int) -> list[tuple[int, int]]:
        """`(first batch, nonce)` of each reshuffle of `epoch`, in the order they happened: the
        epoch's order from that batch on is permuted again (policy reshuffle, R6.1a). The
        nonce is the window's place in the history, so a resumed run reshuffles identically."""
        return [
            (int(w.first_batch), n)
            for n, w in enumerate(self.skipped)
            if w.epoch == epoch and w.policy == ReplayPolicy.REPLAY_POLICY_RESHUFFLE
        ]

    def state_dict(self) -> JsonDict:
        """Checkpoint behavior: the newest `RECORDS_KEPT` of each record kind (`EPOCHS_KEPT`
        epochs, `SAMPLES_KEPT` latency samples) and how many were dropped. The skipped windows
        are kept whole: they decide which batches the data plan leaves out."""
        dropped = 0

        def newest(items: list[M], keep: int) -> list[M]:
            nonlocal dropped
            dropped += max(0, len(items) - keep)
            return items[-keep:] if keep else []

        return {
            "epochs": _dump(newest(self.epochs, EPOCHS_KEPT)),
            "rollbacks": _dump(newest(self.rollbacks, RECORDS_KEPT)),
            "emergencies": _dump(newest(self.emergencies, RECORDS_KEPT)),
            "resumes": _dump(newest(self.resumes, RECORDS_KEPT)),
            "skipped": _dump(self.skipped),
            "rejections": _dump(newest(self.rejections, RECORDS_KEPT)),
            "past_intervals": _dump(newest(self.past_intervals, RECORDS_KEPT)),
            "drills_fired": _dump(self.drills_fired),
            "decisions": _dump(newest(self.decisions, RECORDS_KEPT)),
            "checkpoint_rejections": _dump(newest(self.checkpoint_rejections, RECORDS_KEPT)),
            "hook_ns": self.hook_ns[-SAMPLES_KEPT:],
            "validation_ns": self.validation_ns[-SAMPLES_KEPT:],
            "fallbacks": self.fallbacks,
            "omitted": self.omitted + dropped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = _load(EpochRecord, state["epochs"])
        self.rollbacks = _load(RollbackReport, state["rollbacks"])
        self.emergencies = _load(EmergencyRecord, state["emergencies"])
        self.resumes = _load(ResumeRecord, state["resumes"])
        self.skipped = _load(SkippedWindow, state["skipped"])
        self.rejections = _load(SnapshotRejection, state["rejections"])
        self.past_intervals = _load(ConservativeInterval, state["past_intervals"])
        self.drills_fired = _load(DrillRecord, state["drills_fired"])
        self.hook_ns = [int(v) for v in state["hook_ns"]]
        self.validation_ns = [int(v) for v in state["validation_ns"]]
        self.fallbacks = int(state["fallbacks"])
        self.decisions = _load(RecoveryDecision, state["decisions"])
        self.checkpoint_rejections = _load(CheckpointRejection, state["checkpoint_rejections"])
        self.omitted = int(state["omitted"])
