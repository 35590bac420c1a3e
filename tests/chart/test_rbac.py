"""The chart's RBAC grants every API call the operator makes, and nothing more, in both modes:
cluster-wide (ClusterRoles bound cluster-wide) and per namespace (a Role in each watched
namespace, and a ClusterRole for the cluster-scoped kinds only); in both, a Role in the release
namespace for the operator's run-token key, the only Secret it may read, and one for its
leader-election Lease. The calls are derived
from the operator's code (`operator_calls`), never listed here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart import operator_calls
from tests.chart.rendering import (
    NAMESPACE,
    VALUE_SETS,
    WATCHED,
    of_kind,
    operator_container,
    operator_env,
    render,
)

SERVICE_ACCOUNT = {"kind": "ServiceAccount", "name": "tolaria-operator", "namespace": NAMESPACE}
CLUSTER_WIDE = VALUE_SETS["cluster-wide"]
NAMESPACED = VALUE_SETS["namespaced"]
KEY_ROLE = "tolaria-operator-token-key"
LEASE_ROLE = "tolaria-operator-leader-election"
HOME_ROLES = {KEY_ROLE, LEASE_ROLE}
"""The Roles in the release namespace for what the operator uses there only (`Resource.home`)."""


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for every combination the rules allow."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def bound_rules(
    objects: list[dict[str, Any]], binding_kind: str, role_kind: str, *, key: bool = False
) -> dict[str | None, set[tuple[str, str, str]]]:
    """Namespace (None: cluster-wide) -> what the operator's ServiceAccount is granted there by
    `binding_kind`s binding `role_kind`s (the release-namespace Roles only with `key`, else the
    others)."""
    roles = {
        (r["metadata"].get("namespace"), r["metadata"]["name"]): r
        for r in of_kind(objects, role_kind)
    }
    granted: dict[str | None, set[tuple[str, str, str]]] = {}
    for binding in of_kind(objects, binding_kind):
        if (binding["metadata"]["name"] in HOME_ROLES) != key:
            continue
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["subjects"] == [SERVICE_ACCOUNT]
        namespace = binding["metadata"].get("namespace")
        role = roles[(namespace, binding["roleRef"]["name"])]
        granted.setdefault(namespace, set()).update(grants(role["rules"]))
    return granted


def needed(
    *, all_namespaces: bool, namespaced: bool, home: bool = False
) -> set[tuple[str, str, str]]:
    return {
        (n.group, n.resource, n.verb)
        for n in operator_calls.operator_needs(all_namespaces=all_namespaces)
        if n.namespaced == namespaced and n.home == home
    }


def secret_rules(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(role name, rule) of every rule about Secrets in every (Cluster)Role."""
    return [
        (role["metadata"]["name"], rule)
        for role in [*of_kind(objects, "ClusterRole"), *of_kind(objects, "Role")]
        for rule in role["rules"]
        if "" in rule["apiGroups"] and "secrets" in rule["resources"]
    ]


def test_the_scan_resolves_every_call_the_operator_makes() -> None:
    calls, unresolved = operator_calls.tolaria_calls()
    assert unresolved == []
    assert operator_calls.calls_the_scan_misses() == []
    # every module that talks to the API was seen (a scan that finds nothing proves nothing)
    assert {c.where.split(":")[0] for c in calls} >= {
        "reconciler.py",
        "escalation.py",
        "watcher.py",
        "lifecycle.py",
        "sidecar_client.py",
        "leader.py",
    }


def test_the_scan_knows_every_method_of_the_kube_seam() -> None:
    assert operator_calls.kube_methods() == set(operator_calls.VERBS)


def test_kopf_handlers_name_resources_the_scan_can_place() -> None:
    """Handlers are registered by plural; a kind or short name would need kopf's discovery."""
    plurals = {(r.group, r.plural) for r in operator_calls._module_resources()}
    for selector in operator_calls.kopf_selectors():
        assert (selector.group or "", selector.any_name) in plurals, selector


def test_the_chart_runs_kopf_standalone_so_no_peering_is_needed() -> None:
    for values in (CLUSTER_WIDE, NAMESPACED):
        assert "--standalone" in operator_container(render(values))["args"]


@pytest.mark.req("R10.5")
def test_cluster_wide_the_cluster_roles_grant_exactly_what_the_operator_needs() -> None:
    objects = render(CLUSTER_WIDE)
    assert sorted(r["metadata"]["name"] for r in of_kind(objects, "Role")) == sorted(HOME_ROLES)
    granted = bound_rules(objects, "ClusterRoleBinding", "ClusterRole")[None]
    need = needed(all_namespaces=True, namespaced=True) | needed(
        all_namespaces=True, namespaced=False
    )
    assert need - granted == set(), "the operator's calls the RBAC does not allow"
    assert granted - need == set(), "granted but never used"


@pytest.mark.req("R10.5")
def test_per_namespace_each_watched_namespace_grants_what_runs_need() -> None:
    objects = render(NAMESPACED)
    per_namespace = bound_rules(objects, "RoleBinding", "Role")
    assert sorted(per_namespace) == sorted(WATCHED)
    need = needed(all_namespaces=False, namespaced=True)
    for namespace, granted in per_namespace.items():
        assert need - granted == set(), namespace
        assert granted - need == set(), namespace


@pytest.mark.req("R10.5")
def test_per_namespace_the_cluster_role_grants_only_cluster_scoped_kinds() -> None:
    """Incidents and CRDs are cluster-scoped (a Role cannot grant them), and kopf follows the
    namespaces it was given; nothing a run owns is granted cluster-wide."""
    granted = bound_rules(render(NAMESPACED), "ClusterRoleBinding", "ClusterRole")[None]
    assert granted == needed(all_namespaces=False, namespaced=False)
    assert ("", "namespaces", "watch") in granted


def test_cluster_wide_kopf_does_not_follow_namespaces() -> None:
    granted = bound_rules(render(CLUSTER_WIDE), "ClusterRoleBinding", "ClusterRole")[None]
    assert {r for _, r, _ in granted}.isdisjoint({"namespaces"})


@pytest.mark.req("R10.5")
@pytest.mark.parametrize("values", [CLUSTER_WIDE, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_each_mode_grants_the_token_key_and_the_lease_in_the_release_namespace_only(
    values: dict[str, Any],
) -> None:
    granted = bound_rules(render(values), "RoleBinding", "Role", key=True)
    assert granted == {NAMESPACE: needed(all_namespaces=False, namespaced=True, home=True)}
    assert granted[NAMESPACE] == {
        ("", "secrets", "get"),
        ("", "secrets", "create"),
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "patch"),
    }


@pytest.mark.req("R10.5")
@pytest.mark.parametrize("values", [CLUSTER_WIDE, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_no_rule_uses_a_wildcard(values: dict[str, Any]) -> None:
    for role in [*of_kind(render(values), "ClusterRole"), *of_kind(render(values), "Role")]:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)
            assert "nonResourceURLs" not in rule


@pytest.mark.req("R10.5")
@pytest.mark.parametrize("values", [CLUSTER_WIDE, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_the_only_secret_the_operator_may_read_is_its_own_token_key(
    values: dict[str, Any],
) -> None:
    """No get, list or watch of Secrets anywhere (a confused deputy could mount one, and a
    ClusterRole would read every Secret in the cluster), but `get` of the key by its name, in
    the release namespace. Elsewhere the operator only creates the token Secrets."""
    objects = render(values)
    key = operator_env(objects)["TOLARIA_OPERATOR_TOKENS_KEY_SECRET"]
    reads = [
        (role, rule)
        for role, rule in secret_rules(objects)
        if {"get", "list", "watch"} & set(rule["verbs"])
    ]
    assert reads == [(KEY_ROLE, {**reads[0][1], "resourceNames": [key], "verbs": ["get"]})]
    (key_role,) = [r for r in of_kind(objects, "Role") if r["metadata"]["name"] == KEY_ROLE]
    assert key_role["metadata"]["namespace"] == NAMESPACE
    others = {
        verb for role, rule in secret_rules(objects) if role != KEY_ROLE for verb in rule["verbs"]
    }
    assert others == {"create"}
    named = [role for role, rule in secret_rules(objects) if "resourceNames" in rule]
    assert named == [KEY_ROLE]


def test_rbac_create_false_renders_no_rbac() -> None:
    kinds = {o["kind"] for o in render({"rbac": {"create": False}})}
    assert kinds.isdisjoint({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})


def test_an_existing_service_account_is_bound_instead_of_a_new_one() -> None:
    objects = render({"serviceAccount": {"create": False, "name": "platform-operator"}})
    assert of_kind(objects, "ServiceAccount") == []
    for binding in of_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "platform-operator"
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"
