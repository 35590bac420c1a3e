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
    ConservativeInterval,
    DrillRecord,
    EmergencyRecord,
    EpochRecord,
    ReplayPolicy,
    ResumeRecord,
    RollbackReport,
    SkippedWindow,
    SnapshotRejection,
)
from tolaria_trainer.protocols import JsonDict

M = TypeVar("M", bound=Message)

HISTORY_DOCUMENT = "history"


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
    rollbacks_by_epoch: dict[int, int] = field(default_factory=dict)
    window_end_step: int = 0
    """A second data-dependent anomaly at or before this step escalates to MAJOR (R6.1a)."""

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
        return {
            "epochs": _dump(self.epochs),
            "rollbacks": _dump(self.rollbacks),
            "emergencies": _dump(self.emergencies),
            "resumes": _dump(self.resumes),
            "skipped": _dump(self.skipped),
            "rejections": _dump(self.rejections),
            "past_intervals": _dump(self.past_intervals),
            "drills_fired": _dump(self.drills_fired),
            "hook_ns": self.hook_ns,
            "validation_ns": self.validation_ns,
            "fallbacks": self.fallbacks,
            "rollbacks_by_epoch": {str(k): v for k, v in self.rollbacks_by_epoch.items()},
            "window_end_step": self.window_end_step,
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
        self.rollbacks_by_epoch = {int(k): int(v) for k, v in state["rollbacks_by_epoch"].items()}
        self.window_end_step = int(state["window_end_step"])
