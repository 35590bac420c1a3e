"""The `TolariaRun` document: `apiVersion`, `kind`, `metadata` and the root `spec`.

`TolariaRunSpec` composes the section models; it is the one description of a
run, validated by `tolaria run` and published as the CRD schema, so a manifest
means the same thing in both places.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from leyline.spec.base import Rule, SpecModel
from leyline.spec.cluster import EscalationSpec, FailurePolicySpec, PodSpec
from leyline.spec.control import RebuildSpec, TamiyoSpec
from leyline.spec.guards import BreakerSpec, BudgetsSpec, ConservativeSpec
from leyline.spec.observe import ProfilerSpec, TelemetrySpec
from leyline.spec.resilience import (
    CheckpointSpec,
    DetectionSpec,
    EmergencySpec,
    RestartSpec,
    RollbackSpec,
    SnapshotSpec,
)
from leyline.spec.training import TrainingSpec

API_GROUP = "tolaria.dev"
API_VERSION = "v1alpha1"
KIND = "TolariaRun"

IMMUTABLE: JsonDict = {"x-tolaria-immutable": True}
"""Marks a section that cannot change once the run exists (a CEL transition rule in the CRD)."""

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 52
"""Leaves room for the `-a<attempt>` and container suffixes within the 63-character label limit."""


class TolariaRunSpec(SpecModel):
    """`spec`: everything that defines one training run."""

    training: TrainingSpec = Field(json_schema_extra=IMMUTABLE)
    """What to train and how; required, because `training.task` is."""
    budgets: BudgetsSpec = Field(default_factory=BudgetsSpec, json_schema_extra=IMMUTABLE)
    """Time budgets of the epoch boundary and the LR controller."""
    breakers: BreakerSpec = Field(default_factory=BreakerSpec, json_schema_extra=IMMUTABLE)
    """Circuit-breaker policy shared by every guarded operation."""
    conservative: ConservativeSpec = Field(
        default_factory=ConservativeSpec, json_schema_extra=IMMUTABLE
    )
    """When conservative mode ends and what it sheds."""
    tamiyo: TamiyoSpec = Field(default_factory=TamiyoSpec, json_schema_extra=IMMUTABLE)
    """The built-in heuristic policy."""
    optimizer_rebuild: RebuildSpec = Field(default_factory=RebuildSpec, json_schema_extra=IMMUTABLE)
    """Momentum-preserving optimizer rebuilds."""
    telemetry: TelemetrySpec = Field(default_factory=TelemetrySpec, json_schema_extra=IMMUTABLE)
    """Telemetry queues and the Prometheus endpoint."""
    profiler: ProfilerSpec = Field(default_factory=ProfilerSpec, json_schema_extra=IMMUTABLE)
    """Chrome traces of chosen epochs."""
    snapshots: SnapshotSpec = Field(default_factory=SnapshotSpec, json_schema_extra=IMMUTABLE)
    """Shared-memory snapshots for the fast rollback tier."""
    rollback: RollbackSpec = Field(default_factory=RollbackSpec, json_schema_extra=IMMUTABLE)
    """Budgets and policy of the fast and full rollback tiers."""
    detection: DetectionSpec = Field(default_factory=DetectionSpec, json_schema_extra=IMMUTABLE)
    """When an anomaly becomes an emergency."""
    emergency: EmergencySpec = Field(default_factory=EmergencySpec, json_schema_extra=IMMUTABLE)
    """Response budgets of the four emergency levels and the halt."""
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec, json_schema_extra=IMMUTABLE)
    """Durable, WAL-protected checkpoints."""
    restarts: RestartSpec = Field(default_factory=RestartSpec)
    """Trainer restarts after a crash (may change while the run goes)."""
    pod: PodSpec = Field(default_factory=PodSpec, json_schema_extra=IMMUTABLE)
    """The pod of each attempt on a cluster; ignored by `tolaria run`."""
    escalation: EscalationSpec = Field(default_factory=EscalationSpec)
    """Cluster-wide escalation of incidents (may change while the run goes)."""
    failure_policy: FailurePolicySpec = Field(default_factory=FailurePolicySpec)
    """What the operator does on a missed deadline or a pod that never starts."""
    suspend: bool = False
    """True: checkpoint, then stop the pod; false again: resume from that checkpoint as a new
    attempt. Ignored by `tolaria run`."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Seconds after the run finished (Succeeded, Failed, Halted) when the operator deletes it,
    and with it everything it owns; unset: kept until deleted. Ignored by `tolaria run`."""


class ObjectMeta(BaseModel):
    """The parts of Kubernetes `metadata` a run uses; server-set fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, min_length=1, max_length=NAME_MAX_LENGTH)
    """Run name: the run directory locally, the owner of pods and services in a cluster."""
    namespace: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)
    """Namespace in a cluster; ignored by `tolaria run`."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; `kueue.x-k8s.io/queue-name` is copied to the run's pods."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations."""


class TolariaRun(BaseModel):
    """A whole `TolariaRun` manifest as `kubectl apply` and `tolaria run` read it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["tolaria.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["TolariaRun"]
    metadata: ObjectMeta
    spec: TolariaRunSpec
    """Required: `spec.training.task` has no default."""
    status: dict[str, Any] | None = None
    """Written by the operator; ignored on input."""

    @property
    def name(self) -> str:
        return self.metadata.name


ROOT_RULES: tuple[Rule, ...] = ()
"""Rules on the whole object (CEL at the CRD root); none yet."""
