"""The operator's own settings: one frozen dataclass per concern, composed by `TolariaSettings`.

Modelled on kopf's `OperatorSettings`: each field's docstring gives its unit and why its
default is what it is. The defaults are the only place these numbers are written; a test pins
every one. `__main__` and the kopf startup handler build the settings with `from_env`
(`TOLARIA_OPERATOR_<SECTION>_<FIELD>`, which `--set section.field=value` also writes).
This module reads nothing at import time and never talks to the cluster; it refuses a bad
value at the edge with `SettingsInvalid`, naming the variable and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

from leyline.spec.cluster import PodSpec
from leyline.v1.cluster_pb2 import IncidentScope
from tolaria_operator.errors import SettingsInvalid

MiB = 1024 * 1024
GiB = 1024 * MiB
ENV_PREFIX = "TOLARIA_OPERATOR_"
PULL_POLICIES: tuple[str, ...] = tuple(
    p for p in get_args(PodSpec.model_fields["image_pull_policy"].annotation) if p
)
"""What a container's `imagePullPolicy` may be: the manifest's own choices (`spec.pod`) but the
empty one, which means "the operator's default"."""
_DNS_NAME = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")
REACH_SCOPES: tuple[str, ...] = tuple(
    IncidentScope.Name(s)
    for s in (IncidentScope.run, IncidentScope.namespace, IncidentScope.cluster)
)
"""What `escalation.max_scope` may be: the scopes that say which namespaces an incident reaches
(`node` and `group` select runs within a reach, they do not widen it)."""


@dataclass(frozen=True)
class PodSettings:
    """How each attempt's pod is built (R10.1, R10.5)."""

    native_sidecar: bool = True
    """Run the sidecar as a native sidecar (an init container with `restartPolicy: Always`,
    on by default since Kubernetes 1.29): it starts before the trainer and outlives it. False
    for older clusters: a plain second container, and the operator deletes the pod once the
    trainer has a final outcome (the sidecar would otherwise keep it running)."""
    control_port: int = 7070
    """TCP port of the sidecar's authenticated `SidecarControl` service."""
    trainer_metrics_port: int = 9401
    """Trainer's Prometheus port (`--metrics-port`)."""
    sidecar_metrics_port: int = 9402
    """Sidecar's Prometheus port (`--metrics-port`)."""
    termination_grace_period_seconds: int = 60
    """Seconds between SIGTERM and SIGKILL: the trainer finishes its step and the sidecar
    flushes the WAL; twice the kubelet's 30 s default because a durable write may be running."""
    run_as_user: int = 10001
    """UID, GID and fsGroup of both containers; any non-root id works with the images."""
    default_shm_bytes: int = 4 * GiB
    """`/dev/shm` size limit when neither `spec.pod.shmSizeLimit` nor `spec.snapshots.maxBytes`
    is set: five slots of a model of a few hundred MB with their headroom."""
    min_shm_bytes: int = 1 * GiB
    """Smallest `/dev/shm` the operator makes: the control block, manifests and NCCL need room
    even for a tiny model."""
    shm_margin_bytes: int = 64 * MiB
    """Added to `spec.snapshots.maxBytes` for the control block and the slot manifests."""
    sidecar_cpu: str = "500m"
    """CPU request and limit of the sidecar: it verifies checksums and writes checkpoints."""
    sidecar_memory_bytes: int = 512 * MiB
    """Sidecar memory besides `/dev/shm`; the shm size is added to its request and limit
    because the sidecar pre-faults the slots, so their pages are charged to its cgroup."""
    startup_probe_period_seconds: int = 1
    """Period of the sidecar's TCP startup probe: the trainer starts within a second of it."""
    startup_probe_failure_threshold: int = 120
    """Probe failures before the kubelet restarts the sidecar: two minutes to pre-fault
    gigabytes of shared memory and replay the WAL."""


@dataclass(frozen=True)
class ImageSettings:
    """The images of every run pod when the run names none (R10.1): a cluster sets them once
    (the Helm chart's `images` values) so a `TolariaRun` need not name a registry. A run's own
    `spec.pod.image`, `sidecarImage` and `imagePullPolicy` win when set."""

    trainer: str = "ghcr.io/tolaria/trainer:0.1.0"
    """Trainer image of a run whose `spec.pod.image` is empty: the version this operator was
    released with, so trainer, sidecar and operator speak the same Leyline contracts."""
    sidecar: str = "ghcr.io/tolaria/sidecar:0.1.0"
    """Sidecar image of a run whose `spec.pod.sidecarImage` is empty (same version reason)."""
    pull_policy: str = "IfNotPresent"
    """Pull policy of both images when `spec.pod.imagePullPolicy` is empty: `IfNotPresent`,
    the kubelet's own default for a tagged image (a pinned tag never changes)."""
    pull_secrets: tuple[str, ...] = ()
    """Names of Secrets in the run's namespace put in every run pod's `imagePullSecrets`, for
    a private registry; empty: none (public images, or credentials on the nodes)."""


@dataclass(frozen=True)
class NetworkSettings:
    """Who may reach a run pod's ports (the NetworkPolicy, R10.5)."""

    operator_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "tolaria-operator"}
    )
    """Labels of the operator's pods: only they may reach the sidecar's control port (the
    Helm chart labels the operator this way)."""
    operator_namespace: str = ""
    """Namespace the operator runs in; empty: pods with the labels above in any namespace (the
    token still authenticates every call). `__main__` fills it from the service account."""
    metrics_namespace_labels: Mapping[str, str] = field(default_factory=dict)
    """Namespace labels of the Prometheus that scrapes the metrics ports; empty: the run's own
    namespace only."""
    metrics_pod_labels: Mapping[str, str] = field(default_factory=dict)
    """Pod labels of that Prometheus; empty: any pod of those namespaces."""


@dataclass(frozen=True)
class StatusSettings:
    """How often status is written and the run re-examined (R10.1, R10.3)."""

    progress_patch_interval_seconds: float = 2.0
    """At most one progress/snapshot/checkpoint status patch per run in this window, so a
    sidecar streaming every step does not flood the API server; rollback, emergency and
    final changes are written at once."""
    progress_patches_per_second: float = 10.0
    """The whole operator's budget for those patches: with N runs followed, each run's window
    is `max(progress_patch_interval_seconds, N / this)` (1,000 runs: one patch per run per
    100 s), so the API server's load stays flat however many runs there are."""
    deadline_check_interval_seconds: float = 1.0
    """How often runs with a full rollback in progress compare `status.rollback.deadline`
    with the clock: one twelfth of the 12 s deadline (R12). Fixed when handlers register."""
    resync_interval_seconds: float = 15.0
    """Every active run is reconciled at least this often even without an event, so no phase
    sticks (a missed watch event, a pod that never starts). Fixed when handlers register."""
    pod_gone_timeout_seconds: float = 30.0
    """How long one reconcile waits for a deleted pod to disappear before it gives up and
    retries later: the next attempt starts only after the old pod is gone."""
    pod_gone_poll_seconds: float = 0.5
    """Poll period while waiting for a deleted pod to disappear."""
    retry_delay_seconds: float = 5.0
    """Delay of kopf's retry after a transient failure (API errors, a pod not yet gone)."""
    daemon_cancellation_timeout_seconds: float = 5.0
    """How long kopf waits for a run's sidecar follower to stop. Fixed when handlers register."""


@dataclass(frozen=True)
class SidecarLinkSettings:
    """The operator's gRPC link to each run's sidecar."""

    address_template: str = "{service}.{namespace}.svc:{port}"
    """Address of a run's sidecar: the headless Service publishes the pod (also while not
    ready). Tests replace the resolver instead."""
    connect_timeout_seconds: float = 2.0
    """A sidecar that does not answer `GetStatus` within this is unreachable."""
    call_timeout_seconds: float = 5.0
    """Deadline of `GetStatus` and `ResolveEmergency` once connected."""
    signal_grace_seconds: float = 1.0
    """Added to the level's response budget for the network when signalling an emergency; a
    later answer counts as NoAck (the sidecar itself gives up after the budget)."""
    reconnect_min_seconds: float = 0.5
    """First back-off after the event stream breaks."""
    reconnect_max_seconds: float = 10.0
    """Longest back-off between reconnects: a restarted sidecar is followed within this."""


@dataclass(frozen=True)
class SuspendSettings:
    """Checkpoint-then-stop on `spec.suspend` (R10.1)."""

    checkpoint_timeout_seconds: float = 120.0
    """How long the operator waits for the suspend checkpoint to become durable before it
    stops the pod anyway (the last committed checkpoint is then the resume point)."""


@dataclass(frozen=True)
class EscalationSettings:
    """Cluster-wide escalation of incidents (R10.4)."""

    fanout_concurrency: int = 32
    """Sidecars signalled at once: a CRITICAL reaches 32 runs within one response budget."""
    watch_namespaces: tuple[str, ...] = ()
    """Namespaces whose runs an incident can reach; empty: every namespace (the operator runs
    with `-A`). `__main__` fills it from `--namespace`."""
    per_run_timeline_limit: int = 32
    """Up to this many reached runs the timeline has one entry per run; beyond, one entry per
    outcome (the timeline holds at most 256 entries)."""
    max_scope: str = IncidentScope.Name(IncidentScope.namespace)
    """The widest reach of an incident raised by a run outside `cluster_scope_namespaces`:
    `run` (no other run is ever signalled), `namespace` (runs of the source's own namespace
    only; `node`, `group` and `cluster` scopes select within it) or `cluster` (every watched
    namespace: no tenant boundary, for a cluster with one tenant). A wider
    `spec.escalation.scope` is narrowed to it and the incident records both. `namespace` by
    default: a run's author controls only their own namespace, so their spec must not freeze,
    and then halt, another tenant's runs."""
    cluster_scope_namespaces: tuple[str, ...] = ()
    """Namespaces an administrator trusts with cluster reach (e.g. the platform team's): their
    runs' incidents take the scope the run asks for, across every watched namespace. A list of
    names, not a namespace label, so granting it takes the operator's settings (the Helm
    release), never a label a tenant might be allowed to set, and costs no API read."""


@dataclass(frozen=True)
class MetricsSettings:
    """The operator's own Prometheus endpoint."""

    port: int = 9403
    """Port of `/metrics`; 0 turns the endpoint off. Next to the trainer's 9401 and the
    sidecar's 9402 (the Helm chart's metrics Service exposes it)."""
    address: str = "0.0.0.0"  # noqa: S104 - served to Prometheus in the cluster
    """Bind address of `/metrics`."""


@dataclass(frozen=True)
class TokenSettings:
    """The run tokens (R10.5): each is an HMAC of the run's UID under one operator key, so the
    operator never reads a Secret to reach a sidecar."""

    key_secret: str = "tolaria-operator-token-key"  # noqa: S105 - a Secret's name
    """Name of the Secret, in the operator's own namespace (`network.operator_namespace`),
    that keeps the key; the operator creates it with a random key when it is missing and
    reads no other Secret. Without a known namespace the key lives in memory only (a
    restarted operator can then no longer reach the sidecars of runs started before)."""


@dataclass(frozen=True)
class RetentionSettings:
    """What the operator deletes on its own, and when: finished runs past their
    `spec.ttlSecondsAfterFinished`, and resolved incidents."""

    resolved_incident_ttl_seconds: float = 86_400.0
    """A resolved TolariaIncident is deleted this long after its resolution: a day to read
    its timeline (`kubectl get tinc`); 0 deletes it at the next sweep."""
    sweep_interval_seconds: float = 30.0
    """How often finished runs and resolved incidents are checked against their TTLs (the
    precision of both); 0 turns the sweep off. It lists runs and incidents, hence not every
    second."""


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Leader election among operator replicas (`leader.py`): one Lease in the operator's own
    namespace (`network.operator_namespace`); only its holder handles runs, the others wait
    as standbys. The timings are client-go's defaults."""

    enabled: bool = False
    """Elect a leader before handling anything. Off for a bare `tolaria-operator` (one
    process); the Helm chart turns it on for its replicas. Needs a known namespace."""
    lease_name: str = "tolaria-operator-leader"
    """Name of the Lease (the chart: `<operator name>-leader`)."""
    lease_duration_seconds: float = 15.0
    """A standby takes the lease when its holder has not renewed it for this long: the
    takeover time after a leader dies without releasing it."""
    renew_deadline_seconds: float = 10.0
    """A leader that could not renew within this long stops at once (before its lease can
    expire for the others): less than the duration."""
    retry_period_seconds: float = 2.0
    """How often the leader renews and a standby tries: less than the renew deadline."""


@dataclass(frozen=True)
class TolariaSettings:
    """Every setting of the operator, one section per concern (cf. kopf's OperatorSettings)."""

    pods: PodSettings = field(default_factory=PodSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    sidecar: SidecarLinkSettings = field(default_factory=SidecarLinkSettings)
    suspend: SuspendSettings = field(default_factory=SuspendSettings)
    escalation: EscalationSettings = field(default_factory=EscalationSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    leader_election: LeaderElectionSettings = field(default_factory=LeaderElectionSettings)


def env_name(section: str, name: str) -> str:
    """`pods`, `native_sidecar` -> `TOLARIA_OPERATOR_PODS_NATIVE_SIDECAR`."""
    return f"{ENV_PREFIX}{section}_{name}".upper()


def from_env(env: Mapping[str, str]) -> TolariaSettings:
    """Settings with every `TOLARIA_OPERATOR_<SECTION>_<FIELD>` in `env` applied.

    Raises `SettingsInvalid` naming the variable for a value of the wrong type, a negative
    number, a pull policy Kubernetes does not know, an empty image, an escalation reach that is
    not a reach, or a `TOLARIA_OPERATOR_*` variable that names no setting.
    """
    known: set[str] = set()
    sections: dict[str, Any] = {}
    for sec in dataclasses.fields(TolariaSettings):
        section_cls = get_type_hints(TolariaSettings)[sec.name]
        hints = get_type_hints(section_cls)
        updates: dict[str, Any] = {}
        for fld in dataclasses.fields(section_cls):
            var = env_name(sec.name, fld.name)
            known.add(var)
            if var in env:
                updates[fld.name] = _parse(var, env[var], hints[fld.name])
                _check(sec.name, fld.name, var, updates[fld.name])
        sections[sec.name] = section_cls(**updates)
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise SettingsInvalid(unknown[0], "names no setting (see tolaria_operator.config)")
    settings = TolariaSettings(**sections)
    check_leader_election(settings)
    return settings


def check_leader_election(settings: TolariaSettings) -> None:
    """The election's rules across fields: a leader must give up before its lease can expire
    for the others, and retry more than once within its deadline; the Lease lives in the
    operator's own namespace, so that must be known."""
    election = settings.leader_election
    if not _DNS_NAME.fullmatch(election.lease_name):
        raise SettingsInvalid(
            env_name("leader_election", "lease_name"),
            f"must be a Lease name (lowercase DNS name), got {election.lease_name!r}",
        )
    if not 0 < election.renew_deadline_seconds < election.lease_duration_seconds:
        raise SettingsInvalid(
            env_name("leader_election", "renew_deadline_seconds"),
            "must be > 0 and less than leader_election.lease_duration_seconds",
        )
    if not 0 < election.retry_period_seconds < election.renew_deadline_seconds:
        raise SettingsInvalid(
            env_name("leader_election", "retry_period_seconds"),
            "must be > 0 and less than leader_election.renew_deadline_seconds",
        )
    if election.enabled and not settings.network.operator_namespace:
        raise SettingsInvalid(
            env_name("leader_election", "enabled"),
            "needs the operator's namespace (network.operator_namespace, POD_NAMESPACE or the "
            "service account's) to keep the Lease in",
        )


def _check(section: str, name: str, var: str, value: Any) -> None:
    """The rules a type alone cannot say: a pod built from a bad image setting would only
    fail at the kubelet, one run at a time, long after the operator started; a misspelt reach
    would only show when an incident is raised."""
    if section == "tokens" and name == "key_secret" and not _DNS_NAME.fullmatch(value):
        raise SettingsInvalid(var, f"must be a Secret name (lowercase DNS name), got {value!r}")
    if section == "escalation" and name == "max_scope" and value not in REACH_SCOPES:
        raise SettingsInvalid(var, f"must be one of {', '.join(REACH_SCOPES)}, got {value!r}")
    if section != "images":
        return
    if name == "pull_policy" and value not in PULL_POLICIES:
        raise SettingsInvalid(var, f"must be one of {', '.join(PULL_POLICIES)}, got {value!r}")
    if name in ("trainer", "sidecar") and (not value or any(c.isspace() for c in value)):
        raise SettingsInvalid(var, f"must be an image reference without spaces, got {value!r}")


def _parse(var: str, raw: str, hint: Any) -> Any:
    text = raw.strip()
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsInvalid(var, f"must be true or false, got {raw!r}")
    if hint is int or hint is float:
        try:
            value = int(text) if hint is int else float(text)
        except ValueError as err:
            raise SettingsInvalid(var, f"must be a number, got {raw!r}") from err
        if value < 0:
            raise SettingsInvalid(var, f"must be >= 0, got {raw!r}")
        return value
    if hint is str:
        return text
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if origin is Mapping:
        return _parse_labels(var, text)
    raise SettingsInvalid(var, f"has an unsupported type {hint!r}")  # pragma: no cover


def _parse_labels(var: str, text: str) -> dict[str, str]:
    """`a=b,c=d` or a JSON object."""
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise SettingsInvalid(var, f"is not a JSON object: {err}") from err
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise SettingsInvalid(var, "must map strings to strings")
        return value
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SettingsInvalid(var, f"must be key=value pairs, got {part!r}")
        labels[key.strip()] = value.strip()
    return labels
