"""`spec.pod`, `spec.escalation`, `spec.failurePolicy`: how a run lives on a cluster (R10).

`tolaria run` validates these sections like every other (one manifest means
the same thing in both places) and otherwise ignores them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from leyline.quantity import BYTES_PATTERN, COUNT_PATTERN, HUGEPAGES_PATTERN, QUANTITY_PATTERN
from leyline.spec.base import ProtoEnum, Rule, SpecModel, cel_string
from leyline.spec.kube import (
    DNS_SUBDOMAIN_PATTERN,
    LABEL_KEY_MAX,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    MAP_LIMIT,
    RESERVED_ANNOTATION_PREFIXES,
    RESERVED_LABEL_PREFIXES,
    RESERVED_LABELS,
    AffinitySpec,
    EnvFromSpec,
    EnvVarSpec,
    LocalObjectRefSpec,
    VolumeMountSpec,
    VolumeSpec,
    label_keys_rule,
    reserved_keys_rule,
)
from leyline.v1.cluster_pb2 import DeadlinePolicy, IncidentScope
from leyline.v1.resilience_pb2 import EmergencyLevel

IMAGE_PATTERN = r"^$|^[^\s]+$"
"""An image reference without spaces, or empty for the operator's default."""
GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource `spec.pod.resources.gpus` requests."""
EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""An extended resource: a domain, `/`, a name (`nvidia.com/gpu`, `example.com/fpga`)."""
NATIVE_EXTRA_PATTERN = r"^ephemeral-storage$|" + HUGEPAGES_PATTERN
"""The Kubernetes resources besides cpu and memory a container may request."""
ZERO_PATTERN = r"^0+(\.0+)?[A-Za-z]*$"
"""A quantity that is zero (`0`, `0Gi`, `0.0`)."""
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]


def _extra_resource_ok(name: str, amount: str) -> bool:
    if name.startswith("requests.") or "kubernetes.io" in name:
        return False
    if re.fullmatch(EXTENDED_RESOURCE_PATTERN, name):
        return re.fullmatch(COUNT_PATTERN, amount) is not None
    if re.fullmatch(NATIVE_EXTRA_PATTERN, name):
        return re.fullmatch(BYTES_PATTERN, amount) is not None
    return False


def _not_zero(field: str, attr: str) -> Rule:
    """Byte size `field` is more than 0: a zero `sizeLimit` means "no limit" to the kubelet."""
    return Rule(
        field=field,
        message="must be more than 0 bytes (0 would mean no limit at all)",
        cel=f"!self.{field}.matches({cel_string(ZERO_PATTERN)})",
        holds=lambda s: re.fullmatch(ZERO_PATTERN, getattr(s, attr)) is None,
    )


class ResourcesSpec(SpecModel):
    """`spec.pod.resources`: what the trainer container requests."""

    cpu: str = Field(default="2", pattern=QUANTITY_PATTERN, max_length=32)
    """CPU request and limit of the trainer container."""
    memory: str = Field(default="8Gi", pattern=BYTES_PATTERN, max_length=32)
    """Memory request and limit of the trainer container (shared memory is accounted apart); a
    byte size (`8Gi`), never milli."""
    gpus: int = Field(default=0, ge=0, le=64)
    """`nvidia.com/gpu` request and limit; 0 for a CPU run."""
    extra: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]] = Field(
        default_factory=dict, max_length=16
    )
    """Further resources, request and limit alike: extended resources with a whole count
    (`example.com/fpga: "1"`, `nvidia.com/mig-1g.10gb: "2"`), `ephemeral-storage` or
    `hugepages-<size>` with a byte size."""

    rules = (
        Rule(
            field="extra",
            message="keys must be an extended resource (domain/name, e.g. example.com/fpga) with "
            "a whole count, or ephemeral-storage or hugepages-<size> with a byte size; cpu and "
            "memory have their own fields",
            cel=f"self.extra.all(k, k.size() <= {LABEL_KEY_MAX} && !k.startsWith('requests.') "
            "&& !k.contains('kubernetes.io') && ("
            f"k.matches({cel_string(EXTENDED_RESOURCE_PATTERN)}) ? "
            f"self.extra[k].matches({cel_string(COUNT_PATTERN)}) : "
            f"k.matches({cel_string(NATIVE_EXTRA_PATTERN)}) && "
            f"self.extra[k].matches({cel_string(BYTES_PATTERN)})))",
            holds=lambda s: all(
                len(k) <= LABEL_KEY_MAX and _extra_resource_ok(k, v) for k, v in s.extra.items()
            ),
        ),
        Rule(
            field="extra",
            message=f"{GPU_RESOURCE} is set by gpus; name it in one place",
            cel=f"self.gpus == 0 || !('{GPU_RESOURCE}' in self.extra)",
            holds=lambda s: s.gpus == 0 or GPU_RESOURCE not in s.extra,
        ),
    )


class CheckpointVolumeSpec(SpecModel):
    """`spec.pod.checkpointVolume`: where the sidecar writes durable checkpoints."""

    claim_name: str = Field(default="", pattern=r"^$|" + DNS_SUBDOMAIN_PATTERN, max_length=253)
    """A PersistentVolumeClaim to mount (survives pod loss); empty: an emptyDir."""
    size_limit: str = Field(default="20Gi", pattern=BYTES_PATTERN, max_length=32)
    """Size limit of the emptyDir when no claim is named (a byte size)."""

    rules = (_not_zero("sizeLimit", "size_limit"),)


class TolerationSpec(SpecModel):
    """One entry of `spec.pod.tolerations` (as in a PodSpec)."""

    key: str = Field(default="", pattern=r"^$|" + LABEL_KEY_PATTERN, max_length=LABEL_KEY_MAX)
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: str = Field(default="", pattern=LABEL_VALUE_PATTERN, max_length=63)
    """Taint value for Equal; empty for Exists."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Taint effect matched; empty matches all."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""

    rules = (
        Rule(
            field="value",
            message="must be empty when operator is Exists",
            cel="self.operator != 'Exists' || self.value == ''",
            holds=lambda s: s.operator != "Exists" or s.value == "",
        ),
        Rule(
            field="operator",
            message="must be Exists when key is empty (a toleration of every taint)",
            cel="self.key != '' || self.operator == 'Exists'",
            holds=lambda s: s.key != "" or s.operator == "Exists",
        ),
        Rule(
            field="tolerationSeconds",
            message="may only be set when effect is NoExecute",
            cel="!has(self.tolerationSeconds) || self.effect == 'NoExecute'",
            holds=lambda s: s.toleration_seconds is None or s.effect == "NoExecute",
        ),
    )


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
    shm_size_limit: str = Field(default="", pattern=r"^$|" + BYTES_PATTERN, max_length=32)
    """Size limit of the memory-backed /dev/shm (snapshot slots live there), a byte size such as
    `6Gi` (never milli: `100m` is a tenth of a byte); empty: computed by the operator from the
    snapshot slots and headroom, at least 1Gi."""
    checkpoint_volume: CheckpointVolumeSpec = Field(default_factory=CheckpointVolumeSpec)
    """Where durable checkpoints go."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAP_LIMIT)
    """Node labels the pod must match."""
    tolerations: list[TolerationSpec] = Field(default_factory=list, max_length=32)
    """Taints the pod tolerates."""
    affinity: AffinitySpec | None = None
    """Node affinity, pod affinity and anti-affinity (as in a PodSpec)."""
    scheduler_name: str = Field(default="", pattern=r"^$|" + DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The scheduler that places the pod (e.g. a gang scheduler); empty: the default one."""
    priority_class_name: str = Field(
        default="", pattern=r"^$|" + DNS_SUBDOMAIN_PATTERN, max_length=253
    )
    """PriorityClass of the pod (preemption is not counted as a failure)."""
    service_account_name: str = Field(
        default="", pattern=r"^$|" + DNS_SUBDOMAIN_PATTERN, max_length=253
    )
    """ServiceAccount of the trainer container (the sidecar never mounts its token)."""
    image_pull_secrets: list[LocalObjectRefSpec] = Field(default_factory=list, max_length=16)
    """Secrets of the run's namespace for pulling the images, added to the operator's
    (`images.pullSecrets`)."""
    env: list[EnvVarSpec] = Field(default_factory=list, max_length=256)
    """Environment variables of the trainer (unique names; not `TOLARIA_*` or `HOME`)."""
    env_from: list[EnvFromSpec] = Field(default_factory=list, max_length=16)
    """ConfigMaps and Secrets whose keys become variables of the trainer."""
    volumes: list[VolumeSpec] = Field(default_factory=list, max_length=32)
    """Extra volumes of the pod (datasets, credentials, scratch), mounted by `volumeMounts`."""
    volume_mounts: list[VolumeMountSpec] = Field(default_factory=list, max_length=64)
    """Where the trainer sees the extra volumes (unique paths, none over the operator's)."""
    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAP_LIMIT)
    """Extra labels of the pod (not the operator's `tolaria.dev/*`, `app.kubernetes.io/name`,
    `component`, `managed-by`, nor Kueue's, which come from the run's `metadata.labels`)."""
    annotations: dict[str, Annotated[str, Field(max_length=32768)]] = Field(
        default_factory=dict, max_length=MAP_LIMIT
    )
    """Extra annotations of the pod (not the operator's `tolaria.dev/*`)."""

    rules = (
        label_keys_rule("nodeSelector"),
        Rule(
            field="volumeMounts",
            message="every mount must name a volume of spec.pod.volumes",
            cel="self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
            holds=lambda s: {m.name for m in s.volume_mounts} <= {v.name for v in s.volumes},
        ),
        Rule(
            field="volumes",
            message="names must be unique",
            cel="self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))",
            holds=lambda s: len({v.name for v in s.volumes}) == len(s.volumes),
        ),
        Rule(
            field="volumeMounts",
            message="mount paths must be unique",
            cel="self.volumeMounts.all(m, self.volumeMounts.exists_one(n, "
            "n.mountPath == m.mountPath))",
            holds=lambda s: len({m.mount_path for m in s.volume_mounts}) == len(s.volume_mounts),
        ),
        Rule(
            field="env",
            message="names must be unique",
            cel="self.env.all(e, self.env.exists_one(f, f.name == e.name))",
            holds=lambda s: len({e.name for e in s.env}) == len(s.env),
        ),
        label_keys_rule("labels"),
        reserved_keys_rule("labels", prefixes=RESERVED_LABEL_PREFIXES, names=RESERVED_LABELS),
        label_keys_rule("annotations"),
        reserved_keys_rule("annotations", prefixes=RESERVED_ANNOTATION_PREFIXES, names=()),
        Rule(
            field="shmSizeLimit",
            message="must be more than 0 bytes (0 would mean no limit at all)",
            cel=f"!self.shmSizeLimit.matches({cel_string(ZERO_PATTERN)})",
            holds=lambda s: re.fullmatch(ZERO_PATTERN, s.shm_size_limit) is None,
        ),
    )


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
