"""The objects one `TolariaRun` owns, built as plain dicts: manifest ConfigMap, token Secret,
headless sidecar Service, NetworkPolicy and the pod of each attempt (R10.1, R10.5).

Called by the reconciler before it creates an attempt; pure, so every field is tested
without a cluster. One pod per attempt: the trainer container and the rollback sidecar
(native sidecar by default) share `/dev/shm`, the socket directory and the checkpoint
volume; the run token is mounted in the sidecar only. What `spec.pod` adds (environment,
volumes and mounts, extra resources, pull secrets, affinity, scheduler, labels, annotations)
goes to the trainer or the pod next to the operator's own parts, which the manifest model
keeps it from naming (`leyline.spec.kube.RESERVED_*`). A spec this module cannot turn into a
pod raises `ValueError`, which the reconciler turns into a failed run with the reason. Nothing
here talks to the API or reads the clock (the caller passes the creation time), and nothing
here imports kopf.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any

import yaml

from leyline.commands import (
    SIDECAR_MODULE,
    TRAINER_MODULE,
    SidecarCommand,
    TrainerCommand,
    python_module,
)
from leyline.lifecycle import INSTANCE_ENV, LINEAGE_ENV, RESUME_ALLOWED, RESUME_ENV
from leyline.quantity import format_quantity, parse_bytes
from leyline.shm import INSTANCE_PATTERN
from leyline.spec import SpecModel, TolariaRun
from leyline.spec.cluster import GPU_RESOURCE
from tolaria_operator.config import MiB, TolariaSettings
from tolaria_operator.control_tls import ServerCert
from tolaria_operator.resources import (
    ATTEMPT_LABEL,
    COUNTED_BEFORE_ANNOTATION,
    CREATED_AT_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    RESTARTS_BEFORE_ANNOTATION,
    RUN_LABEL,
    SIDECAR,
    TRAINER,
    RunObject,
    manifest_name,
    network_policy_name,
    owner_reference,
    pod_name,
    run_labels,
    service_name,
)

MANIFEST_DIR = "/etc/tolaria"
MANIFEST_FILE = "run.yaml"
MANIFEST_PATH = f"{MANIFEST_DIR}/{MANIFEST_FILE}"
SOCKET_DIR = "/run/tolaria"
SOCKET_PATH = f"{SOCKET_DIR}/sidecar.sock"
TOKEN_DIR = "/var/run/secrets/tolaria"  # noqa: S105 - a mount path, not a secret
TOKEN_KEY = "token"  # noqa: S105 - the Secret's key name
TLS_CERT_KEY = "tls.crt"
TLS_KEY_KEY = "tls.key"
TOKEN_PATH = f"{TOKEN_DIR}/{TOKEN_KEY}"
WORK_DIR = "/var/lib/tolaria/work"
CHECKPOINT_DIR = "/var/lib/tolaria/checkpoints"
SHM_DIR = "/dev/shm"  # noqa: S108 - the pod's own memory-backed emptyDir, not the host's
TMP_DIR = "/tmp"  # noqa: S108 - an emptyDir: the root filesystem is read-only
ATTEMPT_ENV = "TOLARIA_ATTEMPT"
_HOME = {"name": "HOME", "value": TMP_DIR}
"""The root filesystem is read-only: caches (torch inductor, triton, pip) go to /tmp."""
_INSTANCE = re.compile(INSTANCE_PATTERN)


def identity_env(run: RunObject, attempt: int) -> list[dict[str, Any]]:
    """The run instance both containers share (R13.1): the pod's own UID, so every attempt is
    a new instance with its own segments; the lineage is the TolariaRun's UID, so a recreated
    pod (attempt > 1) is asked to resume the run from its newest durable checkpoint, and never
    loads a checkpoint another TolariaRun left on a reused volume."""
    lineage = run.uid if _INSTANCE.fullmatch(run.uid) else ""
    env: list[dict[str, Any]] = [
        {"name": INSTANCE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": RESUME_ENV, "value": RESUME_ALLOWED if attempt > 1 else "0"},
    ]
    if lineage:
        env.append({"name": LINEAGE_ENV, "value": lineage})
    return env


def shm_size_bytes(run: TolariaRun, settings: TolariaSettings) -> int:
    """Size limit of `/dev/shm`: `spec.pod.shmSizeLimit` when set; else the slots' byte budget
    (`spec.snapshots.maxBytes`) plus a margin for the control block; else the default; never
    below the minimum. The operator cannot know the model's state size, the trainer can."""
    pods = settings.pods
    if run.spec.pod.shm_size_limit:
        return parse_bytes(run.spec.pod.shm_size_limit)
    if run.spec.snapshots.max_bytes > 0:
        wanted = run.spec.snapshots.max_bytes + pods.shm_margin_bytes
        wanted = -(-wanted // MiB) * MiB  # whole MiB, rounded up
    else:
        wanted = pods.default_shm_bytes
    return max(wanted, pods.min_shm_bytes)


def token_suffix() -> str:
    """The random part of a token Secret's name (8 hex digits)."""
    return secrets.token_hex(4)


def _metadata(run: RunObject, name: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.namespace,
        "labels": {**run_labels(run), **extra_labels},
        "ownerReferences": [owner_reference(run)],
    }


def run_manifest(run: RunObject, settings: TolariaSettings) -> str:
    """The manifest both containers read with `--manifest`: the run's validated spec, with
    `spec.telemetry.metricsAddress` opened to 0.0.0.0 so the trainer's metrics port can be
    scraped (the NetworkPolicy limits who may)."""
    doc = run.run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc.pop("status", None)
    doc["metadata"] = {"name": run.name, "namespace": run.namespace}
    doc["spec"]["telemetry"]["metricsAddress"] = "0.0.0.0"  # noqa: S104 - pod-internal bind
    doc["spec"]["telemetry"]["metricsPort"] = settings.pods.trainer_metrics_port
    return yaml.safe_dump(doc, sort_keys=False)


def manifest_config_map(run: RunObject, settings: TolariaSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, manifest_name(run.name)),
        "data": {MANIFEST_FILE: run_manifest(run, settings)},
    }


def token_secret(
    run: RunObject, name: str, token: str, tls: ServerCert | None = None
) -> dict[str, Any]:
    """The run token (R10.5) and the control port's certificate (`control_tls`) as the Secret
    one attempt's sidecar mounts. A new one per attempt, under a random name
    (`resources.token_name`): the operator creates it and never reads a Secret back, so it
    cannot know an existing one is its own. Each is owned by the run and goes with it; the
    token is the same in all of them (derived, `tokens.derive_token`), the certificate and its
    key are new for each attempt."""
    data = {TOKEN_KEY: token.encode("ascii")}
    if tls is not None:
        data[TLS_CERT_KEY] = tls.cert_pem
        data[TLS_KEY_KEY] = tls.key_pem
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(run, name),
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in data.items()},
    }


def _ports(settings: TolariaSettings) -> list[tuple[str, int]]:
    pods = settings.pods
    return [
        ("control", pods.control_port),
        ("sidecar-metrics", pods.sidecar_metrics_port),
        ("trainer-metrics", pods.trainer_metrics_port),
    ]


def sidecar_service(run: RunObject, settings: TolariaSettings) -> dict[str, Any]:
    """Headless Service of the sidecar's control port and both metrics ports. It publishes the
    pod while it is not ready: a crashing trainer makes the pod NotReady exactly when the
    operator must still reach the sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, service_name(run.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {RUN_LABEL: run.name},
            "ports": [
                {"name": name, "port": port, "targetPort": port, "protocol": "TCP"}
                for name, port in _ports(settings)
            ],
        },
    }


def network_policy(run: RunObject, settings: TolariaSettings) -> dict[str, Any]:
    """Ingress to the run's pod: the control port from the operator's pods only; the metrics
    ports from the run's namespace or the configured Prometheus. Everything else is denied."""
    net, pods = settings.network, settings.pods
    operator_peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(net.operator_pod_labels)}}
    operator_peer["namespaceSelector"] = (
        {"matchLabels": {"kubernetes.io/metadata.name": net.operator_namespace}}
        if net.operator_namespace
        else {}
    )
    metrics_peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(net.metrics_pod_labels)}}
    if net.metrics_namespace_labels:
        metrics_peer["namespaceSelector"] = {"matchLabels": dict(net.metrics_namespace_labels)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(run, network_policy_name(run.name)),
        "spec": {
            "podSelector": {"matchLabels": {RUN_LABEL: run.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [operator_peer],
                    "ports": [{"protocol": "TCP", "port": pods.control_port}],
                },
                {
                    "from": [metrics_peer],
                    "ports": [
                        {"protocol": "TCP", "port": pods.sidecar_metrics_port},
                        {"protocol": "TCP", "port": pods.trainer_metrics_port},
                    ],
                },
            ],
        },
    }


def kube_fragment(model: SpecModel) -> dict[str, Any]:
    """A `spec.pod` fragment as the PodSpec field it mirrors: camelCase, and without the
    fields left at their defaults (empty strings and lists, false), as Kubernetes writes it."""
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def pod_labels(run: RunObject, attempt: int) -> dict[str, str]:
    """The run's `spec.pod.labels`, then the operator's own, which win: run labels plus the
    attempt, Kueue's queue and the escalation group label."""
    labels = {
        **run.run.spec.pod.labels,
        **run_labels(run),
        ATTEMPT_LABEL: str(attempt),
    }
    queue = run.labels.get(KUEUE_QUEUE_LABEL)
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    group = run.run.spec.escalation.group_label
    if group and group in run.labels:
        labels[group] = run.labels[group]
    return labels


def _container_security() -> dict[str, Any]:
    return {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _trainer_resources(run: TolariaRun) -> dict[str, Any]:
    """Requests equal to limits (the trainer's pod is Guaranteed when the sidecar is too):
    cpu, memory, the GPUs, then `resources.extra` (extended resources must be equal anyway)."""
    res = run.spec.pod.resources
    amounts: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus > 0:
        amounts[GPU_RESOURCE] = str(res.gpus)
    amounts.update(res.extra)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _sidecar_resources(shm_bytes: int, settings: TolariaSettings) -> dict[str, Any]:
    memory = format_quantity(settings.pods.sidecar_memory_bytes + shm_bytes)
    amounts = {"cpu": settings.pods.sidecar_cpu, "memory": memory}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def trainer_image(run: RunObject, settings: TolariaSettings) -> str:
    """The run's `spec.pod.image`, else the operator's default: a cluster names its registry
    once, in the operator's settings, and runs need not repeat it."""
    return run.run.spec.pod.image or settings.images.trainer


def sidecar_image(run: RunObject, settings: TolariaSettings) -> str:
    """The run's `spec.pod.sidecarImage`, else the operator's default."""
    return run.run.spec.pod.sidecar_image or settings.images.sidecar


def pull_policy(run: RunObject, settings: TolariaSettings) -> str:
    """The run's `spec.pod.imagePullPolicy`, else the operator's default (both containers)."""
    return run.run.spec.pod.image_pull_policy or settings.images.pull_policy


def pull_secrets(run: RunObject, settings: TolariaSettings) -> list[str]:
    """The operator's pull secrets (a registry named cluster-wide), then the run's own
    `spec.pod.imagePullSecrets` (its private images): added, never replacing, once each."""
    names = [*settings.images.pull_secrets, *(r.name for r in run.run.spec.pod.image_pull_secrets)]
    return list(dict.fromkeys(names))


def trainer_container(run: RunObject, attempt: int, settings: TolariaSettings) -> dict[str, Any]:
    """The trainer: `python -m tolaria_trainer.worker ... --pod`, which reports its outcome in
    the termination message and exits 0 for every final outcome, so `restartPolicy:
    OnFailure` restarts only crashes, in place, with /dev/shm intact (R10.2). The run's own
    `env`, `envFrom` and `volumeMounts` follow the operator's (none may name one of ours)."""
    pod = run.run.spec.pod
    trainer: dict[str, Any] = {
        "name": TRAINER,
        "image": trainer_image(run, settings),
        "imagePullPolicy": pull_policy(run, settings),
        "command": python_module(TRAINER_MODULE),
        "args": TrainerCommand(
            manifest=MANIFEST_PATH,
            workdir=WORK_DIR,
            socket=SOCKET_PATH,
            attempt=attempt,
            log_format="json",
            metrics_port=settings.pods.trainer_metrics_port,
            pod=True,
        ).args(),
        "env": [
            {"name": ATTEMPT_ENV, "value": str(attempt)},
            _HOME,
            *identity_env(run, attempt),
            *(kube_fragment(e) for e in pod.env),
        ],
        "ports": [
            {
                "name": "trainer-metrics",
                "containerPort": settings.pods.trainer_metrics_port,
                "protocol": "TCP",
            }
        ],
        "resources": _trainer_resources(run.run),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "dshm", "mountPath": SHM_DIR},
            {"name": "socket", "mountPath": SOCKET_DIR},
            {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
            {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": TMP_DIR},
            *(kube_fragment(m) for m in pod.volume_mounts),
        ],
    }
    if pod.env_from:
        trainer["envFrom"] = [kube_fragment(e) for e in pod.env_from]
    return trainer


def sidecar_container(
    run: RunObject, shm_bytes: int, settings: TolariaSettings, *, native: bool, attempt: int = 1
) -> dict[str, Any]:
    """The rollback/emergency sidecar; as a native sidecar (`restartPolicy: Always` in
    `initContainers`) its TCP startup probe holds the trainer back until it serves."""
    pods = settings.pods
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": sidecar_image(run, settings),
        "imagePullPolicy": pull_policy(run, settings),
        "command": python_module(SIDECAR_MODULE),
        "args": SidecarCommand(
            manifest=MANIFEST_PATH,
            socket=SOCKET_PATH,
            run_id=run.name,
            control_address=f"0.0.0.0:{pods.control_port}",
            token_file=TOKEN_PATH,
            tls_cert=f"{TOKEN_DIR}/{TLS_CERT_KEY}",
            tls_key=f"{TOKEN_DIR}/{TLS_KEY_KEY}",
            metrics_port=pods.sidecar_metrics_port,
            # scraped through the Service; the NetworkPolicy limits who
            metrics_address="0.0.0.0",  # noqa: S104
            checkpoint_dir=CHECKPOINT_DIR,
        ).args(),
        "env": [_HOME, *identity_env(run, attempt)],
        "ports": [
            {"name": "control", "containerPort": pods.control_port, "protocol": "TCP"},
            {
                "name": "sidecar-metrics",
                "containerPort": pods.sidecar_metrics_port,
                "protocol": "TCP",
            },
        ],
        "resources": _sidecar_resources(shm_bytes, settings),
        "startupProbe": {
            "tcpSocket": {"port": pods.control_port},
            "periodSeconds": pods.startup_probe_period_seconds,
            "failureThreshold": pods.startup_probe_failure_threshold,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "dshm", "mountPath": SHM_DIR},
            {"name": "socket", "mountPath": SOCKET_DIR},
            {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
            {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
        ],
    }
    if native:
        container["restartPolicy"] = "Always"
    return container


def _volumes(run: RunObject, shm_bytes: int, token_secret: str) -> list[dict[str, Any]]:
    volume = run.run.spec.pod.checkpoint_volume
    checkpoints: dict[str, Any] = (
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": volume.claim_name}}
        if volume.claim_name
        else {"name": "checkpoints", "emptyDir": {"sizeLimit": volume.size_limit}}
    )
    return [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": format_quantity(shm_bytes)}},
        checkpoints,
        {"name": "socket", "emptyDir": {}},
        {"name": "manifest", "configMap": {"name": manifest_name(run.name)}},
        {
            "name": "token",
            "secret": {"secretName": token_secret, "defaultMode": 0o440},
        },
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *(kube_fragment(v) for v in run.run.spec.pod.volumes),
    ]


def attempt_pod(
    run: RunObject,
    attempt: int,
    settings: TolariaSettings,
    *,
    restarts_before: int,
    counted_before: int,
    created_at: str,
    token_secret: str,
) -> dict[str, Any]:
    """The pod of attempt `attempt`, named `<run>-a<attempt>`, mounting the Secret
    `token_secret` (the one the reconciler just created for it) in the sidecar.

    `restarts_before`/`counted_before` are the run's counters before this attempt; they ride
    on the pod as annotations so the counters can be recomputed from the pod alone.
    """
    spec = run.run.spec.pod
    shm = shm_size_bytes(run.run, settings)
    uid = settings.pods.run_as_user
    native = settings.pods.native_sidecar
    sidecar = sidecar_container(run, shm, settings, native=native, attempt=attempt)
    trainer = trainer_container(run, attempt, settings)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "terminationGracePeriodSeconds": settings.pods.termination_grace_period_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [sidecar] if native else [],
        "containers": [trainer] if native else [sidecar, trainer],
        "volumes": _volumes(run, shm, token_secret),
    }
    if not native:
        del pod_spec["initContainers"]
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=False)
            for t in spec.tolerations
        ]
        for toleration in pod_spec["tolerations"]:
            for key in ("key", "value", "effect"):
                if toleration.get(key) == "":
                    del toleration[key]
    secrets = pull_secrets(run, settings)
    if secrets:
        # private registries' credentials: Secrets of the run's namespace
        pod_spec["imagePullSecrets"] = [{"name": n} for n in secrets]
    if spec.affinity is not None:
        pod_spec["affinity"] = kube_fragment(spec.affinity)
    if spec.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduler_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    meta = _metadata(run, pod_name(run.name, attempt))
    meta["labels"] = pod_labels(run, attempt)
    meta["annotations"] = {
        **spec.annotations,
        RESTARTS_BEFORE_ANNOTATION: str(restarts_before),
        COUNTED_BEFORE_ANNOTATION: str(counted_before),
        CREATED_AT_ANNOTATION: created_at,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def owned_objects(run: RunObject, settings: TolariaSettings) -> list[dict[str, Any]]:
    """The run's long-lived objects under fixed names (the token Secrets have random ones), in
    creation order."""
    return [
        manifest_config_map(run, settings),
        sidecar_service(run, settings),
        network_policy(run, settings),
    ]
