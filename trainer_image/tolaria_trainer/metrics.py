"""Prometheus metrics of the trainer (R8.3), on an opt-in port.

Names are `tolaria_<quantity>_<unit>` in base units, counters end in
`_total`, label values are Leyline enum names (breaker, phase, priority,
outcome) or the task's group ids, never a step or a pod uid. Every labelled
series is touched at start so dashboards see zeros, not gaps. Takes a
`registry`, so tests read a fresh one.

Updated at epoch boundaries and on rare events; the per-step path touches
only one counter.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from leyline import (
    BreakerId,
    HookPhase,
    MessagePriority,
    PriorityCount,
    RebuildOutcome,
    enum_names,
)
from tolaria_trainer.breaker import CircuitBreaker

_HOOK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.018, 0.025, 0.05, 0.1, 0.5, 2.0)
_SLOW_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class TrainerMetrics:
    """All trainer series, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.hook_seconds = Histogram(
            "tolaria_hook_duration_seconds",
            "End-of-epoch hook wall time (R1.2), validation excluded.",
            buckets=_HOOK_BUCKETS,
            registry=r,
        )
        self.hook_phase_seconds = Histogram(
            "tolaria_hook_phase_duration_seconds",
            "Wall time of each hook slice (assembly, Tamiyo, command, guard).",
            ["phase"],
            buckets=_HOOK_BUCKETS,
            registry=r,
        )
        self.hook_budget_breaches = Counter(
            "tolaria_hook_budget_breaches_total",
            "Hooks that overran the hook budget.",
            registry=r,
        )
        self.validation_seconds = Histogram(
            "tolaria_validation_duration_seconds",
            "Validation wall time, reported outside the hook budget (R1.1).",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "tolaria_breaker_state",
            "CircuitBreakerState value per guarded operation (1 closed, 2 open, 3 half-open).",
            ["breaker"],
            registry=r,
        )
        self.breaker_failures = Counter(
            "tolaria_breaker_failures_total",
            "Failures recorded per breaker.",
            ["breaker"],
            registry=r,
        )
        self.breaker_trips = Counter(
            "tolaria_breaker_trips_total",
            "Transitions to OPEN per breaker.",
            ["breaker"],
            registry=r,
        )
        self.conservative = Gauge(
            "tolaria_conservative_mode",
            "1 while the run is in conservative mode (R2.2).",
            registry=r,
        )
        self.conservative_entries = Counter(
            "tolaria_conservative_mode_entries_total",
            "Times conservative mode was entered.",
            registry=r,
        )
        self.tamiyo_fallbacks = Counter(
            "tolaria_tamiyo_fallbacks_total",
            "Epochs whose command was the fallback (late, failed or skipped Tamiyo).",
            registry=r,
        )
        self.lr_integrity_breaches = Counter(
            "tolaria_lr_integrity_breaches_total",
            "LRs found changed behind the LR controller's back (R3.2).",
            registry=r,
        )
        self.learning_rate = Gauge(
            "tolaria_learning_rate", "Current LR per parameter group.", ["group"], registry=r
        )
        self.rebuilds = Counter(
            "tolaria_optimizer_rebuilds_total",
            "Optimizer rebuilds by outcome (R4.2).",
            ["outcome"],
            registry=r,
        )
        self.rebuild_seconds = Histogram(
            "tolaria_optimizer_rebuild_duration_seconds",
            "Optimizer rebuild wall time.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.telemetry_packets = Counter(
            "tolaria_telemetry_packets_total",
            "Telemetry packets emitted by priority.",
            ["priority"],
            registry=r,
        )
        self.telemetry_dropped = Counter(
            "tolaria_telemetry_dropped_total",
            "Telemetry packets dropped by priority (R8.1).",
            ["priority"],
            registry=r,
        )
        self.training_loss = Gauge(
            "tolaria_training_loss", "Mean training loss of the last epoch.", registry=r
        )
        self.validation_loss = Gauge(
            "tolaria_validation_loss", "Validation loss of the last epoch.", registry=r
        )
        self.validation_accuracy = Gauge(
            "tolaria_validation_accuracy_ratio",
            "Validation accuracy of the last epoch.",
            registry=r,
        )
        self.epoch = Gauge("tolaria_epoch", "Epochs completed.", registry=r)
        self.steps = Counter("tolaria_steps_total", "Optimizer steps taken.", registry=r)
        self.health = Gauge(
            "tolaria_health_status", "HealthStatus value (1 healthy .. 4 critical).", registry=r
        )
        self.last_progress = Gauge(
            "tolaria_last_progress_timestamp_seconds",
            "Unix time of the last completed optimizer step (no-progress alerts).",
            registry=r,
        )
        self._seen_failures: dict[int, int] = {}
        self._seen_trips: dict[int, int] = {}
        self._seen_telemetry: dict[tuple[int, bool], int] = {}
        self._touch()

    def _touch(self) -> None:
        for name in enum_names(BreakerId):
            self.breaker_state.labels(name).set(1)
            self.breaker_failures.labels(name)
            self.breaker_trips.labels(name)
        for name in enum_names(HookPhase):
            self.hook_phase_seconds.labels(name)
        for name in enum_names(RebuildOutcome):
            self.rebuilds.labels(name)
        for name in enum_names(MessagePriority):
            self.telemetry_packets.labels(name)
            self.telemetry_dropped.labels(name)

    def observe_hook(
        self, total_ns: int, phases_ns: Mapping[HookPhase.ValueType, int], *, breached: bool
    ) -> None:
        self.hook_seconds.observe(total_ns / 1e9)
        for phase, ns in phases_ns.items():
            self.hook_phase_seconds.labels(HookPhase.Name(phase)).observe(ns / 1e9)
        if breached:
            self.hook_budget_breaches.inc()

    def sync_breakers(self, breakers: Iterable[CircuitBreaker]) -> None:
        """Copies breaker states and the counters' growth since the last sync."""
        for b in breakers:
            name = BreakerId.Name(b.breaker)
            self.breaker_state.labels(name).set(b.state)
            self.breaker_failures.labels(name).inc(
                b.failures - self._seen_failures.get(b.breaker, 0)
            )
            self.breaker_trips.labels(name).inc(b.trips - self._seen_trips.get(b.breaker, 0))
            self._seen_failures[b.breaker] = b.failures
            self._seen_trips[b.breaker] = b.trips

    def sync_telemetry(self, counts: Iterable[PriorityCount]) -> None:
        for c in counts:
            name = MessagePriority.Name(c.priority)
            for dropped, value, counter in (
                (False, c.emitted, self.telemetry_packets),
                (True, c.dropped, self.telemetry_dropped),
            ):
                seen = self._seen_telemetry.get((c.priority, dropped), 0)
                if value > seen:
                    counter.labels(name).inc(value - seen)
                    self._seen_telemetry[(c.priority, dropped)] = value

    def observe_rebuild(self, outcome: RebuildOutcome.ValueType, elapsed_ms: float) -> None:
        self.rebuilds.labels(RebuildOutcome.Name(outcome)).inc()
        self.rebuild_seconds.observe(elapsed_ms / 1e3)


class _QuietHandler(WSGIRequestHandler):
    """Scrapes are routine: no access-log line on stderr for each one."""

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


class MetricsServer:
    """/metrics served on an already bound, listening socket, from a daemon thread.

    Takes the socket rather than a port so the bind happens at the edge
    (`endpoint.bind_metrics_socket`), where a port in use is refused by name, and so a
    socket inherited from `tolaria run` serves the same URL in every trainer attempt.
    """

    def __init__(self, registry: CollectorRegistry, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        server = ThreadingWSGIServer((host, port), _QuietHandler, bind_and_activate=False)
        server.socket.close()  # the unbound socket the constructor made; `sock` replaces it
        server.socket = sock
        server.server_address = sock.getsockname()
        # what server_bind would set, without its reverse DNS lookup (getfqdn)
        server.server_name, server.server_port = str(host), int(port)
        server.setup_environ()
        server.set_app(make_wsgi_app(registry))
        self._server = server
        self.port = int(port)
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops serving and closes this process's copy of the socket."""
        self._server.shutdown()
        self._server.server_close()
