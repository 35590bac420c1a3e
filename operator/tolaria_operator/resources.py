"""What the operator reads and names: resource coordinates, object names, labels, and the
parsed `TolariaRun` object (`RunObject`).

Pure: every function maps data to data, so `pods.py`, `status.py` and the tests share one
spelling of every name and label. Reading a run validates its spec with Leyline's model
(the same one `tolaria run` uses) and its status leniently: a field this operator version
does not know, or a damaged one, is dropped with the rest kept, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from leyline.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    ManifestInvalid,
    ProtoEnum,
    TolariaRun,
    TolariaRunStatus,
    validate_manifest,
)
from tolaria_operator.errors import SpecInvalid

logger = logging.getLogger(__name__)

RUN_API_VERSION = f"{API_GROUP}/{API_VERSION}"
INCIDENT_KIND = "TolariaIncident"


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool = True
    home: bool = False
    """Used in the operator's own namespace only (its token key), never in a run's: the
    Helm chart grants it there, by name, and not in the namespaces it watches."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """`/api/v1/namespaces/ns/pods/name`; cluster-wide lists when `namespace` is None."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base = f"{base}/namespaces/{namespace}"
        base = f"{base}/{self.plural}"
        return f"{base}/{name}" if name else base


RUNS = Resource(API_GROUP, API_VERSION, "tolariaruns")
INCIDENTS = Resource(API_GROUP, API_VERSION, "tolariaincidents", namespaced=False)
PODS = Resource("", "v1", "pods")
SERVICES = Resource("", "v1", "services")
SECRETS = Resource("", "v1", "secrets")
KEY_SECRETS = Resource("", "v1", "secrets", home=True)
"""The Secret keeping the operator's token key, in the operator's own namespace."""
CONFIGMAPS = Resource("", "v1", "configmaps")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies")
LEASES = Resource("coordination.k8s.io", "v1", "leases", home=True)
"""The leader-election Lease (`leader.py`), in the operator's own namespace."""

# Labels (R10.1): the app.kubernetes.io set, the run and attempt, Kueue's queue.
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
APP_NAME = "tolaria"
COMPONENT = "run"
MANAGER = "tolaria-operator"
RUN_LABEL = f"{API_GROUP}/run"
ATTEMPT_LABEL = f"{API_GROUP}/attempt"
RUN_NAMESPACE_LABEL = f"{API_GROUP}/run-namespace"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
"""The scheduling gate Kueue's pod webhook puts on a pod with a queue label; Kueue removes it
when the pod's workload is admitted (the pod integration)."""

# Pod annotations: the run's counters before this attempt, so the status can be recomputed
# from the pod alone after an operator restart.
RESTARTS_BEFORE_ANNOTATION = f"{API_GROUP}/restarts-before"
COUNTED_BEFORE_ANNOTATION = f"{API_GROUP}/restarts-counted-before"
CREATED_AT_ANNOTATION = f"{API_GROUP}/attempt-created-at"

TRAINER = "trainer"
SIDECAR = "sidecar"


def enum_name(wrapper: Any, value: int) -> str:
    """`RunPhase.Name(value)` for a plain int (the generated stubs want their ValueType)."""
    return str(wrapper.Name(value))


def spell(wrapper: Any, value: int, strip: str = "") -> str:
    """A Leyline enum value as a manifest/status spells it (what the models validate):
    `spell(EmergencyLevel, 4, "EMERGENCY_LEVEL_")` is `critical`."""
    return ProtoEnum(wrapper, strip=strip).spell(str(wrapper.Name(value)))


def manifest_name(run: str) -> str:
    return f"{run}-manifest"


def token_name(run: str, attempt: int, suffix: str) -> str:
    """The token Secret of one attempt: `<run>-a<attempt>-token-<suffix>`, the suffix random,
    so no existing object can hold the name the operator creates and mounts."""
    return f"{run}-a{attempt}-token-{suffix}"


def service_name(run: str) -> str:
    return f"{run}-sidecar"


def network_policy_name(run: str) -> str:
    return f"{run}-sidecar"


def pod_name(run: str, attempt: int) -> str:
    return f"{run}-a{attempt}"


@dataclass(frozen=True)
class RunObject:
    """A `TolariaRun` as read from the API: validated manifest plus the server's metadata."""

    run: TolariaRun
    namespace: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    status: TolariaRunStatus
    raw_status: Mapping[str, Any]
    deleting: bool

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.run.name)

    def reference(self) -> dict[str, Any]:
        """The object as `kopf.event` and Events address it."""
        return {
            "apiVersion": RUN_API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


def parse_run(body: Mapping[str, Any]) -> RunObject:
    """A run from its API body. Raises `SpecInvalid` when the manifest does not validate (the
    CRD schema and the model disagree, or the CRD is stale)."""
    meta = body.get("metadata") or {}
    name = str(meta.get("name", ""))
    namespace = str(meta.get("namespace") or "default")
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    doc = {
        "apiVersion": body.get("apiVersion", RUN_API_VERSION),
        "kind": body.get("kind", KIND),
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": body.get("spec") or {},
    }
    try:
        run = validate_manifest(doc, source=f"{namespace}/{name}")
    except ManifestInvalid as err:
        detail = "; ".join(str(e) for e in err.errors)
        raise SpecInvalid(f"{namespace}/{name}", f"invalid spec: {detail}") from err
    raw_status = dict(body.get("status") or {})
    return RunObject(
        run=run,
        namespace=namespace,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        labels=labels,
        status=parse_status(raw_status),
        raw_status=raw_status,
        deleting=bool(meta.get("deletionTimestamp")),
    )


STATUS_KEYS = frozenset(
    (info.alias or name) for name, info in TolariaRunStatus.model_fields.items()
)
"""The `status` keys the CRD declares (and the only ones the operator ever writes)."""


def parse_status(raw: Mapping[str, Any]) -> TolariaRunStatus:
    """The run's status; unknown keys are ignored and a damaged field is dropped (logged)."""
    known = {k: v for k, v in raw.items() if k in STATUS_KEYS and v is not None}
    try:
        return TolariaRunStatus.model_validate(known, strict=False)
    except ValidationError:
        kept: dict[str, Any] = {}
        for key, value in known.items():
            try:
                TolariaRunStatus.model_validate({key: value}, strict=False)
            except ValidationError:
                logger.warning("status.%s is unreadable and is recomputed: %r", key, value)
                continue
            kept[key] = value
        return TolariaRunStatus.model_validate(kept, strict=False)


def status_wire(status: TolariaRunStatus) -> dict[str, Any]:
    """The status as the API stores it (camelCase, enum names, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def status_patch(prev: Mapping[str, Any], new: TolariaRunStatus) -> dict[str, Any]:
    """A JSON merge patch taking `prev` to `new`: changed keys, and null for declared keys
    `new` no longer has. Undeclared keys in `prev` are left alone."""
    wire = status_wire(new)
    patch: dict[str, Any] = {k: v for k, v in wire.items() if prev.get(k) != v}
    for key in prev:
        if key in STATUS_KEYS and key not in wire and prev[key] is not None:
            patch[key] = None
    return patch


def owner_reference(run: RunObject) -> dict[str, Any]:
    """The controller reference every owned object carries (what `kopf.adopt` would add)."""
    return {
        "apiVersion": RUN_API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def run_labels(run: RunObject) -> dict[str, str]:
    """Labels of every object owned by a run."""
    return {
        NAME_LABEL: APP_NAME,
        COMPONENT_LABEL: COMPONENT,
        MANAGED_BY_LABEL: MANAGER,
        RUN_LABEL: run.name,
    }


def has_owner(body: Mapping[str, Any], uid: str) -> bool:
    """Whether `body` names the object with `uid` among its owners: the only proof that an
    object with a run's name was made for this run (a name or a label anyone can copy; an
    object made for an earlier run of the same name has another uid)."""
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(r.get("uid") == uid for r in refs)


def owned_by(body: Mapping[str, Any], run: RunObject) -> bool:
    """Whether `body` carries this run's label and its owner uid (a pod of the run)."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(RUN_LABEL) != run.name:
        return False
    return has_owner(body, run.uid)
