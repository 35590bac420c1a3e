"""`spec.pod` on the real Kubernetes API server: every field a run adds to its pod is stored as
the model reads it, the CEL twins of the model's rules refuse exactly what the model refuses,
and the manifest's quantity grammar means what the API server's own `quantity()` means (R10.1).

The CRD cannot call CEL's quantity library (a new rule may call it from Kubernetes 1.29 on,
and the chart supports 1.28), so the agreement is proven here instead, on a probe CRD this
test installs on a server new enough to have it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
from kubernetes.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes.client.rest import ApiException

from leyline.quantity import parse_quantity
from leyline.spec import TolariaRunSpec
from tests.k8s.test_crd_apiserver import (
    Runs,
    model_accepts,
    run_doc,
    server_accepts,
    strip_none,
)
from tests.leyline.test_quantity import SAMPLES
from tests.operator.builders import SHARED_POD

apiserver = pytest.mark.apiserver


@pytest.fixture
def runs(custom: CustomObjectsApi, namespace: str) -> Runs:
    return Runs(custom, namespace)


@apiserver
@pytest.mark.req("R10.1")
def test_a_run_with_every_pod_field_is_stored_as_the_model_reads_it(runs: Runs) -> None:
    doc = run_doc("shared", {"pod": SHARED_POD})
    stored = runs.create(doc)["spec"]
    expected = TolariaRunSpec.model_validate(doc["spec"]).model_dump(mode="json")
    assert strip_none(stored) == strip_none(expected)
    assert TolariaRunSpec.model_validate(stored) == TolariaRunSpec.model_validate(doc["spec"])


def _mount(path: str, **extra: Any) -> dict[str, Any]:
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
    return {"volumes": [volume], "volumeMounts": [{"name": "data", "mountPath": path, **extra}]}


def _node_requirement(operator: str, values: list[str]) -> dict[str, Any]:
    term = {"matchExpressions": [{"key": "cores", "operator": operator, "values": values}]}
    required = {"nodeSelectorTerms": [term]}
    return {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    }


POD_EDGES = [
    pytest.param({"tolerations": [{"operator": "Exists"}]}, True, id="tolerate-everything"),
    pytest.param({"tolerations": [{"effect": "NoSchedule"}]}, False, id="empty-key-equal"),
    pytest.param(
        {"tolerations": [{"key": "a", "operator": "Exists", "value": ""}]}, True, id="exists-empty"
    ),
    pytest.param({"shmSizeLimit": "6Gi"}, True, id="shm-gibibytes"),
    pytest.param({"shmSizeLimit": "0Gi"}, False, id="shm-zero"),
    pytest.param({"resources": {"memory": "500m"}}, False, id="memory-millibytes"),
    pytest.param({"resources": {"cpu": "500m"}}, True, id="cpu-millicores"),
    pytest.param({"env": [{"name": "HOME", "value": "/home/me"}]}, False, id="env-home"),
    pytest.param({"env": [{"name": "TOLARIAN", "value": "x"}]}, True, id="env-like-but-not"),
    pytest.param(
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, False, id="env-twice"
    ),
    pytest.param({"env": [{"name": "A", "valueFrom": {}}]}, False, id="env-source-empty"),
    pytest.param(
        {"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]},
        False,
        id="env-from-two-sources",
    ),
    pytest.param(_mount("/data"), True, id="mount-data"),
    pytest.param(_mount("/dev/shmx"), True, id="mount-beside-shm"),
    pytest.param(_mount("/var"), False, id="mount-above-ours"),
    pytest.param(_mount("/data/"), False, id="mount-trailing-slash"),
    pytest.param(_mount("/a/./b"), False, id="mount-dot-segment"),
    pytest.param(_mount("/data", subPath="x/../../y"), False, id="subpath-escapes"),
    pytest.param({"volumes": [{"name": "v"}]}, False, id="volume-without-source"),
    pytest.param(
        {"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]},
        False,
        id="volume-two-sources",
    ),
    pytest.param({"volumes": [{"name": "tmp", "emptyDir": {}}]}, False, id="volume-ours"),
    pytest.param({"labels": {"app.kubernetes.io/component": "x"}}, False, id="label-ours"),
    pytest.param({"labels": {"example.com/team": "vision"}}, True, id="label-prefixed"),
    pytest.param({"labels": {"a b": "x"}}, False, id="label-bad-key"),
    pytest.param({"annotations": {"tolaria.dev/x": "y"}}, False, id="annotation-ours"),
    pytest.param({"nodeSelector": {"-bad": "x"}}, False, id="node-selector-bad-key"),
    pytest.param({"resources": {"extra": {"hugepages-2Mi": "1Gi"}}}, True, id="hugepages"),
    pytest.param({"resources": {"extra": {"example.com/fpga": "2"}}}, True, id="extended-count"),
    pytest.param({"resources": {"extra": {"memory": "2Gi"}}}, False, id="extra-memory"),
    pytest.param(
        {"resources": {"gpus": 1, "extra": {"nvidia.com/gpu": "1"}}}, False, id="gpu-twice"
    ),
    pytest.param(_node_requirement("Gt", ["8"]), True, id="affinity-gt"),
    pytest.param(_node_requirement("Gt", ["eight"]), False, id="affinity-gt-word"),
    pytest.param(_node_requirement("Exists", ["8"]), False, id="affinity-exists-values"),
    pytest.param({"schedulerName": "Volcano"}, False, id="scheduler-upper-case"),
    pytest.param({"imagePullSecrets": [{"name": "team-registry"}]}, True, id="pull-secret"),
]


@apiserver
@pytest.mark.req("R10.1")
@pytest.mark.parametrize(("pod", "accepted"), POD_EDGES)
def test_server_and_model_agree_on_pod_fields(
    pod: dict[str, Any], accepted: bool, runs: Runs
) -> None:
    doc = run_doc(f"pod-{uuid.uuid4().hex[:8]}", {"pod": pod})
    assert (server_accepts(runs, doc), model_accepts(doc)) == (accepted, accepted)


PROBE_GROUP = "probe.tolaria.dev"
PROBE_PLURAL = "quantityprobes"


@pytest.fixture(scope="module")
def quantity_probe(kube: ApiClient) -> Iterator[CustomObjectsApi]:
    """A CRD whose one rule asks the server's CEL quantity library whether `q` is a quantity
    equal to `milli` millis; skipped on a server without the library."""
    ext = ApiextensionsV1Api(kube)
    name = f"{PROBE_PLURAL}.{PROBE_GROUP}"
    text = {"type": "string", "maxLength": 64}
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": PROBE_GROUP,
            "names": {"kind": "QuantityProbe", "plural": PROBE_PLURAL, "singular": "quantityprobe"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"q": text, "milli": text},
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "isQuantity(self.q) && quantity(self.q)"
                                            ".compareTo(quantity(self.milli)) == 0",
                                            "message": "not that quantity",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as err:
        if "quantity" in json.loads(err.body).get("message", ""):
            pytest.skip("this API server takes no quantity() in a new rule (Kubernetes < 1.29)")
        raise
    custom = CustomObjectsApi(kube)
    deadline = time.monotonic() + 60
    while True:
        try:
            custom.list_cluster_custom_object(PROBE_GROUP, "v1", PROBE_PLURAL, limit=1)
            break
        except ApiException as err:
            if err.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield custom
    finally:
        ext.delete_custom_resource_definition(name)


def _server_says(probe: CustomObjectsApi, namespace: str, q: str, milli: str) -> bool:
    body = {
        "apiVersion": f"{PROBE_GROUP}/v1",
        "kind": "QuantityProbe",
        "metadata": {"generateName": "q-"},
        "spec": {"q": q, "milli": milli},
    }
    try:
        probe.create_namespaced_custom_object(PROBE_GROUP, "v1", namespace, PROBE_PLURAL, body)
    except ApiException as err:
        if err.status == 422:
            return False
        raise
    return True


def _value(text: str) -> Fraction | None:
    try:
        return parse_quantity(text)
    except ValueError:
        return None


@apiserver
@pytest.mark.req("R10.1")
def test_every_quantity_the_manifest_accepts_has_the_same_value_on_the_api_server(
    quantity_probe: CustomObjectsApi, namespace: str
) -> None:
    """`leyline.quantity` accepts a subset of the API server's grammar, and reads each string
    to the very value the server's `quantity()` does (compared in millis, exactly)."""
    samples = [*SAMPLES, "1Ei", "999999E", "0.001", "12.5Mi", "7.25k", "1000000000000m"]
    checked = 0
    for text in samples:
        value = _value(text)
        if value is None:
            continue
        millis = value * 1000
        if millis.denominator != 1:  # below a milli: the server would round it
            continue
        assert _server_says(quantity_probe, namespace, text, f"{millis.numerator}m"), text
        assert not _server_says(quantity_probe, namespace, text, f"{millis.numerator + 1}m"), text
        checked += 1
    assert checked >= 12


@apiserver
@pytest.mark.req("R10.1")
@pytest.mark.parametrize("text", ["1e3", "+1", ".5", "5.", "1E3"])
def test_what_the_manifest_refuses_of_the_servers_grammar_is_only_spelling(
    text: str, quantity_probe: CustomObjectsApi, namespace: str
) -> None:
    """The few forms the API server takes and the manifest does not (exponents, signs, bare
    points) all have a plain spelling the manifest takes; none is a value it cannot express."""
    assert _value(text) is None
    assert _server_says(quantity_probe, namespace, text, text)
