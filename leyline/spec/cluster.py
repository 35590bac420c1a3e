"""`spec.pod`, `spec.escalation`, `spec.failurePolicy`: how a run lives on a cluster (R10).

`tolaria run` validates these sections like every other (one manifest means
the same thing in both places) and otherwise ignores them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from leyline.quantity import QUANTITY_PATTERN
from leyline.spec.base import ProtoEnum, Rule, SpecModel
from leyline.v1.cluster_pb2 import DeadlinePolicy, IncidentScope
from leyline.v1.resilience_pb2 import EmergencyLevel

LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
IMAGE_PATTERN = r"^$|^[^\s]+$"
"""An image reference without spaces, or empty for the operator's default."""


class ResourcesSpec(SpecModel):
    """`spec.pod.resources`: what the trainer container requests."""

    cpu: str = Field(default="2", pattern=QUANTITY_PATTERN, max_length=32)
    """CPU request and limit of the trainer container."""
    memory: str = Field(default="8Gi", pattern=QUANTITY_PATTERN, max_length=32)
    """Memory request and limit of the trainer container (shared memory is accounted apart)."""
    gpus: int = Field(default=0, ge=0, le=64)
    """`nvidia.com/gpu` request and limit; 0 for a CPU run."""


class CheckpointVolumeSpec(SpecModel):
    """`spec.pod.checkpointVolume`: where the sidecar writes durable checkpoints."""

    claim_name: str = Field(default="", max_length=253)
    """A PersistentVolumeClaim to mount (survives pod loss); empty: an emptyDir."""
    size_limit: str = Field(default="20Gi", pattern=QUANTITY_PATTERN, max_length=32)
    """Size limit of the emptyDir when no claim is named."""


class TolerationSpec(SpecModel):
    """One entry of `spec.pod.tolerations` (as in a PodSpec)."""

    key: str = Field(default="", max_length=253)
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: str = Field(default="", max_length=63)
    """Taint value for Equal."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Taint effect matched; empty matches all."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""


class PodSpec(SpecModel):
    """`spec.pod`: the pod the operator makes for each attempt (R10.1)."""

    image: str = Field(default="", pattern=IMAGE_PATTERN, max_length=512)
    """Trainer image: Tolaria's trainer plus the user's code for `module:function` tasks;
    empty: the operator's default (the Helm chart's `images.trainer`)."""
    sidecar_image: str = Field(default="", pattern=IMAGE_PATTERN, max_length=512)
    """Rollback/emergency sidecar image; empty: the operator's default (`images.sidecar`)."""
    image_pull_policy: Literal["", "Always", "IfNotPresent", "Never"] = ""
    """Pull policy of both images; empty: the operator's default (`images.pullPolicy`)."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Trainer container resources."""
    shm_size_limit: str = Field(default="", pattern=r"^$|" + QUANTITY_PATTERN, max_length=32)
    """Size limit of the memory-backed /dev/shm (snapshot slots live there); empty: computed by
    the operator from the snapshot slots and headroom, at least 1Gi."""
    checkpoint_volume: CheckpointVolumeSpec = Field(default_factory=CheckpointVolumeSpec)
    """Where durable checkpoints go."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pod must match."""
    tolerations: list[TolerationSpec] = Field(default_factory=list, max_length=32)
    """Taints the pod tolerates."""
    priority_class_name: str = Field(default="", max_length=253)
    """PriorityClass of the pod (preemption is not counted as a failure)."""
    service_account_name: str = Field(default="", max_length=253)
    """ServiceAccount of the trainer container (the sidecar never mounts its token)."""


class EscalationSpec(SpecModel):
    """`spec.escalation`: when an incident becomes a TolariaIncident and whom it reaches (R10.4)."""

    threshold: Annotated[int, ProtoEnum(EmergencyLevel, strip="EMERGENCY_LEVEL_")] = (
        EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
    )
    """Sidecar emergencies at or above this level are escalated to the cluster."""
    scope: Annotated[int, ProtoEnum(IncidentScope)] = IncidentScope.run
    """Runs it is signalled to: the run, its node, its group, its namespace, the cluster."""
    group_label: str = Field(default="", max_length=317, pattern=r"^$|" + LABEL_KEY_PATTERN)
    """With scope `group`: the label whose value defines the group (e.g. `tolaria.dev/group`)."""

    rules = (
        Rule(
            field="groupLabel",
            message="is required when scope is group",
            cel="self.scope != 'group' || self.groupLabel != ''",
            holds=lambda s: s.scope != IncidentScope.group or bool(s.group_label),
        ),
    )


class FailurePolicySpec(SpecModel):
    """`spec.failurePolicy`: what the operator does when things go wrong (R10.2, R10.3)."""

    on_deadline_miss: Annotated[int, ProtoEnum(DeadlinePolicy)] = DeadlinePolicy.recreate
    """A missed full-rollback deadline: recreate the pod from the last checkpoint, or fail."""
    pod_start_timeout_seconds: int = Field(default=900, ge=30, le=86_400)
    """A pod that never starts (image pull errors, unschedulable) fails the attempt after this."""
