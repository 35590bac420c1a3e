"""`spec.pod` on a shared cluster: the fields a run's pod takes from its manifest, and the
refusals that keep a manifest from making a pod the API server would refuse, or one that would
quietly break the operator's parts of it (R10.1). Each refusal names the field as the API
server does (`tests/k8s` checks the same manifests against it)."""

from __future__ import annotations

from typing import Any

import pytest

from leyline.spec import ManifestInvalid, validate_manifest
from leyline.spec.kube import RESERVED_PATHS, RESERVED_VOLUMES

DATASET = {"name": "imagenet", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": True}}


def manifest(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": "unit"},
        "spec": {"training": {"task": "synthetic-mlp"}, "pod": pod},
    }


def refusal(pod: dict[str, Any]) -> list[str]:
    """The `path: rule` lines a manifest with this `spec.pod` is refused with."""
    with pytest.raises(ManifestInvalid) as info:
        validate_manifest(manifest(pod))
    return [str(e) for e in info.value.errors]


def fields(pod: dict[str, Any]) -> set[str]:
    return {line.split(": ", 1)[0] for line in refusal(pod)}


def accepted(pod: dict[str, Any]) -> Any:
    return validate_manifest(manifest(pod)).spec.pod


@pytest.mark.req("R10.1")
def test_a_run_takes_env_volumes_pull_secrets_affinity_scheduler_labels_and_annotations() -> None:
    pod = accepted(
        {
            "env": [
                {"name": "DATA_DIR", "value": "/data"},
                {
                    "name": "WANDB_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "wb", "key": "k"}},
                },
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
            "envFrom": [{"configMapRef": {"name": "hyper"}, "prefix": "HP_"}],
            "volumes": [DATASET, {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}],
            "volumeMounts": [
                {"name": "imagenet", "mountPath": "/data", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
            "imagePullSecrets": [{"name": "team-registry"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "gpu", "operator": "In", "values": ["a100"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "schedulerName": "volcano",
            "labels": {"team": "vision"},
            "annotations": {"cost-center": "ml-42"},
            "resources": {"extra": {"example.com/fpga": "1", "ephemeral-storage": "50Gi"}},
        }
    )
    assert [e.name for e in pod.env] == ["DATA_DIR", "WANDB_API_KEY", "NODE"]
    assert [v.name for v in pod.volumes] == ["imagenet", "scratch"]
    assert pod.scheduler_name == "volcano"
    assert pod.resources.extra == {"example.com/fpga": "1", "ephemeral-storage": "50Gi"}


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("toleration", "field", "rule"),
    [
        (
            {"key": "gpu", "operator": "Exists", "value": "yes"},
            "spec.pod.tolerations[0].value",
            "must be empty when operator is Exists",
        ),
        (
            {"operator": "Equal", "value": "yes"},
            "spec.pod.tolerations[0].operator",
            "must be Exists when key is empty",
        ),
        (
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30},
            "spec.pod.tolerations[0].tolerationSeconds",
            "may only be set when effect is NoExecute",
        ),
        ({"key": "bad key", "operator": "Exists"}, "spec.pod.tolerations[0].key", "must match"),
    ],
    ids=["exists-with-a-value", "empty-key-with-equal", "seconds-without-noexecute", "bad-key"],
)
def test_a_toleration_the_api_server_would_refuse_is_refused(
    toleration: dict[str, Any], field: str, rule: str
) -> None:
    [line] = refusal({"tolerations": [toleration]})
    assert line.startswith(f"{field}: {rule}")


def test_a_toleration_of_every_taint_is_an_empty_key_with_exists() -> None:
    assert accepted({"tolerations": [{"operator": "Exists"}]}).tolerations[0].key == ""


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("size", ["100m", "0", "0Gi", "0.0"])
def test_a_shm_size_that_is_no_byte_size_is_refused(size: str) -> None:
    assert fields({"shmSizeLimit": size}) == {"spec.pod.shmSizeLimit"}


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("name", ["TOLARIA_ATTEMPT", "TOLARIA_SHM_DIR", "HOME"])
def test_env_may_not_name_a_variable_the_operator_sets(name: str) -> None:
    assert fields({"env": [{"name": name, "value": "x"}]}) == {"spec.pod.env[0].name"}


@pytest.mark.req("R10.1")
def test_env_names_are_unique_and_value_excludes_value_from() -> None:
    twice = [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
    assert fields({"env": twice}) == {"spec.pod.env"}
    both = {"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert fields({"env": [both]}) == {"spec.pod.env[0].valueFrom"}
    none = {"name": "A", "valueFrom": {}}
    assert fields({"env": [none]}) == {"spec.pod.env[0].valueFrom.configMapKeyRef"}


@pytest.mark.req("R10.1")
def test_env_from_takes_one_source_and_no_operator_prefix() -> None:
    assert fields({"envFrom": [{"secretRef": {"name": "s"}, "prefix": "TOLARIA_"}]}) == {
        "spec.pod.envFrom[0].prefix"
    }
    two = {"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}
    assert fields({"envFrom": [two]}) == {"spec.pod.envFrom[0].configMapRef"}


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("name", RESERVED_VOLUMES)
def test_a_volume_may_not_take_the_name_of_one_of_the_operators(name: str) -> None:
    volume = {"name": name, "emptyDir": {}}
    assert fields({"volumes": [volume]}) == {"spec.pod.volumes[0].name"}


@pytest.mark.req("R10.1")
def test_a_volume_has_exactly_one_source_and_a_unique_name() -> None:
    assert fields({"volumes": [{"name": "v"}]}) == {"spec.pod.volumes[0].name"}
    both = {"name": "v", "emptyDir": {}, "nfs": {"server": "nfs.lan", "path": "/x"}}
    assert fields({"volumes": [both]}) == {"spec.pod.volumes[0].name"}
    assert fields({"volumes": [DATASET, DATASET]}) == {"spec.pod.volumes"}


def test_a_host_path_volume_is_not_offered() -> None:
    volume = {"name": "host", "hostPath": {"path": "/"}}
    assert "spec.pod.volumes[0].hostPath: unknown field" in refusal({"volumes": [volume]})


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    "path",
    [*RESERVED_PATHS, "/dev/shm/slots", "/var/lib/tolaria/work/x", "/", "/dev", "/var", "/run"],
)
def test_a_mount_may_not_be_at_inside_or_above_a_path_the_operator_mounts(path: str) -> None:
    mount = {"name": "imagenet", "mountPath": path}
    assert fields({"volumes": [DATASET], "volumeMounts": [mount]}) == {
        "spec.pod.volumeMounts[0].mountPath"
    }


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("path", ["data", "/data/", "/data//x", "/data/../dev/shm", "/./dev/shm"])
def test_a_mount_path_is_absolute_and_normal(path: str) -> None:
    mount = {"name": "imagenet", "mountPath": path}
    assert fields({"volumes": [DATASET], "volumeMounts": [mount]}) == {
        "spec.pod.volumeMounts[0].mountPath"
    }


def test_paths_beside_the_operators_are_free() -> None:
    for path in ("/data", "/var/lib/data", "/dev/shmx", "/tmpdata", "/etc/ssl/certs/mine"):
        mount = {"name": "imagenet", "mountPath": path}
        assert accepted({"volumes": [DATASET], "volumeMounts": [mount]}).volume_mounts


@pytest.mark.req("R10.1")
def test_a_mount_names_a_volume_of_the_run_and_a_path_once() -> None:
    assert fields({"volumeMounts": [{"name": "nowhere", "mountPath": "/data"}]}) == {
        "spec.pod.volumeMounts"
    }
    twice = [{"name": "imagenet", "mountPath": "/data"}] * 2
    assert fields({"volumes": [DATASET], "volumeMounts": twice}) == {"spec.pod.volumeMounts"}
    escape = {"name": "imagenet", "mountPath": "/data", "subPath": "a/../../etc"}
    assert fields({"volumes": [DATASET], "volumeMounts": [escape]}) == {
        "spec.pod.volumeMounts[0].subPath"
    }


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    "key",
    [
        "tolaria.dev/run",
        "tolaria.dev/anything",
        "app.kubernetes.io/managed-by",
        "kueue.x-k8s.io/queue-name",
    ],
)
def test_pod_labels_may_not_take_the_operators_keys(key: str) -> None:
    assert fields({"labels": {key: "x"}}) == {"spec.pod.labels"}


def test_pod_labels_and_annotations_have_label_keys_and_labels_label_values() -> None:
    assert fields({"labels": {"bad key": "x"}}) == {"spec.pod.labels"}
    assert fields({"labels": {"team": "not a value"}}) == {"spec.pod.labels.team"}
    assert fields({"annotations": {"tolaria.dev/attempt-created-at": "x"}}) == {
        "spec.pod.annotations"
    }
    assert accepted({"annotations": {"example.com/notes": "any text, at all"}}).annotations


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("extra", "gpus"),
    [
        ({"example.com/fpga": "0.5"}, 0),  # a fraction of an extended resource
        ({"example.com/fpga": "500m"}, 0),
        ({"cpu": "2"}, 0),  # has its own field
        ({"memory": "2Gi"}, 0),
        ({"kubernetes.io/something": "1"}, 0),
        ({"requests.example.com/fpga": "1"}, 0),
        ({"ephemeral-storage": "100m"}, 0),
        ({"nvidia.com/gpu": "2"}, 2),  # twice: gpus and extra
    ],
)
def test_extra_resources_are_whole_extended_resources_or_byte_sizes(
    extra: dict[str, str], gpus: int
) -> None:
    assert fields({"resources": {"extra": extra, "gpus": gpus}}) == {"spec.pod.resources.extra"}


def test_extended_resources_huge_pages_and_ephemeral_storage_are_accepted() -> None:
    extra = {"nvidia.com/mig-1g.10gb": "2", "hugepages-2Mi": "1Gi", "ephemeral-storage": "20Gi"}
    assert accepted({"resources": {"extra": extra}}).resources.extra == extra


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("requirement", "ok"),
    [
        ({"key": "zone", "operator": "In", "values": ["a"]}, True),
        ({"key": "zone", "operator": "In", "values": []}, False),
        ({"key": "zone", "operator": "Exists"}, True),
        ({"key": "zone", "operator": "Exists", "values": ["a"]}, False),
        ({"key": "cores", "operator": "Gt", "values": ["8"]}, True),
        ({"key": "cores", "operator": "Gt", "values": ["eight"]}, False),
        ({"key": "cores", "operator": "Lt", "values": ["1", "2"]}, False),
    ],
)
def test_node_affinity_requirements_pair_operators_with_values(
    requirement: dict[str, Any], ok: bool
) -> None:
    term = {"matchExpressions": [requirement]}
    pod = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
    }
    if ok:
        assert accepted(pod).affinity is not None
    else:
        where = (
            "spec.pod.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms[0].matchExpressions[0].values"
        )
        assert fields(pod) == {where}


def test_pod_anti_affinity_needs_a_topology_key() -> None:
    term = {"labelSelector": {"matchLabels": {"team": "vision"}}}
    pod = {
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    }
    assert fields(pod) == {
        "spec.pod.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0]"
        ".topologyKey"
    }


@pytest.mark.req("R10.1")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedulerName", "Volcano Scheduler"),
        ("priorityClassName", "High_Priority"),
        ("serviceAccountName", "trainer!"),
    ],
)
def test_names_of_other_objects_are_dns_subdomains(field: str, value: str) -> None:
    assert fields({field: value}) == {f"spec.pod.{field}"}


def test_node_selector_keys_and_values_are_labels() -> None:
    assert fields({"nodeSelector": {"gpu type": "a100"}}) == {"spec.pod.nodeSelector"}
    assert fields({"nodeSelector": {"gpu": "a 100"}}) == {"spec.pod.nodeSelector.gpu"}
