"""The operator's Prometheus metrics (`tolaria_operator_*`) and the endpoint serving them.

`OperatorMetrics` takes its registry (no global registry, so tests read a fresh one) and
touches every label value at start, so a rate() over a never-seen label is 0, not absent.
Labels are bounded: run phases, rollback tiers, incident levels and acks are Leyline enum
names; a handler name; never a pod or uid. The per-run series (`tolaria_operator_run_*`)
carry the run's namespace and name, one series per run that exists: they are how an alert
names the run that halted or restarts in a loop, and they are removed when the run is
deleted (`forget_run`), so the label set is bounded by the runs in the cluster. Their
namespace label is `run_namespace`, not `namespace`: the ServiceMonitor's target already
has a `namespace` (the operator's), which would rename ours to `exported_namespace`. The
reconciler, the deadline path and the escalation path record here; nothing here blocks or
talks to the API.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from leyline import EmergencyLevel, RollbackTier, RunPhase, enum_names
from leyline.v1.cluster_pb2 import IncidentAck

logger = logging.getLogger(__name__)

HANDLERS = ("reconcile", "pod_event", "deadline", "resync", "sidecar", "delete", "escalation")
"""Values of the `handler` label of reconcile errors."""

ROLLBACK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 12.0, 20.0, 30.0, 60.0, 120.0)
"""Seconds; dense around the fast tier's 0.5 s and the full tier's 12 s budgets (R12)."""

TIMED_HANDLERS = tuple(h for h in HANDLERS if h != "sidecar")
"""Handlers whose calls are timed: the sidecar follower is a daemon that lives as long as its
run, so its "duration" would say nothing about the operator's health."""

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; a reconcile is a few API calls (tens of ms), one that creates a pod or waits for
pods to go takes seconds, and anything near a minute is a stuck API server."""

RunKey = tuple[str, str]


class _PerRun(Collector):
    """`tolaria_operator_run_phase` and `tolaria_operator_run_restarts_total`, read from the
    operator's per-run record at scrape time: a run that is forgotten has no series at all."""

    def __init__(self, phases: dict[RunKey, str], restarts: dict[RunKey, int]) -> None:
        self._phases = phases
        self._restarts = restarts

    def describe(self) -> Iterable[Metric]:
        return list(self._families({}, {}))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(dict(self._phases), dict(self._restarts)))

    @staticmethod
    def _families(phases: dict[RunKey, str], restarts: dict[RunKey, int]) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "tolaria_operator_run_phase",
            "1 for the phase each TolariaRun is in (one series per run; gone when it is deleted).",
            labels=["run_namespace", "run", "phase"],
        )
        for (namespace, name), current in sorted(phases.items()):
            phase.add_metric([namespace, name, current], 1.0)
        yield phase
        counted = CounterMetricFamily(
            "tolaria_operator_run_restarts",
            "Trainer restarts and lost pods of each TolariaRun in all its attempts "
            "(status.restarts).",
            labels=["run_namespace", "run"],
        )
        for (namespace, name), restarted in sorted(restarts.items()):
            counted.add_metric([namespace, name], float(restarted))
        yield counted


class OperatorMetrics:
    """Every operator metric, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.runs = Gauge(
            "tolaria_operator_runs", "TolariaRuns by phase.", ["phase"], registry=registry
        )
        self.restarts = Counter(
            "tolaria_operator_restarts_total",
            "Trainer restarts and lost pods; counted=false for preemption and eviction.",
            ["counted"],
            registry=registry,
        )
        self.rollback_duration = Histogram(
            "tolaria_operator_rollback_duration_seconds",
            "Rollback durations reported by the sidecars.",
            ["tier"],
            buckets=ROLLBACK_BUCKETS,
            registry=registry,
        )
        self.deadline_misses = Counter(
            "tolaria_operator_deadline_misses_total",
            "Full rollbacks that missed their deadline (enforced by the operator).",
            registry=registry,
        )
        self.leader = Gauge(
            "tolaria_operator_leader",
            "1 while this replica leads (holds the leader Lease, or runs without election).",
            registry=registry,
        )
        self.incidents_open = Gauge(
            "tolaria_operator_incidents_open", "Open TolariaIncidents.", registry=registry
        )
        self.incidents = Counter(
            "tolaria_operator_incidents_total",
            "TolariaIncidents raised, by level.",
            ["level"],
            registry=registry,
        )
        self.signals = Counter(
            "tolaria_operator_incident_signals_total",
            "Runs signalled by an incident, by their answer.",
            ["ack"],
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "tolaria_operator_reconcile_errors_total",
            "Handler calls that raised (handled failures and unexpected exceptions), by handler.",
            ["handler"],
            registry=registry,
        )
        self.cached_resyncs = Counter(
            "tolaria_operator_resyncs_from_cache_total",
            "Periodic resyncs settled from the watch caches, without an API call.",
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "tolaria_operator_reconcile_duration_seconds",
            "Wall time of one handler call, by handler (the sidecar follower excluded).",
            ["handler"],
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.incident_runs = Gauge(
            "tolaria_operator_incident_runs",
            "Runs recorded in open TolariaIncidents, by their latest answer.",
            ["ack"],
            registry=registry,
        )
        for phase in enum_names(RunPhase):
            self.runs.labels(phase)
        for counted in ("true", "false"):
            self.restarts.labels(counted)
        for tier in enum_names(RollbackTier):
            self.rollback_duration.labels(tier)
        for level in enum_names(EmergencyLevel):
            self.incidents.labels(level.removeprefix("EMERGENCY_LEVEL_").lower())
        for ack in enum_names(IncidentAck):
            self.signals.labels(ack)
        for handler in HANDLERS:
            self.reconcile_errors.labels(handler)
        for handler in TIMED_HANDLERS:
            self.reconcile_duration.labels(handler)
        for ack in enum_names(IncidentAck):
            self.incident_runs.labels(ack).set(0)
        self._phases: dict[RunKey, str] = {}
        self._restarts: dict[RunKey, int] = {}
        self._open: set[str] = set()
        self._answers: dict[str, Tally[str]] = {}
        registry.register(_PerRun(self._phases, self._restarts))

    def observe_phase(self, run: RunKey, phase: str, *, restarts: int | None = None) -> None:
        """Move `run` into `phase` in the runs-by-phase gauge and its own phase series;
        `restarts` is the run's `status.restarts` (its per-run restart counter)."""
        if restarts is not None:
            self._restarts[run] = max(restarts, self._restarts.get(run, 0))
        old = self._phases.get(run)
        if old == phase:
            return
        if old is not None:
            self.runs.labels(old).dec()
        self._phases[run] = phase
        self.runs.labels(phase).inc()

    def forget_run(self, run: RunKey) -> None:
        """The run is deleted: out of the phase gauge, and its per-run series are removed."""
        self._restarts.pop(run, None)
        old = self._phases.pop(run, None)
        if old is not None:
            self.runs.labels(old).dec()

    def observe_restarts(self, added: int, counted: int) -> None:
        if counted > 0:
            self.restarts.labels("true").inc(counted)
        if added - counted > 0:
            self.restarts.labels("false").inc(added - counted)

    def incident_opened(self, name: str, level: str) -> None:
        if name not in self._open:
            self._open.add(name)
            self.incidents.labels(level).inc()
            self.incidents_open.set(len(self._open))

    def incident_closed(self, name: str) -> None:
        self._open.discard(name)
        self.incidents_open.set(len(self._open))
        if self._answers.pop(name, None) is not None:
            self._sum_answers()

    def incident_answers(self, name: str, acks: Iterable[str]) -> None:
        """The answers (IncidentAck names) of every run recorded in open incident `name`."""
        self._answers[name] = Tally(acks)
        self._sum_answers()

    def _sum_answers(self) -> None:
        total: Tally[str] = Tally()
        for answers in self._answers.values():
            total.update(answers)
        for ack in enum_names(IncidentAck):
            self.incident_runs.labels(ack).set(total.get(ack, 0))

    def reset_open_incidents(
        self, names: set[str], answers: dict[str, list[str]] | None = None
    ) -> None:
        """At start-up: the incidents found Open in the cluster, and their runs' answers."""
        self._open = set(names)
        self.incidents_open.set(len(self._open))
        self._answers = {name: Tally(acks) for name, acks in (answers or {}).items()}
        self._sum_answers()


class MetricsServer:
    """`GET /metrics` and `GET /healthz` on aiohttp, inside the operator's event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _serve(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthy(self, request: web.Request) -> web.Response:
        """Liveness that a standby answers too: kopf's own endpoint starts only after the
        startup handlers, and a standby waits for the leader lease in one."""
        del request
        return web.Response(text="ok")

    async def start(self, address: str, port: int) -> int:
        """Serve on `address:port` (0 picks a free port); returns the bound port."""
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        app.router.add_get("/healthz", self._healthy)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
        await web.SockSite(self._runner, sock).start()
        self.port = int(sock.getsockname()[1])
        logger.info("metrics served on %s:%d/metrics", address, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
