"""The reconcile loop of one run: read, plan (`status.plan_run`), act, write status (R10.1-R10.3).

Called by every kopf handler that touches a run (create, resume, spec update, pod events,
the deadline timer, the resync timer, the sidecar follower). One reconcile of a run at a
time (a per-run lock), so the status has a single writer in this process; level-based, so
running it twice or after a restart changes nothing.

Order of the actions, and why: idempotent side effects first (the deadline incident has a
deterministic name), then pod deletions, then the status patch (the new attempt number is
recorded before its pod exists, so a crash in between creates the same pod again instead
of counting a loss), then - only once every other pod of the run is gone - the new pod, and
the pod's name last. It never deletes a pod it did not plan to delete, and never creates a
second pod while one of the run's pods still exists.

Ownership: an object is the run's only when it names the run's UID among its ownerReferences.
Before a pod is created the run's fixed names (manifest ConfigMap, Service, NetworkPolicy, the
pod) are checked; one taken by an object the run does not own is a name conflict: the run
waits with `Ready=False, reason=NameConflict` naming it, and the object is neither used nor
changed. The token Secret gets a fresh random name per attempt (the operator cannot read
Secrets, so it could not tell an existing one is its own). Deleting a run deletes nothing by
name: Kubernetes' garbage collector removes exactly the objects owned by it.

A spec that cannot become a pod is never retried in a loop: a pod that cannot be built, or
that the API server refuses as invalid (422), fails the run with the reason in one reconcile;
a spec the model cannot read gets `Ready=False` with the reason. Both then raise `SpecInvalid`,
which `lifecycle.handle` counts as a reconcile error and turns into kopf's permanent error. A
pod turned away for now (400, 403) is retried like any API error, and counted each time, with
`Ready=False` and reason `PodRefused` quoting the server meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from leyline import RunPhase
from leyline.spec.status import CheckpointStatus, TolariaRunStatus
from tolaria_operator import conditions as cond
from tolaria_operator import escalation
from tolaria_operator.clock import format_time
from tolaria_operator.context import OperatorContext, RunKey
from tolaria_operator.errors import (
    KubeApiError,
    ObjectExists,
    PodNotGone,
    SidecarCallFailed,
    SidecarUnavailable,
    SpecInvalid,
)
from tolaria_operator.observation import view_pod
from tolaria_operator.pods import attempt_pod, owned_objects, token_secret, token_suffix
from tolaria_operator.resources import (
    CONFIGMAPS,
    MANAGED_BY_LABEL,
    MANAGER,
    NETWORK_POLICIES,
    PODS,
    RUN_LABEL,
    RUNS,
    SECRETS,
    SERVICES,
    RunObject,
    enum_name,
    has_owner,
    owned_by,
    parse_run,
    pod_name,
    status_patch,
    status_wire,
    token_name,
)
from tolaria_operator.status import FINAL, Plan, plan_run, spec_refused
from tolaria_operator.view import to_datetime

logger = logging.getLogger(__name__)

_RESOURCE_BY_KIND = {
    "ConfigMap": CONFIGMAPS,
    "Service": SERVICES,
    "NetworkPolicy": NETWORK_POLICIES,
}
TOKEN_NAME_TRIES = 3
"""Random token Secret names tried before giving up (a clash of 32 random bits is already
someone guessing)."""


async def sync_run(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    *,
    gone: Mapping[str, Any] | None = None,
    cached: Mapping[str, Any] | None = None,
) -> None:
    """Reconcile one run now. Raises `SpecInvalid` (give up until the spec changes),
    `KubeApiError` and `PodNotGone` (retry later).

    With `cached` (kopf's copy of the run, for the periodic resync) the run is first planned
    from that copy and the pod cache: when that plan changes nothing, nothing is read or
    written. Any plan that acts is made again from fresh reads, and only that one is carried
    out, so a stale cache can cost a read but never causes an action."""
    async with ctx.lock((namespace, name)):
        if cached is not None and gone is None and _settled(ctx, cached):
            ctx.metrics.cached_resyncs.inc()
            return
        for _ in range(2):  # a second pass once deleted pods are gone (e.g. Suspended)
            if not await _sync_once(ctx, namespace, name, gone):
                return
            gone = None


UNPROCESSABLE = 422
"""The API server's answer to an object that fails validation (or a validating admission
policy): the same pod would be refused again."""
TURNED_AWAY = frozenset({400, 403})
"""Answers that may change without the spec changing (a quota, a PriorityClass or
ServiceAccount created later, an admission webhook): retried, and said in the status."""


async def _sync_once(
    ctx: OperatorContext, namespace: str, name: str, gone: Mapping[str, Any] | None
) -> bool:
    """One read-plan-act pass; True when deleted pods are gone and another pass is due."""
    body = await ctx.kube.get(RUNS, namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    try:
        run = parse_run(body)
    except SpecInvalid as err:
        await _spec_refused(ctx, namespace, name, body, err)
        return False
    pods = await run_pods(ctx, run)
    if gone is None:
        gone = _last_state_of_missing_pod(ctx, run, pods)
    now = ctx.clock.now()

    def planned(refused: str = "", blocked: str = "", conflict: str = "") -> Plan:
        return plan_run(
            run,
            [view_pod(p) for p in pods],
            view_pod(gone) if gone else None,
            ctx.views.get(run.key),
            now,
            ctx.settings,
            refused=refused,
            blocked=blocked,
            conflict=conflict,
        )

    plan = planned()
    build: Callable[[str], dict[str, Any]] | None = None
    if plan.create is not None:
        create = plan.create

        def pod_for(secret: str) -> dict[str, Any]:
            return attempt_pod(
                run,
                create.attempt,
                ctx.settings,
                restarts_before=create.restarts_before,
                counted_before=create.counted_before,
                created_at=format_time(now),
                token_secret=secret,
            )

        try:  # a spec that cannot become a pod is refused before anything is created
            pod_for(token_name(run.name, create.attempt, "0" * 8))
            build = pod_for
        except ValueError as err:
            plan = planned(f"the operator cannot build it: {err}")
    return await _execute(ctx, run, plan, now, build, planned)


def _last_state_of_missing_pod(
    ctx: OperatorContext, run: RunObject, pods: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The run's current pod is gone from a fresh read: its last state from the pod watch, if
    the watch saw it (the read can come before the DELETED event is handled)."""
    name = run.status.pod_name
    if not name or ctx.pods is None or any(p["metadata"]["name"] == name for p in pods):
        return None
    last = ctx.pods.last_state(run.namespace, name)
    return last if last is not None and owned_by(last, run) else None


def _settled(ctx: OperatorContext, body: Mapping[str, Any]) -> bool:
    """Whether the run, as cached, needs nothing: its plan from the cached run and pods
    creates, deletes, raises and writes nothing. False whenever the cache cannot say."""
    informer = ctx.pods
    if (
        informer is None
        or not informer.synced
        or (body.get("metadata") or {}).get("deletionTimestamp")
    ):
        return False
    try:
        run = parse_run(body)
    except SpecInvalid:
        return False
    pods = [p for p in informer.select(run.namespace, {RUN_LABEL: run.name}) if owned_by(p, run)]
    plan = plan_run(
        run,
        [view_pod(p) for p in pods],
        None,
        ctx.views.get(run.key),
        ctx.clock.now(),
        ctx.settings,
    )
    changed = set(status_patch(run.raw_status, plan.status)) - RATE_LIMITED_FIELDS
    return (
        plan.create is None
        and not plan.delete_pods
        and plan.deadline_missed is None
        and not plan.checkpoint_then_stop
        and not plan.refused
        and not plan.notes
        and not plan.restarts_added
        and plan.status.phase not in FINAL
        and not changed
    )


RATE_LIMITED_FIELDS = frozenset({"progress", "latestSnapshot", "latestCheckpoint"})
"""Status fields the sidecar follower writes at its own pace (`watcher.Flusher`): a change in
them alone does not make a resync write."""


async def _spec_refused(
    ctx: OperatorContext, namespace: str, name: str, body: Mapping[str, Any], err: SpecInvalid
) -> None:
    """A spec the model refuses: Ready=False naming it, once per generation; raises
    `SpecInvalid` when newly recorded (counted once, not on every resync)."""
    meta = body.get("metadata") or {}
    status = spec_refused(
        body.get("status") or {}, int(meta.get("generation") or 0), err.detail, ctx.clock.now()
    )
    if status is None:
        return
    patch = status_patch(body.get("status") or {}, status)
    await ctx.kube.patch(RUNS, namespace, name, {"status": patch}, subresource="status")
    reference = {
        "apiVersion": f"{RUNS.group}/{RUNS.version}",
        "kind": "TolariaRun",
        "metadata": {"name": name, "namespace": namespace, "uid": str(meta.get("uid", ""))},
    }
    ctx.events.post(reference, "Warning", status.reason, err.detail)
    raise err


def run_pod_labels(run: str) -> dict[str, str]:
    """The labels every pod of `run` carries (the pod watch's selector and the run's)."""
    return {MANAGED_BY_LABEL: MANAGER, RUN_LABEL: run}


async def run_pods(ctx: OperatorContext, run: RunObject) -> list[dict[str, Any]]:
    """The run's pods (by label and owner uid)."""
    pods = await ctx.kube.list(PODS, run.namespace, run_pod_labels(run.name))
    return [p for p in pods if owned_by(p, run)]


async def _execute(
    ctx: OperatorContext,
    run: RunObject,
    plan: Plan,
    now: datetime,
    build: Callable[[str], dict[str, Any]] | None,
    replan: Callable[..., Plan],
) -> bool:
    status = plan.status
    conflicts = await name_conflicts(ctx, run, plan.create.attempt) if plan.create else []
    if conflicts:  # the planner says so in the status (its Event included), then Ready
        plan = replan(conflict=cond.name_conflict_message(conflicts))
        status = _conflicted(ctx, run, plan.status, conflicts, now, post=False)
    if plan.deadline_missed is not None:
        ctx.metrics.deadline_misses.inc()
        logger.error(
            "%s/%s: full rollback %s missed its deadline %s",
            run.namespace,
            run.name,
            plan.deadline_missed.id,
            plan.deadline_missed.deadline,
        )
        ref = await escalation.raise_deadline_incident(ctx, run, status)
        if ref is not None:
            status = status.model_copy(update={"incident": ref})
    if plan.checkpoint_then_stop:
        checkpoint = await checkpoint_then_stop(ctx, run)
        if checkpoint is not None:
            status = status.model_copy(update={"latest_checkpoint": checkpoint})
    deleted = []
    for pod in plan.delete_pods:
        await ctx.kube.delete(PODS, run.namespace, pod)
        deleted.append(pod)
        logger.info("%s/%s: deleted pod %s", run.namespace, run.name, pod)
    written = await write_status(ctx, run, run.raw_status, status)
    _record(ctx, run, plan, status)
    await _resolve_if_source_ended(ctx, run, status)
    if plan.refused:
        raise SpecInvalid(f"{run.namespace}/{run.name}", plan.refused)
    if plan.create is None or build is None or conflicts:
        return bool(deleted and await _gone(ctx, run, deleted, wait=False))
    await wait_for_no_pods(ctx, run)
    conflicts = await ensure_owned(ctx, run)
    if conflicts:  # taken between the check and the creation
        await write_status(ctx, run, written, _conflicted(ctx, run, status, conflicts, now))
        return False
    create = plan.create
    manifest = build(await create_token_secret(ctx, run, create.attempt))
    try:
        await ctx.kube.create(PODS, run.namespace, manifest)
        logger.info(
            "%s/%s: created pod %s", run.namespace, run.name, pod_name(run.name, create.attempt)
        )
    except ObjectExists:
        name = pod_name(run.name, create.attempt)
        existing = await ctx.kube.get(PODS, run.namespace, name)
        if existing is not None and not has_owner(existing, run.uid):
            taken = [_describe("Pod", run.namespace, name)]
            await write_status(ctx, run, written, _conflicted(ctx, run, status, taken, now))
            return False
        logger.info(
            "%s/%s: pod of attempt %d already exists", run.namespace, run.name, create.attempt
        )
    except KubeApiError as err:
        said = f"{err.status} {err.reason}: {err.detail}"
        if err.status == UNPROCESSABLE:
            refused = replan(refused=f"the API server refused it: {said}")
            await write_status(ctx, run, written, refused.status)
            _record(ctx, run, refused, refused.status)
            raise SpecInvalid(f"{run.namespace}/{run.name}", refused.refused) from err
        if err.status in TURNED_AWAY:
            blocked = replan(blocked=said)
            await write_status(ctx, run, written, blocked.status)
            _record(ctx, run, blocked, blocked.status)
        raise
    final = status.model_copy(update={"pod_name": pod_name(run.name, create.attempt)})
    await write_status(ctx, run, written, final)
    return False


async def _resolve_if_source_ended(
    ctx: OperatorContext, run: RunObject, status: TolariaRunStatus
) -> None:
    """A run that raised an incident and then ended (halted, failed, succeeded) has nothing
    left to recover: its emergency ended with its pod, so the incident resolves and the runs
    it reached are released (those that halted meanwhile stay halted)."""
    ref = status.incident
    if status.phase not in FINAL or ref is None or ref.role != "source" or not ref.name:
        return
    phase = enum_name(RunPhase, status.phase)
    detail = f": {status.reason}" if status.reason else ""
    await escalation.resolve_incident(
        ctx,
        ref.name,
        by=escalation.OPERATOR,
        reason=f"source run {run.namespace}/{run.name} ended {phase}{detail}",
    )


def _record(ctx: OperatorContext, run: RunObject, plan: Plan, status: TolariaRunStatus) -> None:
    phase = enum_name(RunPhase, status.phase or RunPhase.Pending)
    ctx.metrics.observe_phase(run.key, phase, restarts=status.restarts)
    ctx.metrics.observe_restarts(plan.restarts_added, plan.counted_added)
    for note in plan.notes:
        ctx.events.post(run.reference(), note.type, note.reason, note.message)
        level = (
            logging.ERROR if status.phase in (RunPhase.Failed, RunPhase.Halted) else logging.INFO
        )
        logger.log(level, "%s/%s: %s: %s", run.namespace, run.name, note.reason, note.message)


async def write_status(
    ctx: OperatorContext, run: RunObject, prev: Mapping[str, Any], status: TolariaRunStatus
) -> dict[str, Any]:
    """Patch the run's status from `prev` to `status` (only what changed); returns the new
    wire form. A change of the follower's own fields alone (progress, newest snapshot and
    checkpoint) is left to its rate-limited writer, so a reconcile never adds a progress
    write to the operator-wide budget."""
    patch = status_patch(prev, status)
    if set(patch) <= RATE_LIMITED_FIELDS:
        patch = {}
    if patch:
        await ctx.kube.patch(RUNS, run.namespace, run.name, {"status": patch}, subresource="status")
    return status_wire(status)


async def _gone(ctx: OperatorContext, run: RunObject, names: list[str], *, wait: bool) -> bool:
    settings = ctx.settings.status
    loop = asyncio.get_running_loop()
    end = loop.time() + (settings.pod_gone_timeout_seconds if wait else 0.0)
    while True:
        left = [n for n in names if await ctx.kube.get(PODS, run.namespace, n) is not None]
        if not left:
            return True
        if loop.time() >= end:
            return False
        await asyncio.sleep(settings.pod_gone_poll_seconds)


async def wait_for_no_pods(ctx: OperatorContext, run: RunObject) -> None:
    """Blocking recreate: wait (bounded) until no pod of the run exists; raises `PodNotGone`."""
    pods = [p["metadata"]["name"] for p in await run_pods(ctx, run)]
    if pods and not await _gone(ctx, run, pods, wait=True):
        raise PodNotGone(", ".join(pods), ctx.settings.status.pod_gone_timeout_seconds)


def _describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


async def name_conflicts(ctx: OperatorContext, run: RunObject, attempt: int) -> list[str]:
    """The objects that hold a name the run needs (its manifest ConfigMap, Service,
    NetworkPolicy, the pod of `attempt`) without being owned by it. Reads only."""
    found = await _named_conflicts(ctx, run)
    pod = await ctx.kube.get(PODS, run.namespace, pod_name(run.name, attempt))
    if pod is not None and not has_owner(pod, run.uid):
        found.append(_describe("Pod", run.namespace, pod_name(run.name, attempt)))
    return found


async def _named_conflicts(ctx: OperatorContext, run: RunObject) -> list[str]:
    found = []
    for obj in owned_objects(run, ctx.settings):
        name = obj["metadata"]["name"]
        existing = await ctx.kube.get(_RESOURCE_BY_KIND[obj["kind"]], run.namespace, name)
        if existing is not None and not has_owner(existing, run.uid):
            found.append(_describe(obj["kind"], run.namespace, name))
    return found


def _conflicted(
    ctx: OperatorContext,
    run: RunObject,
    status: TolariaRunStatus,
    objects: list[str],
    now: datetime,
    *,
    post: bool = True,
) -> TolariaRunStatus:
    """`status` with Ready=False/NameConflict; an Event the first time it is set (unless the
    plan's own note already announces it: `post=False`)."""
    marked = cond.name_conflict(status.conditions, objects, format_time(now), run.generation)
    ready = cond.find(marked, cond.READY)
    before = cond.find(run.status.conditions, cond.READY)
    if ready is not None and (before is None or before.message != ready.message):
        logger.error("%s/%s: %s", run.namespace, run.name, ready.message)
        if post:
            ctx.events.post(run.reference(), "Warning", cond.NAME_CONFLICT, ready.message)
    return status.model_copy(update={"conditions": marked})


async def ensure_owned(ctx: OperatorContext, run: RunObject) -> list[str]:
    """The manifest ConfigMap, the headless Service and the NetworkPolicy: each created when
    missing, an existing one kept when the run owns it (never patched: the run's own). Returns
    the ones found taken by an object the run does not own (created since `name_conflicts`)."""
    conflicts = []
    for obj in owned_objects(run, ctx.settings):
        resource, name = _RESOURCE_BY_KIND[obj["kind"]], obj["metadata"]["name"]
        try:
            await ctx.kube.create(resource, run.namespace, obj)
        except ObjectExists:
            existing = await ctx.kube.get(resource, run.namespace, name)
            if existing is not None and not has_owner(existing, run.uid):
                conflicts.append(_describe(obj["kind"], run.namespace, name))
    return conflicts


async def create_token_secret(ctx: OperatorContext, run: RunObject, attempt: int) -> str:
    """A new Secret with the run token and a new control-port certificate (`control_tls`) for
    the pod of `attempt`, under a random name; returns
    the name. Never one that exists: the operator cannot read a Secret to check its owner."""
    token = await ctx.tokens.token(run.namespace, run.name, run.uid)
    tls = (await ctx.tokens.ca()).issue(run.namespace, run.name)
    for _ in range(TOKEN_NAME_TRIES):
        name = token_name(run.name, attempt, token_suffix())
        try:
            await ctx.kube.create(SECRETS, run.namespace, token_secret(run, name, token, tls))
        except ObjectExists:
            logger.warning("%s/%s: Secret %s exists; another name", run.namespace, run.name, name)
            continue
        return name
    raise ObjectExists(
        "POST",
        SECRETS.path(run.namespace),
        409,
        "AlreadyExists",
        f"{TOKEN_NAME_TRIES} random token Secret names were taken",
    )


async def checkpoint_then_stop(ctx: OperatorContext, run: RunObject) -> CheckpointStatus | None:
    """Ask the sidecar for a durable checkpoint and to stop the trainer after it (suspend),
    bounded by `suspend.checkpoint_timeout_seconds`. Returns the checkpoint, or None when the
    sidecar could not make one (the last committed checkpoint is then the resume point)."""
    timeout = ctx.settings.suspend.checkpoint_timeout_seconds
    try:
        client = await ctx.sidecars.open(run.namespace, run.name)
    except SidecarUnavailable as err:
        _suspend_warning(ctx, run, f"no checkpoint before suspending: {err}")
        return None
    async with client:
        try:
            answer = await client.request_checkpoint("suspend", stop_after=True, timeout_s=timeout)
        except (SidecarUnavailable, SidecarCallFailed) as err:
            _suspend_warning(ctx, run, f"no checkpoint before suspending: {err}")
            return None
    record = answer.checkpoint
    if answer.error or not record.checkpoint_id:
        _suspend_warning(ctx, run, f"checkpoint not durable before suspending: {answer.error}")
        return None
    committed = to_datetime(record.committed_at)
    logger.info(
        "%s/%s: suspend checkpoint %s durable", run.namespace, run.name, record.checkpoint_id
    )
    return CheckpointStatus(
        id=record.checkpoint_id,
        epoch=record.epoch,
        step=record.global_step,
        time=format_time(committed) if committed else "",
        bytes=record.payload_bytes,
    )


def _suspend_warning(ctx: OperatorContext, run: RunObject, message: str) -> None:
    logger.warning("%s/%s: %s", run.namespace, run.name, message)
    ctx.events.post(run.reference(), "Warning", "SuspendCheckpointMissing", message)


async def on_pod_event(ctx: OperatorContext, event_type: str, body: Mapping[str, Any]) -> None:
    """A pod of some run changed: reconcile its run (with the last state of a deleted pod, so a
    preemption is told from a loss)."""
    meta = body.get("metadata") or {}
    run = (meta.get("labels") or {}).get(RUN_LABEL)
    namespace = meta.get("namespace")
    if not run or not namespace:
        return
    await sync_run(ctx, str(namespace), str(run), gone=body if event_type == "DELETED" else None)


async def patch_progress(ctx: OperatorContext, key: RunKey) -> bool:
    """Write the sidecar's progress, newest snapshot and checkpoint (the rate-limited path: no
    phase change, no read). False when the run is gone."""
    view = ctx.views.get(key)
    if view is None:
        return True
    patch: dict[str, Any] = {}
    for field, value in (
        ("progress", view.progress),
        ("latestSnapshot", view.latest_snapshot),
        ("latestCheckpoint", view.latest_checkpoint),
    ):
        if value is not None:
            patch[field] = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not patch:
        return True
    answer = await ctx.kube.patch(RUNS, key[0], key[1], {"status": patch}, subresource="status")
    return answer is not None


async def delete_run(
    ctx: OperatorContext, namespace: str, name: str, body: Mapping[str, Any]
) -> None:
    """The run is being deleted (seen by the operator: the handler is optional and holds no
    finalizer). Deletes nothing by name: everything the run made carries its ownerReference,
    and Kubernetes' garbage collector removes exactly those objects once the run is gone,
    with or without this operator, never one that only shares a name. What is left is the
    incident it raised (resolved) and the operator's memory of it. Reads only metadata and
    status, so even a run whose spec no longer validates can go."""
    incident = ((body.get("status") or {}).get("incident")) or {}
    if incident.get("role") == "source" and incident.get("name"):
        await escalation.resolve_incident(
            ctx,
            str(incident["name"]),
            by="tolaria-operator",
            reason=f"source run {namespace}/{name} deleted",
        )
    ctx.forget((namespace, name))
    logger.info("%s/%s: deleted; the garbage collector removes what it owns", namespace, name)
