"""The operator's deployment manifests: valid, non-root, least-privilege (R10.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = list(yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text()))


def of_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in DOCS if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_deploy_manifest_validates_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.33.0", strict=True)


@pytest.mark.req("R10.5")
def test_the_cluster_role_grants_no_wildcards() -> None:
    for rule in of_kind("ClusterRole")["rules"]:
        assert (
            "*" not in rule["verbs"]
            and "*" not in rule["resources"]
            and "*" not in rule["apiGroups"]
        )


@pytest.mark.req("R10.5")
def test_the_operator_cannot_list_or_watch_secrets() -> None:
    verbs = {
        verb
        for rule in of_kind("ClusterRole")["rules"]
        if "secrets" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert verbs == {"get", "create", "delete"}


@pytest.mark.req("R10.5")
def test_the_operator_pod_runs_non_root_read_only_without_capabilities() -> None:
    spec = of_kind("Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_the_operator_pod_carries_the_labels_the_network_policy_admits() -> None:
    from tolaria_operator.config import NetworkSettings

    labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert dict(NetworkSettings().operator_pod_labels).items() <= labels.items()
