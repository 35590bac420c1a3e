"""Prometheus metrics of the sidecar (R8.3), served on an opt-in port.

Names are `tolaria_sidecar_<quantity>_<unit>` in base units, counters end in `_total`, label
values are Leyline enum names (level, kind, participant, tier, outcome, condition, phase),
never a step, generation or pod uid. Every labelled series is touched at start, so dashboards
and alerts see zeros, not gaps. Takes a `registry`, so tests read a fresh one; updated by the
emergency machine, the slot manager and the servicers on rare events only.

Ages (heartbeat, newest snapshot, newest durable checkpoint) are computed when scraped, from
a timestamp recorded on the event: a gauge set on the event would freeze at its last value
exactly when the sidecar stops hearing about events, which is when an alert needs it to grow.
Before the first event an age counts from the sidecar's start, so a run that never makes a
checkpoint looks as stale as one whose checkpoints stopped. One sidecar serves one run pod,
so the scrape's `namespace`/`pod`/`run` labels make every series a per-run series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from leyline import (
    AnomalyKind,
    EmergencyLevel,
    Participant,
    RollbackOutcome,
    RollbackTier,
    RunPhase,
    enum_names,
)
from leyline.v1.resilience_pb2 import CheckpointOutcome, SlotCondition

_ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
_SLOW_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 12.0, 30.0, 120.0)
_WAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0)


FULL = RollbackTier.Name(RollbackTier.ROLLBACK_TIER_FULL)
DEADLINE_MISSED = RollbackOutcome.Name(RollbackOutcome.ROLLBACK_OUTCOME_DEADLINE_MISSED)


class SidecarMetrics:
    """All sidecar series, registered on `registry`.

    `wall` is the wall clock (seconds since the epoch) the ages are measured with; checkpoint
    records carry wall-clock commit times, and a test replaces it.
    """

    def __init__(
        self, registry: CollectorRegistry, *, wall: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self._wall = wall
        self._started = wall()
        self._stamps_lock = threading.Lock()
        self._last_snapshot: float | None = None
        self._last_checkpoint: float | None = None
        self._phase = ""
        r = registry
        self.emergency_level = Gauge(
            "tolaria_sidecar_emergency_level",
            "EmergencyLevel of the unresolved emergency (0 none, 1 MINOR .. 4 CRITICAL).",
            registry=r,
        )
        self.emergencies = Counter(
            "tolaria_sidecar_emergencies_total",
            "Emergencies raised (new incidents) by level and anomaly kind (R7).",
            ["level", "kind"],
            registry=r,
        )
        self.escalations = Counter(
            "tolaria_sidecar_emergency_escalations_total",
            "Escalations of an unresolved emergency, by the level escalated to.",
            ["level"],
            registry=r,
        )
        self.halts = Counter(
            "tolaria_sidecar_emergency_halts_total",
            "CRITICAL emergencies that ended in HALT (R7.4).",
            registry=r,
        )
        self.missing_acks = Counter(
            "tolaria_sidecar_emergency_missing_acks_total",
            "Participants that did not acknowledge within their level's budget.",
            ["participant"],
            registry=r,
        )
        self.ack_latency = Histogram(
            "tolaria_sidecar_emergency_ack_latency_seconds",
            "Publish-to-acknowledgement latency per participant ack, by level (R7.3).",
            ["level"],
            buckets=_ACK_BUCKETS,
            registry=r,
        )
        self.snapshot_commits = Counter(
            "tolaria_sidecar_snapshot_commits_total",
            "Snapshot commits accepted from the trainer.",
            registry=r,
        )
        self.snapshot_verified = Counter(
            "tolaria_sidecar_snapshot_verifications_total",
            "Committed snapshots whose data checksum verified in the background.",
            registry=r,
        )
        self.snapshot_rejections = Counter(
            "tolaria_sidecar_snapshot_rejections_total",
            "Committed snapshots rejected (bad checksum or manifest, R6.2).",
            registry=r,
        )
        self.checkpoint_writes = Counter(
            "tolaria_sidecar_checkpoint_writes_total",
            "Durable checkpoint writes by outcome (R6.3).",
            ["outcome"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "tolaria_sidecar_checkpoint_write_duration_seconds",
            "Wall time of one durable checkpoint write, pin to unpin.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Counter(
            "tolaria_sidecar_checkpoint_written_bytes_total",
            "Bytes of manifest and data in committed checkpoints.",
            registry=r,
        )
        self.wal_append_seconds = Histogram(
            "tolaria_sidecar_wal_append_duration_seconds",
            "Wall time of one WAL record append (R12: 10 ms budget).",
            buckets=_WAL_BUCKETS,
            registry=r,
        )
        self.rollbacks = Counter(
            "tolaria_sidecar_rollbacks_total",
            "Rollbacks reported by the trainer, by tier and outcome (R6).",
            ["tier", "outcome"],
            registry=r,
        )
        self.rollback_seconds = Histogram(
            "tolaria_sidecar_rollback_duration_seconds",
            "End-to-end rollback wall time as reported by the trainer, by tier.",
            ["tier"],
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.full_rollback_deadline_misses = Counter(
            "tolaria_sidecar_full_rollback_deadline_misses_total",
            "Full rollbacks not reported within the full-rollback deadline (R6.5).",
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "tolaria_sidecar_trainer_heartbeat_age_seconds",
            "Seconds since the trainer's last step heartbeat (since sidecar start when none).",
            registry=r,
        )
        self.stall_threshold = Gauge(
            "tolaria_sidecar_stall_threshold_seconds",
            "The run's detection.stallSeconds: a heartbeat older than this is a stall.",
            registry=r,
        )
        self.run_phase = Gauge(
            "tolaria_sidecar_run_phase",
            "1 for the RunPhase the trainer last reported (Succeeded, Failed, Halted and "
            "Stopped are final: no heartbeat follows), 0 for the others.",
            ["phase"],
            registry=r,
        )
        self.snapshot_age = Gauge(
            "tolaria_sidecar_snapshot_age_seconds",
            "Seconds since the newest snapshot commit this sidecar accepted "
            "(since sidecar start when none).",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "tolaria_sidecar_checkpoint_age_seconds",
            "Seconds since the newest committed durable checkpoint was committed "
            "(since sidecar start when none).",
            registry=r,
        )
        self.trainer_attached = Gauge(
            "tolaria_sidecar_trainer_attached",
            "1 while a trainer is attached over the Unix socket.",
            registry=r,
        )
        self.fast_tier_feasible = Gauge(
            "tolaria_sidecar_fast_tier_feasible",
            "1 when the state copies within the fast tier's commit budget (R6.1).",
            registry=r,
        )
        self.fast_tier_enabled = Gauge(
            "tolaria_sidecar_fast_tier_enabled",
            "1 unless the run turned snapshots off (spec.snapshots.enabled: false), so an alert "
            "on an infeasible fast tier can tell a choice from a fault.",
            registry=r,
        )
        self.copy_bandwidth = Gauge(
            "tolaria_sidecar_copy_bandwidth_bytes_per_second",
            "memcpy bandwidth measured at the first attach.",
            registry=r,
        )
        self.slots = Gauge(
            "tolaria_sidecar_slots",
            "Snapshot slots by condition.",
            ["condition"],
            registry=r,
        )
        self.events_dropped = Counter(
            "tolaria_sidecar_events_dropped_total",
            "Events a slow StreamEvents client missed (it resumes by sequence).",
            registry=r,
        )
        self._touch()

    def _touch(self) -> None:
        self.emergency_level.set(0)
        for level in enum_names(EmergencyLevel):
            self.escalations.labels(level)
            self.ack_latency.labels(level)
            for kind in enum_names(AnomalyKind):
                self.emergencies.labels(level, kind)
        for participant in enum_names(Participant):
            self.missing_acks.labels(participant)
        for outcome in enum_names(CheckpointOutcome):
            self.checkpoint_writes.labels(outcome)
        for tier in enum_names(RollbackTier):
            self.rollback_seconds.labels(tier)
            for outcome in enum_names(RollbackOutcome):
                self.rollbacks.labels(tier, outcome)
        for condition in enum_names(SlotCondition):
            self.slots.labels(condition).set(0)
        self.fast_tier_feasible.set(0)
        self.trainer_attached.set(0)
        self.set_phase(RunPhase.Name(RunPhase.Pending))
        self.snapshot_age.set_function(lambda: self._age(self._last_snapshot))
        self.checkpoint_age.set_function(lambda: self._age(self._last_checkpoint))

    def _age(self, stamp: float | None) -> float:
        with self._stamps_lock:
            since = self._started if stamp is None else stamp
        return max(0.0, self._wall() - since)

    def track_heartbeat_age(self, age_seconds: Callable[[], float]) -> None:
        """Computes the heartbeat age at scrape time from `age_seconds`."""
        self.heartbeat_age.set_function(age_seconds)

    def set_phase(self, phase: str) -> None:
        """The RunPhase name the trainer last reported: its series reads 1, the others 0."""
        if phase == self._phase:
            return
        self._phase = phase
        for name in enum_names(RunPhase):
            self.run_phase.labels(name).set(1 if name == phase else 0)

    def snapshot_committed(self) -> None:
        """A snapshot commit was accepted now: counted, and the snapshot age starts over."""
        self.snapshot_commits.inc()
        with self._stamps_lock:
            self._last_snapshot = self._wall()

    def checkpoint_committed(self, committed_at_s: float) -> None:
        """A durable checkpoint committed at `committed_at_s` (wall clock, from its record)
        exists; the checkpoint age counts from the newest one seen."""
        with self._stamps_lock:
            if self._last_checkpoint is None or committed_at_s > self._last_checkpoint:
                self._last_checkpoint = committed_at_s

    def rollback_deadline_missed(self) -> None:
        """A full rollback missed its deadline: counted once, as its outcome (a report that
        arrives later is not counted again, see `rollback_reported`)."""
        self.full_rollback_deadline_misses.inc()
        self.rollbacks.labels(FULL, DEADLINE_MISSED).inc()

    def rollback_reported(
        self, tier: str, outcome: str, seconds: float, *, deadline_missed: bool
    ) -> None:
        """The trainer reported a finished rollback; one whose deadline already passed was
        counted as DEADLINE_MISSED then, so only its duration is recorded now."""
        if not deadline_missed:
            self.rollbacks.labels(tier, outcome).inc()
        self.rollback_seconds.labels(tier).observe(seconds)

    def set_slots(self, counts: dict[int, int]) -> None:
        """Sets the slot gauge from {SlotCondition value: count}; absent conditions read 0."""
        for name in enum_names(SlotCondition):
            self.slots.labels(name).set(counts.get(SlotCondition.Value(name), 0))


def serve(registry: CollectorRegistry, port: int, address: str) -> tuple[object, int]:
    """Starts the /metrics endpoint; returns (server, bound port). Port 0 binds a free port."""
    server, thread = start_http_server(port, addr=address, registry=registry)
    del thread
    return server, int(server.server_port)
