"""Builders of the objects the operator reads: TolariaRun bodies and pods in the states a
kubelet would put them in (running, crashed, evicted, preempted, never started...)."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tolaria_operator.clock import format_time
from tolaria_operator.config import TolariaSettings
from tolaria_operator.pods import attempt_pod
from tolaria_operator.resources import RunObject, parse_run, token_name

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
"""The time every pure test starts at."""


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def uid_of(name: str, namespace: str = "default") -> str:
    """A distinct, stable uid per run (kopf keys its per-object queues by uid)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tolaria-test/{namespace}/{name}"))


TASK = "synthetic-mlp"
"""The task of every test run that names none (`spec.training.task` is required)."""


def with_task(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `spec` whose training section names a task (`TASK` unless it names one)."""
    spec = copy.deepcopy(spec or {})
    training = spec.setdefault("training", {})
    if isinstance(training, dict):
        training.setdefault("task", TASK)
    return spec


def run_body(
    name: str = "r1",
    *,
    namespace: str = "default",
    uid: str | None = None,
    spec: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
) -> dict[str, Any]:
    uid = uid or uid_of(name, namespace)
    body: dict[str, Any] = {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": generation,
            "resourceVersion": "1",
            "labels": dict(labels or {}),
        },
        "spec": with_task(spec),
    }
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return body


def run_object(**kwargs: Any) -> RunObject:
    return parse_run(run_body(**kwargs))


def with_status(run: RunObject, **status: Any) -> RunObject:
    """The run with `status` (wire form, camelCase) replacing its status."""
    body = run_body(
        run.name,
        namespace=run.namespace,
        uid=run.uid,
        spec=run.run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        labels=dict(run.labels),
        status=status,
        generation=run.generation,
    )
    return parse_run(body)


def new_pod(
    run: RunObject,
    attempt: int,
    settings: TolariaSettings | None = None,
    *,
    created: datetime = T0,
    restarts_before: int = 0,
    counted_before: int = 0,
) -> dict[str, Any]:
    """The pod the operator creates, before any kubelet touched it."""
    return attempt_pod(
        run,
        attempt,
        settings or TolariaSettings(),
        restarts_before=restarts_before,
        counted_before=counted_before,
        created_at=format_time(created),
        token_secret=token_name(run.name, attempt, "0a1b2c3d"),
    )


def _status(pod: dict[str, Any]) -> dict[str, Any]:
    return pod.setdefault("status", {})


def _trainer(
    pod: dict[str, Any],
    state: dict[str, Any],
    restarts: int = 0,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status = _status(pod)
    entry: dict[str, Any] = {"name": "trainer", "state": state, "restartCount": restarts}
    if last is not None:
        entry["lastState"] = last
    status["containerStatuses"] = [entry]
    status["initContainerStatuses"] = [
        {"name": "sidecar", "state": {"running": {"startedAt": format_time(T0)}}, "restartCount": 0}
    ]
    return pod


def scheduled(pod: dict[str, Any], node: str = "node-a") -> dict[str, Any]:
    pod["spec"]["nodeName"] = node
    return pod


def running(
    pod: dict[str, Any],
    *,
    restarts: int = 0,
    last: dict[str, Any] | None = None,
    node: str = "node-a",
) -> dict[str, Any]:
    scheduled(pod, node)
    _status(pod)["phase"] = "Running"
    return _trainer(pod, {"running": {"startedAt": format_time(T0)}}, restarts, last)


def oom_killed(exit_code: int = 137) -> dict[str, Any]:
    return {
        "terminated": {"exitCode": exit_code, "reason": "OOMKilled", "finishedAt": format_time(T0)}
    }


def crash_looping(
    pod: dict[str, Any], restarts: int, *, last: dict[str, Any] | None = None, node: str = "node-a"
) -> dict[str, Any]:
    scheduled(pod, node)
    _status(pod)["phase"] = "Running"
    state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
    return _trainer(pod, state, restarts, last or oom_killed())


def finished(
    pod: dict[str, Any],
    phase: str,
    reason: str = "",
    exit_code: int = 0,
    *,
    message: str | None = None,
) -> dict[str, Any]:
    """The trainer exited 0 with its termination message (pod mode)."""
    scheduled(pod)
    _status(pod)["phase"] = "Succeeded"
    text = (
        message
        if message is not None
        else json.dumps({"phase": phase, "exitCode": exit_code, "reason": reason})
    )
    state = {
        "terminated": {
            "exitCode": 0,
            "reason": "Completed",
            "message": text,
            "finishedAt": format_time(T0),
        }
    }
    return _trainer(pod, state)


def waiting(pod: dict[str, Any], reason: str, message: str = "") -> dict[str, Any]:
    scheduled(pod)
    _status(pod)["phase"] = "Pending"
    return _trainer(pod, {"waiting": {"reason": reason, "message": message}})


def unschedulable(pod: dict[str, Any], message: str = "0/3 nodes are available") -> dict[str, Any]:
    status = _status(pod)
    status["phase"] = "Pending"
    status["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    ]
    return pod


def evicted(pod: dict[str, Any], node: str = "node-a") -> dict[str, Any]:
    """Node-pressure eviction: the pod is Failed with reason Evicted."""
    scheduled(pod, node)
    status = _status(pod)
    status["phase"] = "Failed"
    status["reason"] = "Evicted"
    status["message"] = "The node was low on resource: memory."
    return pod


def disrupted(pod: dict[str, Any], reason: str = "PreemptionByScheduler") -> dict[str, Any]:
    """A DisruptionTarget condition (preemption, drain, taint eviction) and a deletion."""
    running(pod)
    _status(pod).setdefault("conditions", []).append(
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "message": "Preempted in order to admit critical pod",
        }
    )
    pod["metadata"]["deletionTimestamp"] = format_time(T0)
    return pod


def gated(pod: dict[str, Any], gate: str = "kueue.x-k8s.io/admission") -> dict[str, Any]:
    """A pod Kueue's webhook holds until its workload is admitted: a scheduling gate, and the
    PodScheduled condition the scheduler writes for a gated pod."""
    pod["spec"]["schedulingGates"] = [{"name": gate}]
    status = _status(pod)
    status["phase"] = "Pending"
    status["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "SchedulingGated",
            "message": "Scheduling is blocked due to non-empty scheduling gates",
        }
    ]
    return pod


def admitted(pod: dict[str, Any]) -> dict[str, Any]:
    """The same pod once Kueue admitted it and removed its gate (not yet scheduled)."""
    pod["spec"].pop("schedulingGates", None)
    _status(pod).pop("conditions", None)
    return pod


def stopped_by_kueue(
    pod: dict[str, Any],
    condition: str = "TerminationTarget",
    reason: str = "StoppedByKueue",
) -> dict[str, Any]:
    """Kueue's pod integration preempting a running pod: a condition saying why, then a
    deletion (its finalizer keeps the pod until it has terminated)."""
    running(pod)
    _status(pod).setdefault("conditions", []).append(
        {
            "type": condition,
            "status": "True",
            "reason": reason,
            "message": "Preempted to accommodate a higher priority Workload",
        }
    )
    pod["metadata"]["deletionTimestamp"] = format_time(T0)
    return pod


def node_lost(pod: dict[str, Any]) -> dict[str, Any]:
    scheduled(pod)
    status = _status(pod)
    status["phase"] = "Failed"
    status["reason"] = "NodeLost"
    status["message"] = "Node node-a which was running pod is unresponsive"
    return pod


SHARED_POD: dict[str, Any] = {
    "env": [
        {"name": "DATA_DIR", "value": "/data"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "hyper"}, "prefix": "HP_"}],
    "volumes": [
        {"name": "imagenet", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": True}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}},
        {"name": "bucket", "csi": {"driver": "s3.csi.aws.com", "volumeAttributes": {"b": "x"}}},
    ],
    "volumeMounts": [
        {"name": "imagenet", "mountPath": "/data", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "bucket", "mountPath": "/bucket", "subPath": "runs"},
    ],
    "imagePullSecrets": [{"name": "team-registry"}, {"name": "regcred"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {"team": "vision"}},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        },
    },
    "schedulerName": "volcano",
    "labels": {"team": "vision"},
    "annotations": {"cost-center": "ml-42"},
    "resources": {"gpus": 1, "extra": {"example.com/fpga": "1", "ephemeral-storage": "50Gi"}},
}
"""`spec.pod` of a run on a shared cluster: a dataset claim, a bucket, credentials, its own
registry, placement, an extended resource; every field a run adds to its pod."""
