"""`status` of a `TolariaRun` and the `TolariaIncident` resource: what the operator writes.

Every status field is declared here, so the generated CRD's schema keeps what
the operator writes (the API server prunes undeclared fields, kopf#308).
Phase and enum values are Leyline enum names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from leyline.spec.base import ProtoEnum, SpecModel
from leyline.v1.cluster_pb2 import IncidentAck, IncidentPhase, IncidentScope
from leyline.v1.report_pb2 import RunPhase
from leyline.v1.resilience_pb2 import AnomalyKind, EmergencyLevel, RollbackTier

LEVEL = ProtoEnum(EmergencyLevel, strip="EMERGENCY_LEVEL_")


class Condition(SpecModel):
    """A status condition, by Kubernetes conventions."""

    type: str = Field(max_length=316)
    """Ready, Progressing, Succeeded, Failed, Suspended, RollingBack, Degraded, Halted."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(default="", max_length=1024)
    """CamelCase machine reason."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: str = ""
    """When `status` last changed (RFC 3339)."""
    observed_generation: int = Field(default=0, ge=0)
    """The `metadata.generation` this condition was computed for."""


class FailureStatus(SpecModel):
    """`status.firstFailure`: the first thing that went wrong in this run."""

    container: str = ""
    """trainer or sidecar."""
    exit_code: int = 0
    """Exit code of the container."""
    reason: str = ""
    """Terminated reason (OOMKilled, Error...) or the pod's reason (Evicted...)."""
    message: str = ""
    """Detail, e.g. the last line of the report's reason."""
    node: str = ""
    """Node the pod ran on."""
    time: str = ""
    """When it happened (RFC 3339)."""
    attempt: int = 0
    """Attempt it happened in."""


class ProgressStatus(SpecModel):
    """`status.progress`: streamed from the sidecar."""

    epoch: int = 0
    """Epoch the trainer is in."""
    step: int = 0
    """Optimizer steps taken."""
    heartbeat: str = ""
    """Last progress seen (RFC 3339)."""
    loss: float = 0.0
    """Last reported training loss."""


class SnapshotStatus(SpecModel):
    """`status.latestSnapshot`: the newest committed shared-memory snapshot."""

    slot: int = 0
    """Slot index."""
    generation: int = 0
    """Generation written into the slot."""
    step: int = 0
    """Optimizer step it captured."""
    epoch: int = 0
    """Epoch it captured."""


class CheckpointStatus(SpecModel):
    """`status.latestCheckpoint`: the last durable (WAL-committed) checkpoint."""

    id: str = ""
    """Checkpoint id."""
    epoch: int = 0
    """Epoch it captured."""
    step: int = 0
    """Optimizer step it captured."""
    time: str = ""
    """When it was committed (RFC 3339)."""
    bytes: int = 0
    """Payload size."""


class RollbackStatus(SpecModel):
    """`status.rollback`: a rollback in progress or the last one (R10.3)."""

    id: str = ""
    """Rollback id."""
    tier: Annotated[int, ProtoEnum(RollbackTier)] | None = None
    """ROLLBACK_TIER_FAST or ROLLBACK_TIER_FULL."""
    reason: Annotated[int, ProtoEnum(AnomalyKind)] | None = None
    """What triggered it."""
    state: Literal["InProgress", "Succeeded", "Failed", "DeadlineMissed"] = "InProgress"
    """Where it stands."""
    started_at: str = ""
    """When it started (RFC 3339)."""
    deadline: str = ""
    """When a full rollback must be done by (RFC 3339); the operator enforces it from here."""
    finished_at: str = ""
    """When it ended (RFC 3339)."""


class IncidentRef(SpecModel):
    """`status.incident`: the open TolariaIncident this run is part of."""

    name: str = ""
    """TolariaIncident name."""
    level: Annotated[int, LEVEL] | None = None
    """Its level."""
    role: Literal["source", "reached"] = "source"
    """Whether this run raised it or was reached by it."""


class TolariaRunStatus(SpecModel):
    """`status`: written only by the operator."""

    phase: Annotated[int, ProtoEnum(RunPhase)] | None = None
    """Pending, Running, RollingBack, Restarting, Suspended, Succeeded, Failed or Halted."""
    reason: str = ""
    """Why the run is in this phase (CamelCase)."""
    message: str = ""
    """Detail for people."""
    observed_generation: int = 0
    """The `metadata.generation` the operator last acted on."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Ready, Progressing, Succeeded, Failed, Suspended, RollingBack, Degraded, Halted."""
    attempt: int = 0
    """Pods created for this run so far (a new attempt after pod loss or resume)."""
    restarts: int = 0
    """Trainer container restarts in all attempts."""
    restarts_counted: int = 0
    """Restarts counted toward `spec.restarts.limit` (preemption and eviction are not)."""
    pod_name: str = ""
    """The current attempt's pod."""
    sidecar_service: str = ""
    """Headless Service of the sidecar's control and metrics ports."""
    first_failure: FailureStatus | None = None
    """The first failure of the run."""
    progress: ProgressStatus | None = None
    """Epoch, step and heartbeat, from the sidecar."""
    latest_snapshot: SnapshotStatus | None = None
    """Newest committed shared-memory snapshot."""
    latest_checkpoint: CheckpointStatus | None = None
    """Last durable checkpoint."""
    rollback: RollbackStatus | None = None
    """Rollback in progress or the last one."""
    incident: IncidentRef | None = None
    """Open incident this run is part of."""
    start_time: str = ""
    """When the first pod started (RFC 3339)."""
    completion_time: str = ""
    """When the run reached a final phase (RFC 3339)."""


class RunRef(SpecModel):
    """A TolariaRun by namespace and name."""

    namespace: str = Field(max_length=63)
    """Namespace of the run."""
    name: str = Field(max_length=253)
    """Name of the run."""


class TolariaIncidentSpec(SpecModel):
    """`spec` of a TolariaIncident (cluster-scoped): one escalated incident (R10.4)."""

    level: Annotated[int, LEVEL]
    """Emergency level."""
    kind: Annotated[int, ProtoEnum(AnomalyKind)] | None = None
    """What happened."""
    source_run: RunRef
    """The run whose sidecar raised it."""
    scope: Annotated[int, ProtoEnum(IncidentScope)] = IncidentScope.run
    """Which runs it reaches: the source run's `spec.escalation.scope`, narrowed to what the
    operator's escalation policy lets the source's namespace reach."""
    requested_scope: Annotated[int, ProtoEnum(IncidentScope)] | None = None
    """The scope the source run asked for, set only when the policy narrowed it to `scope`."""
    cross_namespace: bool = False
    """Whether it reaches runs outside its source's namespace: only when the operator's policy
    gives the source's namespace cluster reach (by default no run reaches another tenant)."""
    group_label: str = ""
    """With scope group: the label key."""
    group_value: str = ""
    """With scope group: the source run's value of that label."""
    node: str = ""
    """With scope node: the source run's node."""
    reason: str = Field(default="", max_length=4096)
    """The source's reason."""


class TimelineEntry(SpecModel):
    """One line of an incident's timeline."""

    time: str
    """RFC 3339."""
    event: str
    """Raised, Escalated, Signalled, Acknowledged, Unreachable, Resolved."""
    message: str = ""
    """Detail."""


class ReachedRun(SpecModel):
    """A run the incident was signalled to, and its answer."""

    namespace: str
    """Namespace of the run."""
    name: str
    """Name of the run."""
    ack: Annotated[int, ProtoEnum(IncidentAck)] = IncidentAck.Awaiting
    """Awaiting, Acknowledged, NoAck or Unreachable."""
    latency_ms: float = 0.0
    """Signal to acknowledgement."""
    message: str = ""
    """Why unreachable, or the acknowledgement detail."""


class IncidentResolution(SpecModel):
    """How and when the incident ended."""

    time: str = ""
    """RFC 3339."""
    by: str = ""
    """Who resolved it."""
    reason: str = ""
    """Why."""


class TolariaIncidentStatus(SpecModel):
    """`status` of a TolariaIncident."""

    phase: Annotated[int, ProtoEnum(IncidentPhase)] | None = None
    """Open or Resolved."""
    timeline: list[TimelineEntry] = Field(default_factory=list, max_length=256)
    """What happened, in order."""
    runs: list[ReachedRun] = Field(default_factory=list, max_length=4096)
    """Every run in scope and its acknowledgement."""
    resolution: IncidentResolution | None = None
    """Set when resolved."""
    observed_generation: int = 0
    """The `metadata.generation` the operator last acted on."""
