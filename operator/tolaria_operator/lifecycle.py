"""kopf glue: the operator's start and stop, kopf's own settings, the shared context in
`memo`, the `when=` filters, and the mapping of operator errors onto kopf's retry semantics.

Called by `handlers.py` only. kopf keeps its progress and last-handled spec in annotations
(`tolaria.dev/...`), never in `status`: the CRD declares only Tolaria's status fields and the
API server would prune anything else (kopf#308).

The finalizer is `tolaria.dev/finalizer`, and kopf puts it on a run only while the run is
active (its sidecar daemon and timers match; the delete handler is optional), so kopf can
stop the daemon before the run goes. A finished run carries none. An active run deleted while
no operator runs keeps its `deletionTimestamp` until the finalizer is removed by hand
(`kubectl patch trun R --type=merge -p '{"metadata":{"finalizers":null}}'`); nothing is lost
by that, because the run's objects are removed by the garbage collector through their
ownerReferences, not by the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Mapping
from typing import Any, cast

import kopf

from leyline.v1.cluster_pb2 import IncidentAck, IncidentPhase
from tolaria_operator import deadline, leader, reconciler, retention
from tolaria_operator import status as run_status
from tolaria_operator.config import from_env
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.errors import KubeApiError, OperatorError, SpecInvalid
from tolaria_operator.incidents import parse_incident_status
from tolaria_operator.kube import KubeApi
from tolaria_operator.metrics import TIMED_HANDLERS, MetricsServer
from tolaria_operator.resources import INCIDENTS

logger = logging.getLogger(__name__)

CONTEXT_KEY = "tolaria"
"""Key of the `OperatorContext` in kopf's memo; an embedding test may put its own there."""
METRICS_KEY = "tolaria_metrics_server"
SWEEP_KEY = "tolaria_retention_sweep"
ELECTOR_KEY = "tolaria_leader_elector"
"""Key of the `LeaderElector` in kopf's memo; an embedding test may put its own there."""
RENEWAL_KEY = "tolaria_leader_renewal"
FINALIZER = "tolaria.dev/finalizer"
ANNOTATION_PREFIX = "tolaria.dev"


class KopfEvents:
    """Posts Kubernetes Events through kopf's event poster."""

    def post(self, ref: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            kopf.event(
                cast("kopf.Body", dict(ref)), type=type_, reason=reason, message=message[:1024]
            )
        except Exception as err:
            logger.debug("event %s on %s not posted: %s", reason, ref.get("metadata"), err)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's persistence in annotations and Tolaria's finalizer name."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Configure kopf, build the context (settings from the environment) unless one is given,
    start the metrics endpoint and the retention sweep (its first sweep comes one interval
    later). With leader election on, it first waits here until this replica holds the leader
    Lease (kopf watches and handles nothing before its startup handlers return), then renews
    it in a task; the election has its own credentials, since kopf logs in after this."""
    configure_kopf(settings)
    if not isinstance(memo.get(CONTEXT_KEY), OperatorContext):
        memo[CONTEXT_KEY] = build_context(from_env(os.environ), events=KopfEvents())
    ctx = context(memo)
    if ctx.settings.metrics.port > 0:
        server = MetricsServer(ctx.metrics.registry)
        await server.start(ctx.settings.metrics.address, ctx.settings.metrics.port)
        memo[METRICS_KEY] = server
    await lead(ctx, memo)
    memo[SWEEP_KEY] = asyncio.create_task(
        retention.sweep_forever(ctx), name="tolaria-retention-sweep"
    )


def start_pod_watch(ctx: OperatorContext) -> None:
    """Once per process, from the first handler (kopf has logged in by then): follow the
    operator's pods, each change reconciling its run."""
    informer = ctx.pods
    if informer is None or ctx.pod_watch is not None:
        return

    async def changed(kind: str, body: dict[str, Any]) -> None:
        await handle(ctx, "pod_event", reconciler.on_pod_event(ctx, kind, body))

    informer.on_event = changed
    ctx.pod_watch = asyncio.create_task(informer.run(), name="tolaria-pod-watch")


async def lead(ctx: OperatorContext, memo: kopf.Memo) -> None:
    """Returns once this replica may handle runs: at once without election, else when it
    holds the leader Lease (renewed from then on by a task that `cleanup` stops)."""
    election = ctx.settings.leader_election
    if not election.enabled:
        ctx.metrics.leader.set(1)
        return
    elector = memo.get(ELECTOR_KEY)
    if not isinstance(elector, leader.LeaderElector):
        elector = leader.LeaderElector(
            KubeApi(leader.cluster_configuration()),
            namespace=ctx.settings.network.operator_namespace,
            name=election.lease_name,
            identity=leader.default_identity(),
            on_lost=leader.exit_now,
            lease_duration_s=election.lease_duration_seconds,
            renew_deadline_s=election.renew_deadline_seconds,
            retry_period_s=election.retry_period_seconds,
            clock=ctx.clock,
            on_leading=lambda leading: ctx.metrics.leader.set(int(leading)),
        )
        memo[ELECTOR_KEY] = elector
    ctx.metrics.leader.set(0)
    await elector.acquire()
    memo[RENEWAL_KEY] = asyncio.create_task(elector.renew_forever(), name="tolaria-leader-lease")


async def count_open_incidents(ctx: OperatorContext) -> None:
    """Once per process, before the first handler's work: the incidents left Open by an
    earlier operator (the open-incidents gauge starts from them). Best effort."""
    if ctx.incidents_counted:
        return
    ctx.incidents_counted = True
    try:
        found = await ctx.kube.list(INCIDENTS, None)
    except KubeApiError as err:
        logger.warning("open incidents not counted: %s", err)
        return
    answers: dict[str, list[str]] = {}
    for incident in found:
        status = parse_incident_status(incident.get("status"))
        if status.phase == IncidentPhase.Open:
            answers[str(incident["metadata"]["name"])] = [
                IncidentAck.Name(r.ack)  # type: ignore[arg-type]
                for r in status.runs
            ]
    ctx.metrics.reset_open_incidents(set(answers), answers)


async def cleanup(memo: kopf.Memo) -> None:
    sweep = memo.get(SWEEP_KEY)
    if isinstance(sweep, asyncio.Task):
        sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweep
    ctx = memo.get(CONTEXT_KEY)
    watch = getattr(ctx, "pod_watch", None)
    if isinstance(watch, asyncio.Task):
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        ctx.pod_watch = None  # type: ignore[union-attr]
    renewal = memo.get(RENEWAL_KEY)  # the Lease goes last: nothing of ours runs after it
    if isinstance(renewal, asyncio.Task):
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal
    elector = memo.get(ELECTOR_KEY)
    if isinstance(elector, leader.LeaderElector):
        await elector.release()
        await elector.close()
    server = memo.get(METRICS_KEY)
    if isinstance(server, MetricsServer):
        await server.stop()
    close = getattr(getattr(ctx, "kube", None), "close", None)
    if close is not None:
        await close()


def context(memo: kopf.Memo) -> OperatorContext:
    """The shared context; a handler before start-up finished retries."""
    ctx = memo.get(CONTEXT_KEY)
    if not isinstance(ctx, OperatorContext):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return ctx


async def handle(ctx: OperatorContext, handler: str, work: Awaitable[object]) -> None:
    """Run `work`, timed and counted, mapping errors: a spec that cannot run is permanent (kopf
    stops retrying until the spec changes); an operator error heals and is retried after a
    delay. Any other exception (a bug, an unexpected answer) is counted too - an error rate
    that only saw the failures we foresaw would stay flat while the operator breaks - and
    re-raised unchanged, so kopf logs its traceback and retries as it does for any error.
    Cancellation (kopf stopping a daemon or the operator) is neither an error nor counted."""
    timer = (
        ctx.metrics.reconcile_duration.labels(handler).time()
        if handler in TIMED_HANDLERS
        else contextlib.nullcontext()
    )
    with timer:
        try:
            start_pod_watch(ctx)
            await count_open_incidents(ctx)
            await work
        except SpecInvalid as err:
            ctx.metrics.reconcile_errors.labels(handler).inc()
            raise kopf.PermanentError(str(err)) from err
        except OperatorError as err:
            ctx.metrics.reconcile_errors.labels(handler).inc()
            delay = ctx.settings.status.retry_delay_seconds
            raise kopf.TemporaryError(str(err), delay=delay) from err
        except Exception:
            ctx.metrics.reconcile_errors.labels(handler).inc()
            raise


def run_is_active(status: Mapping[str, Any] | None = None, **_: Any) -> bool:
    """`when=` filter: the run is not in a final phase."""
    return run_status.is_active(status)


def rollback_pending(status: Mapping[str, Any] | None = None, **_: Any) -> bool:
    """`when=` filter: a full rollback is in progress (its deadline must be watched)."""
    return deadline.pending_in_body(status)
