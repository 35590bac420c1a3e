"""Kubernetes fragments a run's pod takes from `spec.pod`: environment, volumes and their mounts,
image pull secrets, affinity, the pod's own labels and annotations.

Each model is a typed subset of the PodSpec field it becomes, carrying the rules the API server
applies to that field when the pod is created (names, label grammars, operator/value pairs,
one source per volume...), so a manifest the CRD accepts does not make a pod the API server
refuses, and `tolaria validate` refuses what the server would. The operator's own parts of the
pod are reserved here too (`RESERVED_*`): a manifest cannot name a volume, a mount path, an
environment variable, a label or an annotation the operator sets, because the pod would be
refused (a duplicate volume) or would quietly break (a mount over `/dev/shm`, a `TOLARIA_*`
variable the trainer reads). `tests/operator/test_pods.py` checks these lists against the pod
the operator actually builds.

Every CEL rule here uses only what Kubernetes 1.28 (the chart's oldest) compiles; every list
and map has a bound so the API server can price its rules.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from leyline.quantity import BYTES_PATTERN
from leyline.spec.base import Rule, SpecModel, cel_string

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A DNS label (RFC 1123), at most 63 characters: a volume's name, a namespace."""
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A DNS subdomain (RFC 1123), at most 253 characters: names of Secrets, ConfigMaps, claims,
PriorityClasses, ServiceAccounts, schedulers."""
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most
63 characters."""
LABEL_KEY_MAX = 317
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
"""A label value: empty, or at most 63 characters starting and ending alphanumeric."""
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
"""An environment variable name as Kubernetes 1.28 accepts it (later versions accept more)."""
CONFIG_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
"""A key of a ConfigMap or Secret."""
MOUNT_PATH_PATTERN = r"^(/[^/]+)+$"
"""An absolute path without an empty segment or a trailing `/` (so prefixes can be compared)."""

RESERVED_VOLUMES = ("dshm", "checkpoints", "socket", "manifest", "token", "work", "tmp")
"""The volumes of the operator's pod (shared memory, checkpoints, the sidecar's socket, the run
manifest, the run token, the trainer's work directory, /tmp)."""
RESERVED_PATHS = (  # the pod's own emptyDirs, never the host's /dev/shm or /tmp
    "/dev/shm",  # noqa: S108
    "/dev/termination-log",
    "/run/tolaria",
    "/etc/tolaria",
    "/var/lib/tolaria",
    "/var/run/secrets/tolaria",
    "/tmp",  # noqa: S108
)
"""Where the operator mounts those volumes (and the trainer's termination message): a mount at,
inside or above one of them would hide it."""
RESERVED_ENV_PREFIX = "TOLARIA_"
"""Every `TOLARIA_*` variable is Tolaria's: the operator sets the attempt and the run
instance, and the trainer and sidecar read others (`TOLARIA_SHM_DIR`...)."""
RESERVED_ENV = ("HOME",)
"""Set by the operator to /tmp: the root filesystem is read-only, caches go there."""
RESERVED_LABEL_PREFIXES = ("tolaria.dev/", "kueue.x-k8s.io/")
"""The operator's own labels (run, attempt), and Kueue's, which come from the TolariaRun's
`metadata.labels` (a queue named on the pod alone would bypass the run's admission)."""
RESERVED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
)
"""The operator's `app.kubernetes.io` labels, which select the run's pods."""
RESERVED_ANNOTATION_PREFIXES = ("tolaria.dev/",)
"""The operator's annotations (the run's counters before each attempt)."""

MAP_LIMIT = 64
"""Entries of a label or annotation map (and of similar maps): enough for any pod, and a bound
the API server can price CEL over."""
LIST_LIMIT = 16
"""Items of the small lists inside affinity terms and selectors."""


def _matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def _any_prefix(prefixes: tuple[str, ...], var: str) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)


def label_keys_rule(field: str) -> Rule:
    """Every key of map `field` is a label key (the CRD cannot constrain a map's keys)."""
    return Rule(
        field=field,
        message="keys must be label keys (an optional DNS-subdomain prefix and '/', then a "
        "name of at most 63 letters, digits, '-', '_' or '.')",
        cel=f"self.{field}.all(k, k.size() <= {LABEL_KEY_MAX} && "
        f"k.matches({cel_string(LABEL_KEY_PATTERN)}))",
        holds=lambda s: all(
            len(k) <= LABEL_KEY_MAX and _matches(LABEL_KEY_PATTERN, k)
            for k in getattr(s, _snake(field))
        ),
    )


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
"""A label value (as a map's value or a list's item)."""


# -- environment -------------------------------------------------------------------------------


class KeyRefSpec(SpecModel):
    """A key of a ConfigMap or Secret in the run's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The ConfigMap's or Secret's name."""
    key: str = Field(pattern=CONFIG_KEY_PATTERN, max_length=253)
    """The key whose value is used."""
    optional: bool = False
    """True: a missing object or key leaves the variable unset instead of failing the pod."""


class FieldRefSpec(SpecModel):
    """A field of the pod (the downward API)."""

    field_path: str = Field(
        pattern=r"^(metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]"
        r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$",
        max_length=400,
    )
    """e.g. `metadata.name`, `metadata.labels['team']`, `spec.nodeName`, `status.podIP`."""


class ResourceFieldRefSpec(SpecModel):
    """A request or limit of the trainer container."""

    resource: str = Field(
        pattern=r"^(limits|requests)\.(cpu|memory|ephemeral-storage|hugepages-[0-9A-Za-z]+)$",
        max_length=64,
    )
    """e.g. `limits.memory`, `requests.cpu`."""
    divisor: Literal["", "1m", "1", "1k", "1M", "1G", "1T", "1Ki", "1Mi", "1Gi", "1Ti"] = ""
    """Unit of the value (`1m` counts millicores, `1Mi` mebibytes); empty: 1."""


class EnvVarSourceSpec(SpecModel):
    """Where a variable's value comes from: exactly one source."""

    config_map_key_ref: KeyRefSpec | None = None
    """A key of a ConfigMap."""
    secret_key_ref: KeyRefSpec | None = None
    """A key of a Secret."""
    field_ref: FieldRefSpec | None = None
    """A field of the pod."""
    resource_field_ref: ResourceFieldRefSpec | None = None
    """A resource of the trainer container."""

    rules = (
        Rule(
            field="configMapKeyRef",
            message="exactly one of configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef "
            "must be set",
            cel="(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0)"
            " + (has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) == 1",
            holds=lambda s: (
                sum(
                    x is not None
                    for x in (
                        s.config_map_key_ref,
                        s.secret_key_ref,
                        s.field_ref,
                        s.resource_field_ref,
                    )
                )
                == 1
            ),
        ),
    )


class EnvVarSpec(SpecModel):
    """One environment variable of the trainer (as in a container's `env`)."""

    name: str = Field(pattern=ENV_NAME_PATTERN, max_length=256)
    """Its name; `TOLARIA_*` and `HOME` are the operator's."""
    value: str = Field(default="", max_length=32768)
    """Its value (`$(OTHER)` refers to a variable defined before it)."""
    value_from: EnvVarSourceSpec | None = None
    """Its value from a ConfigMap, a Secret or the pod; exclusive with `value`."""

    rules = (
        Rule(
            field="name",
            message=f"{RESERVED_ENV_PREFIX}* and {', '.join(RESERVED_ENV)} are set by the operator",
            cel=f"!self.name.startsWith('{RESERVED_ENV_PREFIX}') && "
            + " && ".join(f"self.name != '{n}'" for n in RESERVED_ENV),
            holds=lambda s: (
                not s.name.startswith(RESERVED_ENV_PREFIX) and s.name not in RESERVED_ENV
            ),
        ),
        Rule(
            field="valueFrom",
            message="may not be set together with value",
            cel="self.value == '' || !has(self.valueFrom)",
            holds=lambda s: s.value == "" or s.value_from is None,
        ),
    )


class NamedRefSpec(SpecModel):
    """A ConfigMap or Secret in the run's namespace, by name."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Its name."""
    optional: bool = False
    """True: a missing object is skipped instead of failing the pod."""


class EnvFromSpec(SpecModel):
    """Every key of a ConfigMap or Secret as a variable (as in a container's `envFrom`); a
    variable of `env`, and the operator's own, win over one of the same name."""

    prefix: str = Field(default="", pattern=r"^$|" + ENV_NAME_PATTERN, max_length=256)
    """Put before every key; may not start with `TOLARIA_`."""
    config_map_ref: NamedRefSpec | None = None
    """The ConfigMap."""
    secret_ref: NamedRefSpec | None = None
    """The Secret."""

    rules = (
        Rule(
            field="prefix",
            message=f"may not start with {RESERVED_ENV_PREFIX} (the operator's variables)",
            cel=f"!self.prefix.startsWith('{RESERVED_ENV_PREFIX}')",
            holds=lambda s: not s.prefix.startswith(RESERVED_ENV_PREFIX),
        ),
        Rule(
            field="configMapRef",
            message="exactly one of configMapRef, secretRef must be set",
            cel="has(self.configMapRef) != has(self.secretRef)",
            holds=lambda s: (s.config_map_ref is None) != (s.secret_ref is None),
        ),
    )


class LocalObjectRefSpec(SpecModel):
    """An object in the run's namespace by name (an image pull Secret)."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """Its name."""


# -- volumes -----------------------------------------------------------------------------------


class ClaimSourceSpec(SpecModel):
    """A PersistentVolumeClaim in the run's namespace."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The claim's name."""
    read_only: bool = False
    """Mount it read-only (a shared dataset)."""


class ConfigMapSourceSpec(SpecModel):
    """A ConfigMap's keys as files."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The ConfigMap's name."""
    optional: bool = False
    """True: a missing ConfigMap gives an empty directory instead of failing the pod."""
    default_mode: int | None = Field(default=None, ge=0, le=0o777)
    """Mode bits of the files (decimal in JSON and YAML: 420 is 0644); unset: 0644."""


class SecretSourceSpec(SpecModel):
    """A Secret's keys as files."""

    secret_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    """The Secret's name."""
    optional: bool = False
    """True: a missing Secret gives an empty directory instead of failing the pod."""
    default_mode: int | None = Field(default=None, ge=0, le=0o777)
    """Mode bits of the files (decimal: 256 is 0400); unset: 0644."""


class EmptyDirSourceSpec(SpecModel):
    """Scratch space that lives as long as the pod."""

    medium: Literal["", "Memory"] = ""
    """`Memory`: a tmpfs charged to the pod's memory; empty: the node's disk."""
    size_limit: str = Field(default="", pattern=r"^$|" + BYTES_PATTERN, max_length=32)
    """Its size limit (a byte size such as `50Gi`); empty: none."""


class NfsSourceSpec(SpecModel):
    """An NFS export."""

    server: str = Field(min_length=1, max_length=253)
    """Host name or IP address of the NFS server."""
    path: str = Field(pattern=r"^/", max_length=4096)
    """The exported path."""
    read_only: bool = False
    """Mount it read-only."""


class CsiSourceSpec(SpecModel):
    """An inline volume of a CSI driver (e.g. an object-store bucket as files)."""

    driver: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=63)
    """The driver's name, e.g. `s3.csi.aws.com`."""
    read_only: bool = False
    """Mount it read-only."""
    fs_type: str = Field(default="", max_length=63)
    """Filesystem type, when the driver asks for one."""
    volume_attributes: dict[str, str] = Field(default_factory=dict, max_length=MAP_LIMIT)
    """Driver-specific attributes."""
    node_publish_secret_ref: LocalObjectRefSpec | None = None
    """A Secret with the driver's credentials."""


class VolumeSpec(SpecModel):
    """An extra volume of the pod (a dataset, credentials, scratch): exactly one source. The
    operator's own volumes cannot be named; hostPath and other node-level sources are not
    offered."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """The volume's name, which a mount names; not one of the operator's."""
    persistent_volume_claim: ClaimSourceSpec | None = None
    """A PersistentVolumeClaim."""
    config_map: ConfigMapSourceSpec | None = None
    """A ConfigMap."""
    secret: SecretSourceSpec | None = None
    """A Secret."""
    empty_dir: EmptyDirSourceSpec | None = None
    """An emptyDir."""
    nfs: NfsSourceSpec | None = None
    """An NFS export."""
    csi: CsiSourceSpec | None = None
    """An inline CSI volume."""

    rules = (
        Rule(
            field="name",
            message=f"{', '.join(RESERVED_VOLUMES)} are the operator's volumes",
            cel="!(self.name in [" + ", ".join(f"'{v}'" for v in RESERVED_VOLUMES) + "])",
            holds=lambda s: s.name not in RESERVED_VOLUMES,
        ),
        Rule(
            field="name",
            message="exactly one of persistentVolumeClaim, configMap, secret, emptyDir, nfs, "
            "csi must be set",
            cel=" + ".join(
                f"(has(self.{k}) ? 1 : 0)"
                for k in ("persistentVolumeClaim", "configMap", "secret", "emptyDir", "nfs", "csi")
            )
            + " == 1",
            holds=lambda s: (
                sum(
                    x is not None
                    for x in (
                        s.persistent_volume_claim,
                        s.config_map,
                        s.secret,
                        s.empty_dir,
                        s.nfs,
                        s.csi,
                    )
                )
                == 1
            ),
        ),
    )


def _clashes(path: str) -> bool:
    """Whether a mount at `path` is at, inside or above a path the operator uses."""
    return any(
        path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in RESERVED_PATHS
    )


class VolumeMountSpec(SpecModel):
    """Where the trainer sees one of `spec.pod.volumes`."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    """The volume, by its name in `spec.pod.volumes`."""
    mount_path: str = Field(pattern=MOUNT_PATH_PATTERN, max_length=1024)
    """Absolute path in the trainer container; not at, inside or above the operator's paths
    (`/dev/shm`, `/run/tolaria`, `/etc/tolaria`, `/var/lib/tolaria`, `/tmp`...)."""
    read_only: bool = False
    """Mount it read-only."""
    sub_path: str = Field(default="", pattern=r"^$|^[^/]", max_length=1024)
    """A path inside the volume to mount instead of its root (relative, no `..`)."""

    rules = (
        Rule(
            field="mountPath",
            message="may not be at, inside or above a path the operator mounts ("
            + ", ".join(RESERVED_PATHS)
            + "), nor contain a . or .. segment",
            cel="!self.mountPath.matches('(^|/)[.][.]?(/|$)') && "
            + " && ".join(
                f"self.mountPath != '{r}' && !self.mountPath.startsWith('{r}/') && "
                f"!'{r}'.startsWith(self.mountPath + '/')"
                for r in RESERVED_PATHS
            ),
            holds=lambda s: (
                not _clashes(s.mount_path) and re.search(r"(^|/)[.][.]?(/|$)", s.mount_path) is None
            ),
        ),
        Rule(
            field="subPath",
            message="may not contain a .. segment",
            cel="!self.subPath.matches('(^|/)[.][.](/|$)')",
            holds=lambda s: re.search(r"(^|/)[.][.](/|$)", s.sub_path) is None,
        ),
    )


# -- affinity ----------------------------------------------------------------------------------

_VALUES_BY_OPERATOR = Rule(
    field="values",
    message="must be non-empty for In and NotIn, empty for Exists and DoesNotExist, and one "
    "integer for Gt and Lt",
    cel="self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : "
    "self.operator in ['Exists', 'DoesNotExist'] ? size(self.values) == 0 : "
    "size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$')",
    holds=lambda s: (
        len(s.values) > 0
        if s.operator in ("In", "NotIn")
        else len(s.values) == 0
        if s.operator in ("Exists", "DoesNotExist")
        else len(s.values) == 1 and _matches(r"^-?[0-9]+$", s.values[0])
    ),
)


class NodeSelectorRequirementSpec(SpecModel):
    """A node label compared with values."""

    key: str = Field(pattern=LABEL_KEY_PATTERN, max_length=LABEL_KEY_MAX)
    """The node label."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """How it is compared."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Non-empty for In and NotIn, empty for Exists and DoesNotExist, one integer for Gt, Lt."""

    rules = (_VALUES_BY_OPERATOR,)


class NodeFieldRequirementSpec(SpecModel):
    """The node's name compared with one value (`matchFields`)."""

    key: Literal["metadata.name"]
    """The only field Kubernetes matches."""
    operator: Literal["In", "NotIn"]
    """How it is compared."""
    values: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]] = Field(
        min_length=1, max_length=1
    )
    """The node name."""


class NodeSelectorTermSpec(SpecModel):
    """Requirements that must all hold."""

    match_expressions: list[NodeSelectorRequirementSpec] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """On node labels."""
    match_fields: list[NodeFieldRequirementSpec] = Field(default_factory=list, max_length=1)
    """On the node's name."""


class NodeSelectorSpec(SpecModel):
    """Terms of which at least one must hold."""

    node_selector_terms: list[NodeSelectorTermSpec] = Field(min_length=1, max_length=LIST_LIMIT)
    """The terms."""


class PreferredNodeTermSpec(SpecModel):
    """A term the scheduler prefers, with its weight."""

    weight: int = Field(ge=1, le=100)
    """1 to 100."""
    preference: NodeSelectorTermSpec
    """The term."""


class NodeAffinitySpec(SpecModel):
    """Which nodes the pod may (or would rather) run on."""

    required_during_scheduling_ignored_during_execution: NodeSelectorSpec | None = None
    """Nodes it must run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredNodeTermSpec] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """Nodes it would rather run on."""


class LabelRequirementSpec(SpecModel):
    """A label compared with values."""

    key: str = Field(pattern=LABEL_KEY_PATTERN, max_length=LABEL_KEY_MAX)
    """The label."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How it is compared."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Non-empty for In and NotIn, empty for Exists and DoesNotExist."""

    rules = (_VALUES_BY_OPERATOR,)


class LabelSelectorSpec(SpecModel):
    """A label selector (every part must hold; empty selects everything)."""

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=LIST_LIMIT)
    """Labels with exactly these values."""
    match_expressions: list[LabelRequirementSpec] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """Label requirements."""

    rules = (label_keys_rule("matchLabels"),)


class PodAffinityTermSpec(SpecModel):
    """Pods matching a selector, in a topology domain (a node, a zone...)."""

    label_selector: LabelSelectorSpec | None = None
    """Which pods."""
    namespaces: list[Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """Their namespaces; empty (and no namespaceSelector): the run's namespace."""
    namespace_selector: LabelSelectorSpec | None = None
    """Their namespaces by label."""
    topology_key: str = Field(pattern=LABEL_KEY_PATTERN, max_length=LABEL_KEY_MAX)
    """The node label that defines the domain, e.g. `kubernetes.io/hostname`."""


class WeightedPodAffinityTermSpec(SpecModel):
    """A pod affinity term the scheduler prefers, with its weight."""

    weight: int = Field(ge=1, le=100)
    """1 to 100."""
    pod_affinity_term: PodAffinityTermSpec
    """The term."""


class PodAffinitySpec(SpecModel):
    """Pods the run's pod must (or would rather) share (or avoid) a domain with."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTermSpec] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """Terms that must hold."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTermSpec] = Field(
        default_factory=list, max_length=LIST_LIMIT
    )
    """Terms the scheduler prefers."""


class AffinitySpec(SpecModel):
    """Scheduling constraints of the pod (as a PodSpec's `affinity`)."""

    node_affinity: NodeAffinitySpec | None = None
    """Nodes."""
    pod_affinity: PodAffinitySpec | None = None
    """Pods to be near."""
    pod_anti_affinity: PodAffinitySpec | None = None
    """Pods to stay away from."""


def reserved_keys_rule(field: str, *, prefixes: tuple[str, ...], names: tuple[str, ...]) -> Rule:
    """The reserved keys of map `field` (the pod's labels or annotations)."""
    reserved = list(names)
    message = "the operator's keys (" + ", ".join([f"{p}*" for p in prefixes] + reserved) + ")"
    in_names = (" || " + " || ".join(f"k == '{n}'" for n in names)) if names else ""
    return Rule(
        field=field,
        message=f"may not use {message}",
        cel=f"!self.{field}.exists(k, {_any_prefix(prefixes, 'k')}{in_names})",
        holds=lambda s: (
            not any(k.startswith(prefixes) or k in names for k in getattr(s, _snake(field)))
        ),
    )
