"""Spec -> objects: the pod of an attempt, its Service, NetworkPolicy, manifest and token
(R10.1, R10.5)."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest
import yaml

from leyline.spec import validate_manifest
from leyline.spec.kube import (
    RESERVED_ANNOTATION_PREFIXES,
    RESERVED_ENV,
    RESERVED_ENV_PREFIX,
    RESERVED_LABEL_PREFIXES,
    RESERVED_LABELS,
    RESERVED_PATHS,
    RESERVED_VOLUMES,
)
from tests.operator.builders import SHARED_POD, new_pod, run_object
from tolaria_operator.config import (
    GiB,
    ImageSettings,
    MiB,
    NetworkSettings,
    PodSettings,
    TolariaSettings,
)
from tolaria_operator.control_tls import ControlCA
from tolaria_operator.pods import (
    manifest_config_map,
    network_policy,
    shm_size_bytes,
    sidecar_service,
    token_secret,
    token_suffix,
)
from tolaria_operator.resources import owner_reference


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        if container["name"] == name:
            return container
    raise AssertionError(f"no container {name}")


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def _arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    return str(args[args.index(flag) + 1])


@pytest.mark.req("R10.1")
def test_the_trainer_runs_the_worker_in_pod_mode_with_its_attempt() -> None:
    pod = new_pod(run_object(), 3)
    trainer = _container(pod, "trainer")
    assert trainer["command"] == ["python", "-m", "tolaria_trainer.worker"]
    assert _arg(trainer, "--manifest") == "/etc/tolaria/run.yaml"
    assert _arg(trainer, "--workdir") == "/var/lib/tolaria/work"
    assert _arg(trainer, "--socket") == "/run/tolaria/sidecar.sock"
    assert _arg(trainer, "--attempt") == "3"
    assert _arg(trainer, "--log-format") == "json"
    assert _arg(trainer, "--metrics-port") == "9401"
    assert trainer["args"][-1] == "--pod"
    assert {"name": "TOLARIA_ATTEMPT", "value": "3"} in trainer["env"]
    assert {"name": "HOME", "value": "/tmp"} in trainer["env"]  # read-only root: caches in /tmp
    assert trainer["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert trainer["image"] == "ghcr.io/tolaria/trainer:0.1.0"


@pytest.mark.req("R10.1")
def test_the_sidecar_is_a_native_sidecar_the_trainer_waits_for() -> None:
    pod = new_pod(run_object(), 1)
    [sidecar] = pod["spec"]["initContainers"]
    assert sidecar["name"] == "sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["tcpSocket"] == {"port": 7070}
    assert sidecar["command"] == ["python", "-m", "tolaria_sidecar"]
    assert _arg(sidecar, "--run-id") == "r1"
    assert _arg(sidecar, "--control-address") == "0.0.0.0:7070"
    assert _arg(sidecar, "--token-file") == "/var/run/secrets/tolaria/token"
    assert _arg(sidecar, "--tls-cert") == "/var/run/secrets/tolaria/tls.crt"
    assert _arg(sidecar, "--tls-key") == "/var/run/secrets/tolaria/tls.key"
    assert _arg(sidecar, "--metrics-port") == "9402"
    assert _arg(sidecar, "--metrics-address") == "0.0.0.0"
    assert _arg(sidecar, "--checkpoint-dir") == "/var/lib/tolaria/checkpoints"
    assert _arg(sidecar, "--socket") == "/run/tolaria/sidecar.sock"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer"]


@pytest.mark.req("R10.1")
def test_older_clusters_get_the_sidecar_as_a_plain_container() -> None:
    settings = replace(TolariaSettings(), pods=PodSettings(native_sidecar=False))
    pod = new_pod(run_object(), 1, settings)
    assert "initContainers" not in pod["spec"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["sidecar", "trainer"]
    assert "restartPolicy" not in _container(pod, "sidecar")


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "4Gi"),
        ({"pod": {"shmSizeLimit": "6Gi"}}, "6Gi"),
        ({"snapshots": {"maxBytes": 3 * GiB}}, "3136Mi"),
        ({"snapshots": {"maxBytes": 10 * MiB}}, "1Gi"),
    ],
)
def test_dev_shm_is_a_memory_emptydir_with_a_size_limit_in_both_containers(
    spec: dict[str, Any], expected: str
) -> None:
    pod = new_pod(run_object(spec=spec), 1)
    assert _volumes(pod)["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": expected}
    for name in ("trainer", "sidecar"):
        assert _mounts(_container(pod, name))["/dev/shm"] == "dshm"


@pytest.mark.req("R10.1")
def test_the_sidecar_memory_covers_the_slots_it_prefaults() -> None:
    run = run_object(spec={"pod": {"shmSizeLimit": "2Gi"}})
    sidecar = _container(new_pod(run, 1), "sidecar")
    assert sidecar["resources"]["limits"]["memory"] == "2560Mi"
    assert sidecar["resources"]["requests"] == sidecar["resources"]["limits"]
    assert shm_size_bytes(run.run, TolariaSettings()) == 2 * GiB


@pytest.mark.req("R10.1")
def test_the_checkpoint_volume_is_the_claim_or_a_sized_emptydir_in_both_containers() -> None:
    claimed = new_pod(run_object(spec={"pod": {"checkpointVolume": {"claimName": "ckpts"}}}), 1)
    assert _volumes(claimed)["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpts"}
    scratch = new_pod(run_object(spec={"pod": {"checkpointVolume": {"sizeLimit": "50Gi"}}}), 1)
    assert _volumes(scratch)["checkpoints"]["emptyDir"] == {"sizeLimit": "50Gi"}
    for name in ("trainer", "sidecar"):
        mounts = _mounts(_container(claimed, name))
        assert mounts["/var/lib/tolaria/checkpoints"] == "checkpoints"
        assert mounts["/run/tolaria"] == "socket"
        assert mounts["/etc/tolaria"] == "manifest"
        assert mounts["/tmp"] == "tmp"
    assert _mounts(_container(claimed, "trainer"))["/var/lib/tolaria/work"] == "work"
    assert _volumes(claimed)["manifest"]["configMap"] == {"name": "r1-manifest"}


@pytest.mark.req("R10.5")
def test_the_run_token_is_mounted_in_the_sidecar_only() -> None:
    pod = new_pod(run_object(), 1)
    assert _volumes(pod)["token"]["secret"]["secretName"] == "r1-a1-token-0a1b2c3d"
    assert _mounts(_container(pod, "sidecar"))["/var/run/secrets/tolaria"] == "token"
    assert "token" not in _mounts(_container(pod, "trainer")).values()
    assert pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.req("R10.5")
def test_the_pod_runs_restricted() -> None:
    pod = new_pod(run_object(), 1)
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (10001,) * 3
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for name in ("trainer", "sidecar"):
        container = _container(pod, name)["securityContext"]
        assert container["readOnlyRootFilesystem"] is True
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.req("R10.1")
def test_gpus_are_requested_with_limit_equal_to_request() -> None:
    gpu = _container(
        new_pod(
            run_object(spec={"pod": {"resources": {"gpus": 4, "cpu": "8", "memory": "64Gi"}}}), 1
        ),
        "trainer",
    )
    assert gpu["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert gpu["resources"]["requests"] == gpu["resources"]["limits"]
    cpu = _container(new_pod(run_object(), 1), "trainer")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


@pytest.mark.req("R10.1")
def test_labels_name_the_run_the_attempt_the_kueue_queue_and_the_group() -> None:
    run = run_object(
        labels={"kueue.x-k8s.io/queue-name": "team-a", "tolaria.dev/group": "g1", "unrelated": "x"},
        spec={"escalation": {"scope": "group", "groupLabel": "tolaria.dev/group"}},
    )
    labels = new_pod(run, 2)["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "tolaria",
        "app.kubernetes.io/component": "run",
        "app.kubernetes.io/managed-by": "tolaria-operator",
        "tolaria.dev/run": "r1",
        "tolaria.dev/attempt": "2",
        "kueue.x-k8s.io/queue-name": "team-a",
        "tolaria.dev/group": "g1",
    }


@pytest.mark.req("R10.1")
def test_every_owned_object_has_the_run_as_its_controller() -> None:
    run = run_object()
    settings = TolariaSettings()
    ref = owner_reference(run)
    assert ref == {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "name": "r1",
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for obj in (
        new_pod(run, 1),
        sidecar_service(run, settings),
        network_policy(run, settings),
        manifest_config_map(run, settings),
        token_secret(run, "r1-a1-token-0a1b2c3d", "t"),
    ):
        assert obj["metadata"]["ownerReferences"] == [ref]
        assert obj["metadata"]["namespace"] == "default"


@pytest.mark.req("R10.2")
def test_a_crashed_trainer_restarts_in_place_and_the_pod_carries_its_counters() -> None:
    pod = new_pod(run_object(), 2, restarts_before=3, counted_before=1)
    assert pod["metadata"]["name"] == "r1-a2"
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 60
    annotations = pod["metadata"]["annotations"]
    assert annotations["tolaria.dev/restarts-before"] == "3"
    assert annotations["tolaria.dev/restarts-counted-before"] == "1"
    assert annotations["tolaria.dev/attempt-created-at"].endswith("Z")


@pytest.mark.req("R10.1")
def test_scheduling_fields_come_from_spec_pod() -> None:
    run = run_object(
        spec={
            "pod": {
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training",
                "serviceAccountName": "trainer",
                "imagePullPolicy": "Always",
            }
        }
    )
    spec = new_pod(run, 1)["spec"]
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "training"
    assert spec["serviceAccountName"] == "trainer"
    assert {c["imagePullPolicy"] for c in [*spec["initContainers"], *spec["containers"]]} == {
        "Always"
    }


REGISTRY = ImageSettings(
    trainer="reg.example/ml/trainer:1.2",
    sidecar="reg.example/ml/sidecar:1.2",
    pull_policy="Always",
    pull_secrets=("regcred",),
)


def _images(pod: dict[str, Any]) -> dict[str, tuple[str, str]]:
    spec = pod["spec"]
    return {
        c["name"]: (c["image"], c["imagePullPolicy"])
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    }


@pytest.mark.req("R10.1")
def test_a_run_naming_no_image_gets_the_operators_default_images() -> None:
    pod = new_pod(run_object(), 1, settings=replace(TolariaSettings(), images=REGISTRY))
    assert _images(pod) == {
        "trainer": ("reg.example/ml/trainer:1.2", "Always"),
        "sidecar": ("reg.example/ml/sidecar:1.2", "Always"),
    }


@pytest.mark.req("R10.1")
def test_the_images_a_run_names_win_over_the_operators_defaults() -> None:
    run = run_object(
        spec={
            "pod": {
                "image": "mine/trainer:dev",
                "sidecarImage": "mine/sidecar:dev",
                "imagePullPolicy": "Never",
            }
        }
    )
    pod = new_pod(run, 1, settings=replace(TolariaSettings(), images=REGISTRY))
    assert _images(pod) == {
        "trainer": ("mine/trainer:dev", "Never"),
        "sidecar": ("mine/sidecar:dev", "Never"),
    }


def test_without_settings_a_run_gets_the_released_images() -> None:
    assert _images(new_pod(run_object(), 1)) == {
        "trainer": ("ghcr.io/tolaria/trainer:0.1.0", "IfNotPresent"),
        "sidecar": ("ghcr.io/tolaria/sidecar:0.1.0", "IfNotPresent"),
    }


def test_the_operators_pull_secrets_are_on_every_run_pod() -> None:
    pod = new_pod(run_object(), 1, settings=replace(TolariaSettings(), images=REGISTRY))
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" not in new_pod(run_object(), 1)["spec"]


@pytest.mark.req("R10.1")
def test_the_manifest_config_map_holds_a_manifest_both_containers_accept() -> None:
    run = run_object(spec={"training": {"epochs": 3}, "suspend": False})
    data = manifest_config_map(run, TolariaSettings())["data"]["run.yaml"]
    doc = yaml.safe_load(data)
    assert doc["metadata"] == {"name": "r1", "namespace": "default"}
    assert "status" not in doc
    parsed = validate_manifest(doc)
    assert parsed.spec.training.epochs == 3
    assert parsed.spec.telemetry.metrics_address == "0.0.0.0"
    assert parsed.spec.telemetry.metrics_port == 9401


@pytest.mark.req("R10.1")
def test_the_service_is_headless_and_keeps_a_not_ready_pod_reachable() -> None:
    svc = sidecar_service(run_object(), TolariaSettings())
    assert svc["metadata"]["name"] == "r1-sidecar"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"tolaria.dev/run": "r1"}
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {
        ("control", 7070),
        ("sidecar-metrics", 9402),
        ("trainer-metrics", 9401),
    }


@pytest.mark.req("R10.5")
def test_only_the_operator_reaches_the_control_port() -> None:
    settings = replace(
        TolariaSettings(),
        network=NetworkSettings(
            operator_namespace="tolaria-system", metrics_namespace_labels={"team": "obs"}
        ),
    )
    policy = network_policy(run_object(), settings)["spec"]
    assert policy["podSelector"] == {"matchLabels": {"tolaria.dev/run": "r1"}}
    assert policy["policyTypes"] == ["Ingress"]
    control, metrics = policy["ingress"]
    assert control["ports"] == [{"protocol": "TCP", "port": 7070}]
    assert control["from"] == [
        {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "tolaria-operator"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tolaria-system"}},
        }
    ]
    assert {p["port"] for p in metrics["ports"]} == {9401, 9402}
    assert metrics["from"] == [
        {"podSelector": {"matchLabels": {}}, "namespaceSelector": {"matchLabels": {"team": "obs"}}}
    ]


@pytest.mark.req("R10.5")
def test_metrics_are_open_to_the_run_namespace_by_default() -> None:
    _, metrics = network_policy(run_object(), TolariaSettings())["spec"]["ingress"]
    assert metrics["from"] == [{"podSelector": {"matchLabels": {}}}]


@pytest.mark.req("R10.5")
def test_each_token_secret_gets_a_random_name_and_holds_the_token_it_is_given() -> None:
    """The operator never reads a Secret back, so it never reuses a name: one that exists
    could be anybody's."""
    assert token_suffix() != token_suffix()
    secret = token_secret(run_object(), "r1-a2-token-0a1b2c3d", "t0ken")
    assert secret["metadata"]["name"] == "r1-a2-token-0a1b2c3d"
    assert base64.b64decode(secret["data"]["token"]) == b"t0ken"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == run_object().uid


def test_the_token_secret_carries_the_attempts_control_certificate_and_key() -> None:
    """The sidecar mounts the Secret and serves TLS with them (`--tls-cert`, `--tls-key`)."""
    issued = ControlCA(b"k" * 32).issue("default", "r1")
    secret = token_secret(run_object(), "r1-a1-token-0a1b2c3d", "t0ken", issued)
    assert base64.b64decode(secret["data"]["tls.crt"]) == issued.cert_pem
    assert base64.b64decode(secret["data"]["tls.key"]) == issued.key_pem


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(("version", "native"), [("1.29", True), ("1.33", True), ("1.27", False)])
def test_every_object_passes_the_kubernetes_schema(version: str, native: bool) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    settings = replace(TolariaSettings(), pods=PodSettings(native_sidecar=native))
    run = run_object(
        spec={
            "pod": {
                "resources": {"gpus": 2},
                "tolerations": [
                    {
                        "key": "gpu",
                        "operator": "Exists",
                        "effect": "NoExecute",
                        "tolerationSeconds": 30,
                    }
                ],
                "checkpointVolume": {"claimName": "ckpts"},
                "nodeSelector": {"pool": "gpu"},
            }
        }
    )
    for obj in (
        new_pod(run, 1, settings),
        sidecar_service(run, settings),
        network_policy(run, settings),
        manifest_config_map(run, settings),
        token_secret(run, "r1-a1-token-0a1b2c3d", "t0ken"),
    ):
        kubernetes_validate.validate(obj, version, strict=True)


def _shared_pod(settings: TolariaSettings | None = None) -> dict[str, Any]:
    return new_pod(run_object(spec={"pod": SHARED_POD}), 1, settings)


@pytest.mark.req("R10.1")
def test_the_trainer_gets_the_runs_env_after_the_operators() -> None:
    trainer = _container(_shared_pod(), "trainer")
    names = [e["name"] for e in trainer["env"]]
    assert names[:2] == ["TOLARIA_ATTEMPT", "HOME"]
    assert names[-2:] == ["DATA_DIR", "WANDB_API_KEY"]
    assert trainer["env"][-1] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}},
    }
    assert trainer["envFrom"] == [{"configMapRef": {"name": "hyper"}, "prefix": "HP_"}]
    sidecar = _container(_shared_pod(), "sidecar")
    assert "DATA_DIR" not in [e["name"] for e in sidecar["env"]] and "envFrom" not in sidecar


@pytest.mark.req("R10.1")
def test_datasets_are_extra_volumes_mounted_in_the_trainer_only() -> None:
    pod = _shared_pod()
    volumes = _volumes(pod)
    assert volumes["imagenet"] == {
        "name": "imagenet",
        "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": True},
    }
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}
    assert volumes["bucket"]["csi"] == {"driver": "s3.csi.aws.com", "volumeAttributes": {"b": "x"}}
    trainer = _container(pod, "trainer")
    assert {"name": "imagenet", "mountPath": "/data", "readOnly": True} in trainer["volumeMounts"]
    assert {"name": "bucket", "mountPath": "/bucket", "subPath": "runs"} in trainer["volumeMounts"]
    assert _mounts(trainer)["/dev/shm"] == "dshm"  # the operator's stay
    assert "/data" not in _mounts(_container(pod, "sidecar"))


@pytest.mark.req("R10.1")
def test_a_runs_pull_secrets_are_added_to_the_operators_once_each() -> None:
    pod = _shared_pod(replace(TolariaSettings(), images=REGISTRY))
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team-registry"}]
    alone = _shared_pod()
    assert alone["spec"]["imagePullSecrets"] == [{"name": "team-registry"}, {"name": "regcred"}]


@pytest.mark.req("R10.1")
def test_affinity_and_the_scheduler_go_to_the_pod_as_written() -> None:
    spec = _shared_pod()["spec"]
    assert spec["schedulerName"] == "volcano"
    assert spec["affinity"] == SHARED_POD["affinity"]
    plain = new_pod(run_object(), 1)["spec"]
    assert "affinity" not in plain and "schedulerName" not in plain


@pytest.mark.req("R10.1")
def test_the_runs_labels_and_annotations_sit_beside_the_operators() -> None:
    meta = _shared_pod()["metadata"]
    assert meta["labels"]["team"] == "vision"
    assert meta["labels"]["tolaria.dev/run"] == "r1"
    assert meta["annotations"]["cost-center"] == "ml-42"
    assert meta["annotations"]["tolaria.dev/restarts-before"] == "0"


@pytest.mark.req("R10.1")
def test_extra_resources_are_requested_and_limited_like_the_others() -> None:
    trainer = _container(_shared_pod(), "trainer")
    assert trainer["resources"]["limits"] == {
        "cpu": "2",
        "memory": "8Gi",
        "nvidia.com/gpu": "1",
        "example.com/fpga": "1",
        "ephemeral-storage": "50Gi",
    }
    assert trainer["resources"]["requests"] == trainer["resources"]["limits"]


def test_the_reserved_names_are_exactly_what_the_operator_puts_in_the_pod() -> None:
    """The manifest model refuses `leyline.spec.kube.RESERVED_*`; this pins them to the pod the
    operator builds, so a new volume, path, variable, label or annotation of the operator's
    cannot go unreserved."""
    pod = new_pod(
        run_object(
            labels={"kueue.x-k8s.io/queue-name": "q"},
            spec={"pod": {"resources": {"gpus": 1}}},
        ),
        2,
    )
    spec, meta = pod["spec"], pod["metadata"]
    containers = [*spec["initContainers"], *spec["containers"]]
    assert {v["name"] for v in spec["volumes"]} == set(RESERVED_VOLUMES)
    paths = {m["mountPath"] for c in containers for m in c["volumeMounts"]}
    paths |= {c["terminationMessagePath"] for c in containers if "terminationMessagePath" in c}
    assert all(any(p == r or p.startswith(r + "/") for r in RESERVED_PATHS) for p in paths)
    assert all(any(p == r or p.startswith(r + "/") for p in paths) for r in RESERVED_PATHS)
    env = {e["name"] for c in containers for e in c["env"]}
    assert all(n.startswith(RESERVED_ENV_PREFIX) or n in RESERVED_ENV for n in env)
    assert all(
        k in RESERVED_LABELS or k.startswith(RESERVED_LABEL_PREFIXES) for k in meta["labels"]
    )
    assert all(k.startswith(RESERVED_ANNOTATION_PREFIXES) for k in meta["annotations"])


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_a_pod_with_every_run_field_passes_the_kubernetes_schema(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod = _shared_pod(replace(TolariaSettings(), images=REGISTRY))
    kubernetes_validate.validate(pod, version, strict=True)
