"""Escalation decisions: threshold and echoes, names, scope selection, ack bookkeeping and the
incident's status from Raised to Resolved (R10.4). Every status built here validates against
`TolariaIncidentStatus`, every spec against `TolariaIncidentSpec`."""

from __future__ import annotations

from typing import Any

import pytest

from leyline import AnomalyKind, EmergencyLevel, EmergencySignal, Participant
from leyline.spec import EmergencySpec, EscalationSpec, TolariaIncidentSpec, TolariaIncidentStatus
from leyline.spec.status import IncidentRef, ReachedRun
from leyline.v1.cluster_pb2 import IncidentAck, IncidentPhase, IncidentScope
from tests.operator.builders import run_object
from tolaria_operator import incidents as inc
from tolaria_operator.config import EscalationSettings
from tolaria_operator.incidents import RunSummary, SignalOutcome

NOW = "2026-11-25T12:00:00.000Z"
CRITICAL = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
DEFAULT_POLICY = EscalationSettings()
"""The operator's escalation policy out of the box: every run confined to its namespace."""
GRANTED = EscalationSettings(cluster_scope_namespaces=("default",))
"""An administrator granted the source's namespace (`default`) cluster reach."""


def valid_status(status: TolariaIncidentStatus) -> dict[str, Any]:
    wire = inc.incident_status_wire(status)
    TolariaIncidentStatus.model_validate(wire, strict=False)
    return wire


def summary(
    name: str,
    *,
    ns: str = "default",
    labels: dict[str, str] | None = None,
    node: str = "node-a",
    phase: str = "Running",
    has_pod: bool = True,
) -> RunSummary:
    return RunSummary(ns, name, labels or {}, node, phase, has_pod)


def spec_for(
    scope: str, policy: EscalationSettings = GRANTED, **escalation: Any
) -> TolariaIncidentSpec:
    run = run_object(
        name="src", labels={"team": "g1"}, spec={"escalation": {"scope": scope, **escalation}}
    )
    return inc.incident_spec(
        run, CRITICAL, AnomalyKind.ANOMALY_KIND_BREAKER_STORM, "storm", "node-a", policy
    )


@pytest.mark.req("R10.4")
@pytest.mark.parametrize(
    ("level", "threshold", "escalates"),
    [(4, "critical", True), (3, "critical", False), (3, "severe", True), (2, "severe", False)],
)
def test_an_emergency_escalates_at_or_above_the_threshold(
    level: int, threshold: str, escalates: bool
) -> None:
    signal = EmergencySignal(level=level, generation=1)
    assert (
        inc.should_escalate(signal, EscalationSpec.model_validate({"threshold": threshold}))
        is escalates
    )


@pytest.mark.req("R10.4")
def test_an_emergency_the_operator_delivered_never_escalates_again() -> None:
    spec = EscalationSpec()
    for echo in (
        EmergencySignal(level=4, incident_id="src-1"),
        EmergencySignal(level=4, source=Participant.PARTICIPANT_OPERATOR),
        EmergencySignal(level=4, kind=AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT),
    ):
        assert not inc.should_escalate(echo, spec)


@pytest.mark.req("R10.4")
def test_incident_names_are_deterministic_per_source_emergency() -> None:
    uid = "56e1b07f-aaaa-bbbb-cccc-dddddddddddd"
    assert inc.incident_name("src", uid, 2, 7) == "src-56e1b07f-a2-g7"
    assert inc.incident_name("src", uid, 2, 7) == inc.incident_name("src", uid, 2, 7)
    assert inc.incident_name("src", uid, 3, 7) != inc.incident_name("src", uid, 2, 7)
    assert inc.deadline_incident_name("src", uid, 2) == "src-56e1b07f-a2-deadline"


@pytest.mark.req("R10.4")
def test_the_incident_spec_and_object_name_the_source_and_its_group() -> None:
    spec = spec_for("group", groupLabel="team")
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire == {
        "level": "critical",
        "kind": "ANOMALY_KIND_BREAKER_STORM",
        "sourceRun": {"namespace": "default", "name": "src"},
        "scope": "group",
        "groupLabel": "team",
        "groupValue": "g1",
        "node": "node-a",
        "reason": "storm",
        "crossNamespace": True,
    }
    TolariaIncidentSpec.model_validate(wire, strict=False)
    body = inc.incident_body("src-x-a1-g1", spec, run_object(name="src"), 1, 1)
    assert body["kind"] == "TolariaIncident" and "namespace" not in body["metadata"]
    assert "ownerReferences" not in body["metadata"]  # cluster-scoped: it outlives its runs
    assert body["metadata"]["labels"]["tolaria.dev/run"] == "src"


RUNS = [
    summary("src", labels={"team": "g1"}, node="node-a"),
    summary("same-group", labels={"team": "g1"}, node="node-b"),
    summary("same-node", labels={"team": "g2"}, node="node-a"),
    summary("elsewhere", ns="other", labels={"team": "g1"}, node="node-c"),
    summary("finished", labels={"team": "g1"}, node="node-a", phase="Succeeded"),
    summary("suspended", labels={"team": "g1"}, node="", phase="Suspended", has_pod=False),
]


@pytest.mark.req("R10.4")
@pytest.mark.parametrize(
    ("scope", "extra", "reached"),
    [
        ("run", {}, ["src"]),
        ("node", {}, ["src", "same-node"]),
        ("group", {"groupLabel": "team"}, ["src", "elsewhere", "same-group", "suspended"]),
        ("namespace", {}, ["src", "same-group", "same-node", "suspended"]),
        ("cluster", {}, ["src", "same-group", "same-node", "suspended", "elsewhere"]),
    ],
)
def test_scope_selects_the_runs_an_incident_reaches_from_a_namespace_granted_cluster_reach(
    scope: str, extra: dict[str, str], reached: list[str]
) -> None:
    targets = inc.select_targets(spec_for(scope, **extra), RUNS)
    assert targets[0].name == "src"  # the source first
    assert sorted(t.name for t in targets) == sorted(reached)
    assert "finished" not in [t.name for t in targets]


@pytest.mark.req("R10.4")
@pytest.mark.parametrize(
    ("scope", "extra", "reached"),
    [
        ("node", {}, ["src", "same-node"]),
        ("group", {"groupLabel": "team"}, ["src", "same-group", "suspended"]),
        ("namespace", {}, ["src", "same-group", "same-node", "suspended"]),
        ("cluster", {}, ["src", "same-group", "same-node", "suspended"]),
    ],
)
def test_by_default_no_incident_reaches_a_run_of_another_namespace(
    scope: str, extra: dict[str, str], reached: list[str]
) -> None:
    """The tenant boundary: whatever scope a run's author writes, "elsewhere" (namespace
    `other`, same group label as the source) is never selected, so never frozen or halted."""
    targets = inc.select_targets(spec_for(scope, DEFAULT_POLICY, **extra), RUNS)
    assert sorted(t.name for t in targets) == sorted(reached)
    assert all(t.namespace == "default" for t in targets)


@pytest.mark.req("R10.4")
def test_a_cluster_scope_without_a_grant_is_narrowed_to_the_namespace_and_says_so() -> None:
    spec = spec_for("cluster", DEFAULT_POLICY)
    assert (spec.scope, spec.requested_scope) == (IncidentScope.namespace, IncidentScope.cluster)
    assert spec.cross_namespace is False
    raised = inc.opened(spec, NOW, generation=1).timeline[0].message
    assert "scope cluster narrowed to namespace" in raised
    assert "escalation.cluster_scope_namespaces" in raised


@pytest.mark.req("R10.4")
def test_a_scope_within_reach_is_kept_as_asked() -> None:
    spec = spec_for("group", DEFAULT_POLICY, groupLabel="team")
    assert (spec.scope, spec.requested_scope) == (IncidentScope.group, None)
    assert inc.narrowing(spec) == ""


@pytest.mark.req("R10.4")
@pytest.mark.parametrize("scope", ["node", "group", "namespace", "cluster"])
def test_max_scope_run_lets_an_incident_signal_no_other_run(scope: str) -> None:
    policy = EscalationSettings(max_scope="run")
    spec = spec_for(scope, policy, **({"groupLabel": "team"} if scope == "group" else {}))
    assert spec.scope == IncidentScope.run
    assert [t.name for t in inc.select_targets(spec, RUNS)] == ["src"]


@pytest.mark.req("R10.4")
def test_max_scope_cluster_lifts_the_boundary_for_every_namespace() -> None:
    """A cluster with one tenant may choose the old behaviour, explicitly."""
    spec = spec_for("cluster", EscalationSettings(max_scope="cluster"))
    assert spec.cross_namespace is True
    assert "elsewhere" in [t.name for t in inc.select_targets(spec, RUNS)]


@pytest.mark.req("R10.4")
def test_the_policy_in_force_bounds_an_incident_whatever_its_spec_claims() -> None:
    """An incident raised under a generous policy, or edited by hand to claim cluster reach,
    is bounded again by today's policy before any run is selected."""
    generous = spec_for("cluster", GRANTED)
    strict = inc.bounded(generous, DEFAULT_POLICY)
    assert (strict.scope, strict.requested_scope, strict.cross_namespace) == (
        IncidentScope.namespace,
        IncidentScope.cluster,
        False,
    )
    forged = strict.model_copy(update={"scope": IncidentScope.cluster, "cross_namespace": True})
    assert inc.bounded(forged, DEFAULT_POLICY) == strict
    assert inc.bounded(strict, GRANTED) == generous  # the requested scope is never lost
    assert inc.bounded(strict, DEFAULT_POLICY) == strict  # idempotent


@pytest.mark.req("R10.4")
def test_select_targets_never_crosses_namespaces_unless_the_spec_says_it_may() -> None:
    confined = spec_for("cluster", GRANTED).model_copy(update={"cross_namespace": False})
    assert "elsewhere" not in [t.name for t in inc.select_targets(confined, RUNS)]


@pytest.mark.req("R10.4")
def test_signal_answers_are_recorded_per_run_and_in_the_timeline() -> None:
    spec = spec_for("group", groupLabel="team")
    status = inc.opened(spec, NOW, generation=3)
    assert valid_status(status)["phase"] == "Open"
    entries = [
        inc.reached_entry(summary("src"), SignalOutcome(IncidentAck.Awaiting, 0.0, "source")),
        inc.reached_entry(summary("b"), SignalOutcome(IncidentAck.Acknowledged, 3.14159, "")),
        inc.reached_entry(
            summary("c"), SignalOutcome(IncidentAck.NoAck, 2001.0, "no ack within 2 s")
        ),
        inc.reached_entry(
            summary("d"), SignalOutcome(IncidentAck.Unreachable, 0.0, "connection refused")
        ),
    ]
    status = inc.record_signals(status, entries, NOW, per_run_limit=32)
    wire = valid_status(status)
    assert [(r["name"], r["ack"]) for r in wire["runs"]] == [
        ("src", "Awaiting"),
        ("b", "Acknowledged"),
        ("c", "NoAck"),
        ("d", "Unreachable"),
    ]
    assert wire["runs"][1]["latencyMs"] == 3.142
    events = [t["event"] for t in wire["timeline"]]
    assert events == ["Raised", "Signalled", "Acknowledged", "NoAck", "Unreachable"]
    assert [r.name for r in inc.delivered(status, ("default", "src"))] == ["b", "c"]

    acked = inc.source_acknowledged(status, ("default", "src"), 0.8, NOW)
    assert valid_status(acked)["runs"][0]["ack"] == "Acknowledged"
    assert inc.source_acknowledged(acked, ("default", "src"), 0.8, NOW) is acked  # once

    done = inc.resolved(acked, "trainer", "breakers closed", NOW)
    wire = valid_status(done)
    assert wire["phase"] == "Resolved"
    assert wire["resolution"] == {"time": NOW, "by": "trainer", "reason": "breakers closed"}
    assert wire["timeline"][-1]["event"] == "Resolved"


@pytest.mark.req("R10.4")
def test_a_large_fan_out_is_summarised_and_the_timeline_stays_bounded() -> None:
    status = inc.opened(spec_for("cluster"), NOW, generation=1)
    entries = [
        inc.reached_entry(summary(f"r{i}"), SignalOutcome(IncidentAck.Acknowledged, 1.0, ""))
        for i in range(100)
    ]
    status = inc.record_signals(status, entries, NOW, per_run_limit=32)
    assert [t.event for t in status.timeline] == ["Raised", "Signalled", "Acknowledged"]
    for _ in range(300):
        status = inc.escalated(status, CRITICAL, "again", NOW)
    wire = valid_status(status)
    assert len(wire["timeline"]) == 256 and wire["timeline"][0]["event"] == "Raised"


@pytest.mark.req("R10.4")
def test_the_signal_carries_the_incident_and_freezes_on_critical() -> None:
    spec = spec_for("group", groupLabel="team")
    signal = inc.signal_for("src-x-a1-g1", spec, summary("b"), NOW)
    assert (signal.incident_id, signal.run_id, signal.level) == ("src-x-a1-g1", "b", CRITICAL)
    assert signal.kind == AnomalyKind.ANOMALY_KIND_CLUSTER_INCIDENT
    assert signal.source == Participant.PARTICIPANT_OPERATOR
    assert signal.action == 4  # FREEZE
    assert signal.triggered_at.ToJsonString() == "2026-11-25T12:00:00Z"


@pytest.mark.req("R10.4")
def test_the_signal_waits_the_targets_budget_for_the_level() -> None:
    emergency = EmergencySpec(critical_ms=50, severe_ms=400, major_ms=1500, minor_ms=4000)
    assert inc.budget_seconds(CRITICAL, emergency) == pytest.approx(0.05)
    assert inc.budget_seconds(EmergencyLevel.EMERGENCY_LEVEL_MINOR, emergency) == pytest.approx(4.0)
    assert inc.budget_seconds(CRITICAL, EmergencySpec()) == pytest.approx(0.1)


@pytest.mark.req("R10.4")
def test_run_references_validate() -> None:
    ref = inc.run_ref("src-x-a1-g1", CRITICAL, "reached")
    assert ref.model_dump(mode="json", by_alias=True) == {
        "name": "src-x-a1-g1",
        "level": "critical",
        "role": "reached",
    }
    IncidentRef.model_validate(ref.model_dump(mode="json", by_alias=True))


def test_a_run_summary_takes_its_node_from_its_current_pod() -> None:
    run = {
        "metadata": {"name": "b", "namespace": "default", "labels": {"team": "g1"}},
        "status": {"podName": "b-a2", "phase": "Running"},
    }
    pods = [
        {"metadata": {"name": "b-a1"}, "spec": {"nodeName": "old"}},
        {"metadata": {"name": "b-a2"}, "spec": {"nodeName": "node-b"}},
    ]
    assert inc.summarize(run, pods) == RunSummary(
        "default", "b", {"team": "g1"}, "node-b", "Running", True
    )


def test_reached_runs_and_phase_enums_spell_like_the_crd() -> None:
    entry = inc.reached_entry(summary("b"), SignalOutcome(IncidentAck.Unreachable, 0.0, "x"))
    assert isinstance(entry, ReachedRun) and entry.ack == IncidentAck.Unreachable
    assert inc.opened(spec_for("run"), NOW, 1).phase == IncidentPhase.Open
    assert IncidentScope.Name(spec_for("node").scope) == "node"
