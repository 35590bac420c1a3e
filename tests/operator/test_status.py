"""Run + pods (+ sidecar view) -> next status and actions: every failure class, the restart
limit, the start timeout, the first failure, conditions, suspend (R10.1-R10.3). Every status
planned here is validated against the CRD's model, so nothing the operator writes would be
pruned."""

from __future__ import annotations

from typing import Any

import pytest

from leyline.spec import TolariaRunStatus
from tests.operator import builders as b
from tolaria_operator import conditions as cond
from tolaria_operator.config import TolariaSettings
from tolaria_operator.observation import view_pod
from tolaria_operator.resources import RunObject, status_wire
from tolaria_operator.status import Plan, plan_run, spec_refused
from tolaria_operator.view import SidecarView

SETTINGS = TolariaSettings()


def plan(
    run: RunObject,
    pods: list[dict[str, Any]] = (),
    *,
    now: float = 10.0,
    gone: dict[str, Any] | None = None,
    view: SidecarView | None = None,
) -> Plan:
    result = plan_run(
        run,
        [view_pod(p) for p in pods],
        view_pod(gone) if gone else None,
        view,
        b.at(now),
        SETTINGS,
    )
    wire = status_wire(result.status)
    TolariaRunStatus.model_validate(wire, strict=False)  # the CRD keeps every field we write
    return result


def wire(p: Plan) -> dict[str, Any]:
    return status_wire(p.status)


def condition(p: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in wire(p)["conditions"] if c["type"] == type_)


def attempt(run: RunObject, n: int, pod_name: str | None = None, **status: Any) -> RunObject:
    """The run as it stands once attempt `n` has been created."""
    status.setdefault("phase", "Pending")
    name = pod_name if pod_name is not None else f"r1-a{n}"
    return b.with_status(run, attempt=n, podName=name, **status)


@pytest.mark.req("R10.1")
def test_a_new_run_plans_its_first_attempt() -> None:
    p = plan(b.run_object())
    assert p.create is not None and (p.create.attempt, p.create.restarts_before) == (1, 0)
    w = wire(p)
    assert (w["phase"], w["attempt"], w["reason"]) == ("Pending", 1, "Created")
    assert w["podName"] == "" and w["sidecarService"] == "r1-sidecar"
    assert w["startTime"] == "2026-11-25T12:00:10.000Z"
    assert [c["type"] for c in w["conditions"]] == list(cond.TYPES)


@pytest.mark.req("R10.1")
def test_a_running_trainer_makes_the_run_running_and_ready() -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [b.running(b.new_pod(run, 1))])
    assert p.create is None and p.delete_pods == []
    assert wire(p)["phase"] == "Running"
    assert condition(p, "Ready")["status"] == "True"
    assert condition(p, "Progressing")["status"] == "True"
    assert condition(p, "Failed")["status"] == "False"


@pytest.mark.req("R10.2")
def test_a_trainer_crash_restarts_in_place_and_is_counted_with_its_root_cause() -> None:
    run = attempt(b.run_object(), 1)
    pod = b.crash_looping(b.new_pod(run, 1), restarts=2)
    p = plan(run, [pod])
    w = wire(p)
    assert p.create is None and p.delete_pods == []  # in place: /dev/shm survives
    assert (w["phase"], w["restarts"], w["restartsCounted"]) == ("Restarting", 2, 2)
    assert w["firstFailure"] == {
        "container": "trainer",
        "exitCode": 137,
        "reason": "OOMKilled",
        "message": "",
        "node": "node-a",
        "time": "2026-11-25T12:00:10.000Z",
        "attempt": 1,
    }
    assert (p.restarts_added, p.counted_added) == (2, 2)


@pytest.mark.req("R10.2")
def test_counted_restarts_past_the_limit_fail_the_run_naming_the_first_failure() -> None:
    run = attempt(b.run_object(spec={"restarts": {"limit": 3}}), 1)
    p = plan(run, [b.crash_looping(b.new_pod(run, 1), restarts=4)])
    w = wire(p)
    assert (w["phase"], w["reason"]) == ("Failed", "RestartLimitExceeded")
    assert "4 counted restarts exceed spec.restarts.limit 3" in w["message"]
    assert "trainer OOMKilled exit 137 in attempt 1 on node-a" in w["message"]
    assert p.delete_pods == ["r1-a1"]  # a crash loop would go on forever
    assert condition(p, "Failed")["status"] == "True"
    assert w["completionTime"]


@pytest.mark.req("R10.2")
def test_exactly_the_limit_of_restarts_keeps_the_run_going() -> None:
    run = attempt(b.run_object(spec={"restarts": {"limit": 3}}), 1)
    p = plan(run, [b.running(b.new_pod(run, 1), restarts=3, last=b.oom_killed())])
    assert wire(p)["phase"] == "Running"


@pytest.mark.req("R10.2")
def test_an_evicted_pod_is_replaced_by_a_new_attempt_without_counting() -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [b.evicted(b.new_pod(run, 1))])
    w = wire(p)
    assert p.delete_pods == ["r1-a1"]
    assert p.create is not None and p.create.attempt == 2
    assert (w["attempt"], w["restarts"], w["restartsCounted"]) == (2, 1, 0)
    assert (w["phase"], w["reason"]) == ("Restarting", "Evicted")
    assert "firstFailure" not in w
    assert w["podName"] == ""  # recorded only once the pod exists


@pytest.mark.req("R10.2")
@pytest.mark.parametrize(
    "reason",
    [
        "PreemptionByScheduler",
        "EvictionByEvictionAPI",
        "DeletionByTaintManager",
        "TerminationByKubelet",
    ],
)
def test_preemption_drain_and_node_shutdown_are_not_counted(reason: str) -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [b.disrupted(b.new_pod(run, 1), reason)])
    w = wire(p)
    assert (w["restarts"], w["restartsCounted"], w["reason"]) == (1, 0, reason)
    assert p.create is not None and p.create.attempt == 2
    assert p.delete_pods == []  # already being deleted; the new pod waits for it to go


@pytest.mark.req("R10.2")
def test_a_pod_that_vanished_is_a_counted_loss() -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [])
    w = wire(p)
    assert (w["attempt"], w["restarts"], w["restartsCounted"], w["reason"]) == (2, 1, 1, "PodLost")
    assert w["firstFailure"]["reason"] == "PodLost"
    assert p.create is not None and (p.create.restarts_before, p.create.counted_before) == (1, 1)


@pytest.mark.req("R10.2")
def test_the_last_state_of_a_deleted_pod_tells_preemption_from_loss() -> None:
    run = attempt(b.run_object(), 1)
    preempted = plan(run, [], gone=b.disrupted(b.new_pod(run, 1)))
    assert wire(preempted)["restartsCounted"] == 0
    deleted = b.running(b.new_pod(run, 1))
    deleted["metadata"]["deletionTimestamp"] = "2026-11-25T12:00:05Z"
    lost = plan(run, [], gone=deleted)
    assert (wire(lost)["restartsCounted"], wire(lost)["reason"]) == (1, "PodDeleted")


@pytest.mark.req("R10.2")
def test_a_lost_node_is_a_counted_loss() -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [b.node_lost(b.new_pod(run, 1))])
    assert (wire(p)["restartsCounted"], wire(p)["reason"]) == (1, "NodeLost")
    assert p.delete_pods == ["r1-a1"]


@pytest.mark.req("R10.2")
def test_a_loss_past_the_limit_fails_instead_of_recreating() -> None:
    run = attempt(b.run_object(spec={"restarts": {"limit": 0}}), 1)
    p = plan(run, [b.node_lost(b.new_pod(run, 1))])
    assert (wire(p)["phase"], wire(p)["reason"]) == ("Failed", "RestartLimitExceeded")
    assert p.create is None


@pytest.mark.req("R10.2")
def test_the_next_attempt_never_overlaps_a_pod_of_the_run() -> None:
    run = attempt(b.run_object(), 2, pod_name="")  # attempt 2 recorded, pod not yet created
    old = b.running(b.new_pod(run, 1))
    p = plan(run, [old])
    assert p.delete_pods == ["r1-a1"] and p.create is not None and p.create.attempt == 2
    assert wire(p)["restarts"] == 0  # the recorded attempt is created, not counted again


@pytest.mark.req("R10.2")
def test_counters_of_earlier_attempts_carry_over_through_the_pod() -> None:
    run = attempt(b.run_object(), 2, restarts=3, restartsCounted=1)
    pod = b.running(
        b.new_pod(run, 2, restarts_before=3, counted_before=1), restarts=1, last=b.oom_killed()
    )
    w = wire(plan(run, [pod]))
    assert (w["restarts"], w["restartsCounted"]) == (4, 2)


@pytest.mark.req("R10.1")
def test_a_pod_that_cannot_pull_its_image_stays_pending_then_fails_at_the_start_timeout() -> None:
    run = attempt(b.run_object(spec={"failurePolicy": {"podStartTimeoutSeconds": 300}}), 1)
    pod = b.waiting(b.new_pod(run, 1, created=b.at(0)), "ImagePullBackOff", "pull access denied")
    before = plan(run, [pod], now=299.0)
    assert (wire(before)["phase"], wire(before)["reason"]) == ("Pending", "ImagePullBackOff")
    assert condition(before, "Degraded")["status"] == "True"
    assert condition(before, "Degraded")["reason"] == "ImagePullBackOff"
    after = plan(run, [pod], now=301.0)
    w = wire(after)
    assert (w["phase"], w["reason"]) == ("Failed", "PodStartTimeout")
    assert "did not start within 300 s: ImagePullBackOff: pull access denied" in w["message"]
    assert w["firstFailure"]["reason"] == "ImagePullBackOff"
    assert after.delete_pods == ["r1-a1"]


@pytest.mark.req("R10.1")
def test_an_unschedulable_pod_fails_at_the_start_timeout() -> None:
    run = attempt(b.run_object(spec={"failurePolicy": {"podStartTimeoutSeconds": 60}}), 1)
    pod = b.unschedulable(b.new_pod(run, 1, created=b.at(0)))
    assert wire(plan(run, [pod], now=30))["reason"] == "Unschedulable"
    w = wire(plan(run, [pod], now=61))
    assert (w["reason"], w["firstFailure"]["reason"]) == ("PodStartTimeout", "Unschedulable")


@pytest.mark.req("R10.2")
def test_the_first_failure_is_never_overwritten() -> None:
    first = {
        "container": "trainer",
        "reason": "OOMKilled",
        "exitCode": 137,
        "attempt": 1,
        "node": "n1",
        "time": "2026-11-25T11:00:00.000Z",
        "message": "",
    }
    run = attempt(b.run_object(), 2, restarts=1, restartsCounted=1, firstFailure=first)
    pod = b.crash_looping(
        b.new_pod(run, 2, restarts_before=1, counted_before=1),
        restarts=1,
        last={"terminated": {"exitCode": 1, "reason": "Error"}},
    )
    assert wire(plan(run, [pod]))["firstFailure"] == first
    assert wire(plan(run, [b.node_lost(b.new_pod(run, 2))]))["firstFailure"] == first


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("final", "phase", "reason"),
    [
        ("Succeeded", "Succeeded", "Succeeded"),
        ("Failed", "Failed", "TrainingFailed"),
        ("Halted", "Halted", "EmergencyHalt"),
    ],
)
def test_the_trainers_termination_message_ends_the_run(final: str, phase: str, reason: str) -> None:
    run = attempt(b.run_object(), 1)
    pod = b.finished(b.new_pod(run, 1), final, reason="loss diverged", exit_code=3)
    p = plan(run, [pod])
    w = wire(p)
    assert (w["phase"], w["reason"], w["message"]) == (phase, reason, "loss diverged")
    assert w["completionTime"] == "2026-11-25T12:00:10.000Z"
    assert condition(p, phase)["status"] == "True"
    assert p.delete_pods == []  # the finished pod stays as evidence (trainer#3419)
    if phase != "Succeeded":
        assert w["firstFailure"]["reason"] == reason


@pytest.mark.req("R13.5")
def test_a_trainer_stopped_by_sigterm_is_a_new_uncounted_attempt_not_a_success() -> None:
    run = attempt(b.run_object(), 1)
    pod = b.finished(b.new_pod(run, 1), "Stopped", reason="stopped by SIGTERM at step 7")
    p = plan(run, [pod])
    w = wire(p)
    assert w["phase"] != "Succeeded" and w.get("restartsCounted", 0) == 0
    assert "stopped by SIGTERM" in w["message"]


@pytest.mark.req("R10.1")
def test_exit_zero_without_a_message_is_success() -> None:
    run = attempt(b.run_object(), 1)
    p = plan(run, [b.finished(b.new_pod(run, 1), "", message="")])
    assert wire(p)["phase"] == "Succeeded"


@pytest.mark.req("R10.1")
def test_a_final_phase_never_changes_again() -> None:
    run = b.with_status(
        b.run_object(), phase="Succeeded", attempt=1, podName="r1-a1", reason="Succeeded"
    )
    p = plan(run, [])
    assert p.create is None and wire(p)["phase"] == "Succeeded" and wire(p)["attempt"] == 1


@pytest.mark.req("R10.1")
def test_plain_sidecar_mode_stops_the_pod_once_the_trainer_is_done() -> None:
    from dataclasses import replace

    from tolaria_operator.config import PodSettings

    settings = replace(SETTINGS, pods=PodSettings(native_sidecar=False))
    run = attempt(b.run_object(), 1)
    pod = b.finished(b.new_pod(run, 1, settings), "Succeeded")
    p = plan_run(run, [view_pod(pod)], None, None, b.at(10), settings)
    assert p.delete_pods == ["r1-a1"]


@pytest.mark.req("R10.1")
def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    run = attempt(b.run_object(), 1)
    pod = b.running(b.new_pod(run, 1))
    first = plan(run, [pod], now=10)
    again = plan(b.with_status(run, **wire(first)), [pod], now=50)
    assert condition(again, "Ready")["lastTransitionTime"] == "2026-11-25T12:00:10.000Z"
    crashed = b.crash_looping(b.new_pod(run, 1), restarts=1)
    flipped = plan(b.with_status(run, **wire(again)), [crashed], now=90)
    assert condition(flipped, "Ready")["status"] == "False"
    assert condition(flipped, "Ready")["lastTransitionTime"] == "2026-11-25T12:01:30.000Z"
    assert condition(flipped, "Succeeded")["lastTransitionTime"] == "2026-11-25T12:00:10.000Z"


@pytest.mark.req("R10.1")
def test_status_and_conditions_carry_the_observed_generation() -> None:
    run = attempt(b.run_object(generation=7), 1)
    w = wire(plan(run, [b.running(b.new_pod(run, 1))]))
    assert w["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in w["conditions"]} == {7}


@pytest.mark.req("R10.1")
def test_progress_stalls_turn_progressing_false() -> None:
    run = attempt(
        b.run_object(spec={"detection": {"stallSeconds": 60}}),
        1,
        progress={"epoch": 1, "step": 10, "heartbeat": "2026-11-25T12:00:00.000Z"},
    )
    pod = b.running(b.new_pod(run, 1))
    assert condition(plan(run, [pod], now=30), "Progressing")["status"] == "True"
    stalled = condition(plan(run, [pod], now=61), "Progressing")
    assert (stalled["status"], stalled["reason"]) == ("False", "NoHeartbeat")


@pytest.mark.req("R10.1")
def test_suspend_checkpoints_then_stops_the_pod_then_is_suspended() -> None:
    run = attempt(b.run_object(spec={"suspend": True}), 1)
    stopping = plan(run, [b.running(b.new_pod(run, 1))])
    assert stopping.checkpoint_then_stop and stopping.delete_pods == ["r1-a1"]
    assert condition(stopping, "Suspended")["reason"] == "Suspending"
    done = plan(
        b.with_status(run, **wire(stopping), latestCheckpoint={"id": "ckpt-7", "epoch": 3}), []
    )
    w = wire(done)
    assert (w["phase"], w["podName"], w["attempt"]) == ("Suspended", "", 1)
    assert "resumes from checkpoint ckpt-7" in w["message"]
    assert condition(done, "Suspended")["status"] == "True"
    assert done.create is None


@pytest.mark.req("R10.1")
def test_resuming_starts_a_new_attempt_that_is_no_restart() -> None:
    run = b.with_status(
        b.run_object(spec={"suspend": False}),
        phase="Suspended",
        attempt=1,
        restarts=2,
        restartsCounted=1,
    )
    p = plan(run, [])
    w = wire(p)
    assert p.create is not None and p.create.attempt == 2
    assert (w["phase"], w["reason"], w["restarts"], w["restartsCounted"]) == (
        "Pending",
        "Resumed",
        2,
        1,
    )


@pytest.mark.req("R10.1")
def test_a_pending_pod_is_suspended_without_a_checkpoint() -> None:
    run = attempt(b.run_object(spec={"suspend": True}), 1)
    p = plan(run, [b.new_pod(run, 1)])
    assert not p.checkpoint_then_stop and p.delete_pods == ["r1-a1"]


def _in_rollback(
    run: RunObject, started: str, deadline: str, state: str = "InProgress"
) -> RunObject:
    return attempt(
        run,
        1,
        phase="Running",
        rollback={
            "id": "rb-1",
            "tier": "ROLLBACK_TIER_FULL",
            "reason": "ANOMALY_KIND_ACCURACY_COLLAPSE",
            "state": state,
            "startedAt": started,
            "deadline": deadline,
        },
    )


@pytest.mark.req("R10.3")
def test_a_full_rollback_in_progress_is_the_rolling_back_phase() -> None:
    run = _in_rollback(b.run_object(), "2026-11-25T12:00:00.000Z", "2026-11-25T12:00:12.000Z")
    p = plan(run, [b.running(b.new_pod(run, 1))], now=5)
    assert wire(p)["phase"] == "RollingBack"
    assert condition(p, "RollingBack")["status"] == "True"
    assert condition(p, "Ready")["status"] == "False"


@pytest.mark.req("R10.3")
def test_a_missed_deadline_recreates_the_pod_from_the_last_checkpoint() -> None:
    run = _in_rollback(b.run_object(), "2026-11-25T12:00:00.000Z", "2026-11-25T12:00:12.000Z")
    pod = b.running(b.new_pod(run, 1))
    assert plan(run, [pod], now=12.0).deadline_missed is None  # at the deadline: not yet
    p = plan(run, [pod], now=12.5)
    w = wire(p)
    assert p.deadline_missed is not None and w["rollback"]["state"] == "DeadlineMissed"
    assert w["rollback"]["finishedAt"] == "2026-11-25T12:00:12.500Z"
    assert p.delete_pods == ["r1-a1"] and p.create is not None and p.create.attempt == 2
    assert (w["phase"], w["reason"], w["restartsCounted"]) == (
        "Restarting",
        "RollbackDeadlineMissed",
        1,
    )
    assert condition(p, "RollingBack")["status"] == "False"


@pytest.mark.req("R10.3")
def test_a_missed_deadline_fails_the_run_under_the_fail_policy() -> None:
    run = _in_rollback(
        b.run_object(spec={"failurePolicy": {"onDeadlineMiss": "fail"}}),
        "2026-11-25T12:00:00.000Z",
        "2026-11-25T12:00:12.000Z",
    )
    p = plan(run, [b.running(b.new_pod(run, 1))], now=13)
    w = wire(p)
    assert (w["phase"], w["reason"]) == ("Failed", "RollbackDeadlineMissed")
    assert p.create is None and p.delete_pods == ["r1-a1"]
    assert w["firstFailure"]["reason"] == "RollbackDeadlineMissed"


@pytest.mark.req("R10.3")
def test_a_finished_rollback_is_never_enforced() -> None:
    run = _in_rollback(
        b.run_object(), "2026-11-25T12:00:00.000Z", "2026-11-25T12:00:12.000Z", "Succeeded"
    )
    p = plan(run, [b.running(b.new_pod(run, 1))], now=100)
    assert p.deadline_missed is None and wire(p)["phase"] == "Running"


@pytest.mark.req("R10.3")
def test_the_sidecar_view_never_reopens_the_operators_verdict() -> None:
    run = _in_rollback(
        b.run_object(), "2026-11-25T12:00:00.000Z", "2026-11-25T12:00:12.000Z", "DeadlineMissed"
    )
    view = SidecarView(attempt=1)
    from tests.operator.test_view import started_event

    view.apply_event(started_event("rb-1", b.at(0)), run.run.spec.rollback, b.at(0))
    p = plan(run, [b.running(b.new_pod(run, 1))], now=100, view=view)
    assert wire(p)["rollback"]["state"] == "DeadlineMissed" and p.deadline_missed is None


@pytest.mark.req("R10.1")
def test_sidecar_progress_and_checkpoints_reach_the_status() -> None:
    run = attempt(b.run_object(), 1)
    view = SidecarView(attempt=1)
    from tests.operator.test_view import status_with

    view.apply_status(
        status_with(epoch=4, step=900, checkpoint="ckpt-3", degraded="copy too slow"),
        run.run.spec.rollback,
        b.at(5),
    )
    p = plan(run, [b.running(b.new_pod(run, 1))], view=view)
    w = wire(p)
    assert (w["progress"]["epoch"], w["progress"]["step"]) == (4, 900)
    assert w["latestCheckpoint"]["id"] == "ckpt-3"
    assert w["latestSnapshot"]["generation"] == 9
    degraded = condition(p, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "FastTierInfeasible")


@pytest.mark.req("R10.2")
def test_a_pod_created_but_not_yet_recorded_is_adopted_not_recreated() -> None:
    run = attempt(b.run_object(), 2, pod_name="", restarts=1)
    p = plan(run, [b.running(b.new_pod(run, 2, restarts_before=1))])
    assert p.create is None and p.delete_pods == []
    assert (wire(p)["podName"], wire(p)["phase"], wire(p)["restarts"]) == ("r1-a2", "Running", 1)


@pytest.mark.req("R10.3")
def test_a_deadline_miss_reported_by_the_sidecar_is_enforced_at_once() -> None:
    from leyline import RollbackReport
    from leyline.v1 import sidecar_pb2 as pb

    run = _in_rollback(b.run_object(), "2026-11-25T12:00:00.000Z", "2026-11-25T12:00:12.000Z")
    view = SidecarView(attempt=1)
    report = RollbackReport(rollback_id="rb-1", tier=2, outcome=4, total_ns=11_900_000_000)
    report.started_at.FromDatetime(b.at(0))
    ev = pb.SidecarEvent(sequence=1, rollback_finished=report)
    ev.at.FromDatetime(b.at(11.9))
    view.apply_event(ev, run.run.spec.rollback, b.at(11.9))
    p = plan(run, [b.running(b.new_pod(run, 1))], now=11.95, view=view)
    assert p.deadline_missed is not None and wire(p)["rollback"]["state"] == "DeadlineMissed"
    assert p.create is not None and p.create.attempt == 2


@pytest.mark.req("R10.1")
def test_a_pod_that_cannot_be_made_fails_the_run_at_once_naming_why() -> None:
    """`spec.pod` is immutable: no retry could make this pod, so the first reconcile says so."""
    run = b.run_object()
    p = plan_run(run, [], None, None, b.at(10), SETTINGS, refused="the API server refused it")
    w = wire(p)
    assert p.create is None and p.refused == "the API server refused it"
    assert (w["phase"], w["reason"]) == ("Failed", "PodSpecInvalid")
    assert w["message"] == "the pod of attempt 1 cannot be made: the API server refused it"
    assert (w["attempt"], w["podName"]) == (0, "")  # no pod was created
    ready = condition(p, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodSpecInvalid")
    assert condition(p, "Failed")["status"] == "True"
    assert w["firstFailure"]["reason"] == "PodSpecInvalid" and w["completionTime"]
    assert [n.reason for n in p.notes] == ["PodSpecInvalid"]
    TolariaRunStatus.model_validate(w, strict=False)


def test_a_refusal_changes_nothing_when_no_pod_was_to_be_made() -> None:
    run = attempt(b.run_object(), 1)
    pod = b.running(b.new_pod(run, 1))
    p = plan_run(run, [view_pod(pod)], None, None, b.at(10), SETTINGS, refused="anything")
    assert wire(p)["phase"] == "Running" and p.refused == ""


@pytest.mark.req("R10.1")
def test_a_spec_the_model_refuses_is_ready_false_once_per_generation() -> None:
    """A run admitted under an older CRD (e.g. `shmSizeLimit: 100m`) cannot be read by this
    operator: Ready and Progressing say why, the phase stays, and the resync timer finds it
    recorded (None) instead of writing and counting it again."""
    message = "invalid spec: spec.pod.shmSizeLimit: must match ..."
    status = spec_refused({}, 3, message, b.at(10))
    assert status is not None
    w = status_wire(status)
    assert (w["phase"], w["reason"], w["message"], w["observedGeneration"]) == (
        "Pending",
        "SpecInvalid",
        message,
        3,
    )
    by_type = {c["type"]: c for c in w["conditions"]}
    assert by_type["Ready"]["status"] == "False" and by_type["Ready"]["reason"] == "SpecInvalid"
    assert by_type["Progressing"]["status"] == "False"
    assert spec_refused(w, 3, message, b.at(20)) is None
    assert spec_refused(w, 4, message, b.at(20)) is not None  # a new spec: said again


def test_a_running_run_whose_spec_became_unreadable_keeps_its_phase() -> None:
    run = attempt(b.run_object(), 1)
    running = wire(plan(run, [b.running(b.new_pod(run, 1))]))
    status = spec_refused(running, 2, "invalid spec: x", b.at(20))
    assert status is not None
    w = status_wire(status)
    assert w["phase"] == "Running" and w["attempt"] == 1
    assert {c["type"]: c["status"] for c in w["conditions"]}["Failed"] == "False"
