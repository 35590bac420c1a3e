"""Kueue's pod integration as the planner sees it: a pod held by Kueue's admission gate is
queued (not failing to start), the pod start timeout counts from admission, and a pod Kueue
takes back (preemption, eviction) is a disruption, never a counted restart. Each attempt's pod
carries the run's queue label, so the next attempt queues again."""

from __future__ import annotations

import pytest

from tests.operator import builders as b
from tests.operator.test_status import attempt, condition, plan, wire
from tolaria_operator.resources import KUEUE_QUEUE_LABEL, RunObject

QUEUE = {KUEUE_QUEUE_LABEL: "team-a"}
TIMEOUT_S = 60


def queued_run(**spec: object) -> RunObject:
    """Attempt 1 of a run in Kueue queue `team-a` with a short pod start timeout."""
    body = {"failurePolicy": {"podStartTimeoutSeconds": TIMEOUT_S}, **spec}
    return attempt(b.run_object(labels=QUEUE, spec=body), 1)


@pytest.mark.req("R10.1")
def test_a_gated_pod_past_the_start_timeout_is_queued_not_failed() -> None:
    """Waiting for quota is not failing to start: an hour in the queue must not end the run."""
    run = queued_run()
    p = plan(run, [b.gated(b.new_pod(run, 1, created=b.at(0)))], now=3600)
    w = wire(p)
    assert (w["phase"], w["reason"]) == ("Pending", "Queued")
    assert "waiting for Kueue admission" in w["message"]
    assert p.delete_pods == [] and p.create is None
    assert (condition(p, "Admitted")["status"], condition(p, "Admitted")["reason"]) == (
        "False",
        "Queued",
    )
    assert condition(p, "Failed")["status"] == "False"
    assert condition(p, "Degraded")["status"] == "False"


@pytest.mark.req("R10.1")
def test_a_pod_gated_only_by_its_scheduled_condition_is_queued() -> None:
    """The scheduler's PodScheduled=False/SchedulingGated alone also means queued (a view of
    the pod whose spec was not read)."""
    run = queued_run()
    pod = b.gated(b.new_pod(run, 1, created=b.at(0)))
    del pod["spec"]["schedulingGates"]
    assert wire(plan(run, [pod], now=3600))["reason"] == "Queued"


@pytest.mark.req("R10.1")
def test_the_start_timeout_counts_from_admission_not_creation() -> None:
    """Created at 0, queued until 1000: unschedulable after admission fails at 1000 + 60, not
    at once."""
    run = queued_run()
    pod = b.gated(b.new_pod(run, 1, created=b.at(0)))
    queued = plan(run, [pod], now=1000)
    run = b.with_status(run, **wire(queued))
    pod = b.unschedulable(b.admitted(pod))

    admitted = plan(run, [pod], now=1001)
    assert (wire(admitted)["phase"], wire(admitted)["reason"]) == ("Pending", "Unschedulable")
    assert condition(admitted, "Admitted")["status"] == "True"
    run = b.with_status(run, **wire(admitted))

    within = plan(run, [pod], now=1001 + TIMEOUT_S - 1)
    assert wire(within)["phase"] == "Pending"
    past = plan(run, [pod], now=1001 + TIMEOUT_S + 1)
    assert (wire(past)["phase"], wire(past)["reason"]) == ("Failed", "PodStartTimeout")


@pytest.mark.req("R10.1")
def test_a_run_never_queued_still_times_out_from_creation() -> None:
    """Admitted=True since before the pod was made: the pod's creation starts the clock."""
    run = queued_run()
    pod = b.unschedulable(b.new_pod(run, 1, created=b.at(0)))
    first = plan(run, [pod], now=1)
    run = b.with_status(run, **wire(first))
    w = wire(plan(run, [pod], now=TIMEOUT_S + 1))
    assert (w["phase"], w["reason"]) == ("Failed", "PodStartTimeout")


@pytest.mark.req("R10.2")
@pytest.mark.parametrize(
    ("condition_type", "reason"),
    [
        ("TerminationTarget", "StoppedByKueue"),
        ("DisruptionTarget", "Preempted"),
        ("DisruptionTarget", "EvictedByKueue"),
    ],
)
def test_a_kueue_preemption_is_not_counted_and_the_next_attempt_queues_again(
    condition_type: str, reason: str
) -> None:
    """With `restarts.limit: 0` any counted restart would fail the run; Kueue taking its quota
    back must not. The next attempt's pod carries the queue label, so Kueue gates it again."""
    run = queued_run(restarts={"limit": 0})
    pod = b.stopped_by_kueue(b.new_pod(run, 1), condition_type, reason)
    p = plan(run, [pod], now=100)
    w = wire(p)
    assert (w["phase"], w["reason"]) == ("Restarting", reason)
    assert (w["restarts"], w["restartsCounted"]) == (1, 0)
    assert "firstFailure" not in w
    assert p.create is not None and p.create.attempt == 2

    run = attempt(run, 2, phase="Restarting", reason=reason, restarts=1, restartsCounted=0)
    next_pod = b.new_pod(run, 2, created=b.at(101), restarts_before=1)
    assert next_pod["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    again = plan(run, [b.gated(next_pod)], now=101 + 10 * TIMEOUT_S)
    assert (wire(again)["phase"], wire(again)["reason"]) == ("Restarting", "Queued")
    assert condition(again, "Admitted")["status"] == "False"


@pytest.mark.req("R10.2")
def test_a_pod_kueue_deleted_while_nobody_watched_is_not_counted() -> None:
    """The last state of the deleted pod (the watch's DELETED event) tells Kueue's stop from a
    loss."""
    run = queued_run(restarts={"limit": 0})
    p = plan(run, [], gone=b.stopped_by_kueue(b.new_pod(run, 1)), now=100)
    w = wire(p)
    assert (w["phase"], w["restartsCounted"], w["reason"]) == ("Restarting", 0, "StoppedByKueue")
    assert p.create is not None and p.create.attempt == 2
