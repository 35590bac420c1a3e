"""Every operator setting's default is pinned (cf. kopf's tests/settings/test_defaults.py), and
settings from the environment are refused at the edge naming the variable."""

from __future__ import annotations

import dataclasses

import pytest

from tolaria_operator.config import GiB, MiB, TolariaSettings, env_name, from_env
from tolaria_operator.errors import SettingsInvalid

DEFAULTS = {
    "pods": {
        "native_sidecar": True,
        "control_port": 7070,
        "trainer_metrics_port": 9401,
        "sidecar_metrics_port": 9402,
        "termination_grace_period_seconds": 60,
        "run_as_user": 10001,
        "default_shm_bytes": 4 * GiB,
        "min_shm_bytes": 1 * GiB,
        "shm_margin_bytes": 64 * MiB,
        "sidecar_cpu": "500m",
        "sidecar_memory_bytes": 512 * MiB,
        "startup_probe_period_seconds": 1,
        "startup_probe_failure_threshold": 120,
    },
    "images": {
        "trainer": "ghcr.io/tolaria/trainer:0.1.0",
        "sidecar": "ghcr.io/tolaria/sidecar:0.1.0",
        "pull_policy": "IfNotPresent",
        "pull_secrets": (),
    },
    "network": {
        "operator_pod_labels": {"app.kubernetes.io/name": "tolaria-operator"},
        "operator_namespace": "",
        "metrics_namespace_labels": {},
        "metrics_pod_labels": {},
    },
    "status": {
        "progress_patch_interval_seconds": 2.0,
        "progress_patches_per_second": 10.0,
        "deadline_check_interval_seconds": 1.0,
        "resync_interval_seconds": 15.0,
        "pod_gone_timeout_seconds": 30.0,
        "pod_gone_poll_seconds": 0.5,
        "retry_delay_seconds": 5.0,
        "daemon_cancellation_timeout_seconds": 5.0,
    },
    "sidecar": {
        "address_template": "{service}.{namespace}.svc:{port}",
        "connect_timeout_seconds": 2.0,
        "call_timeout_seconds": 5.0,
        "signal_grace_seconds": 1.0,
        "reconnect_min_seconds": 0.5,
        "reconnect_max_seconds": 10.0,
    },
    "suspend": {"checkpoint_timeout_seconds": 120.0},
    "escalation": {
        "fanout_concurrency": 32,
        "watch_namespaces": (),
        "per_run_timeline_limit": 32,
        "max_scope": "namespace",
        "cluster_scope_namespaces": (),
    },
    "metrics": {"port": 9403, "address": "0.0.0.0"},
    "tokens": {"key_secret": "tolaria-operator-token-key"},
    "retention": {"resolved_incident_ttl_seconds": 86_400.0, "sweep_interval_seconds": 30.0},
    "leader_election": {
        "enabled": False,
        "lease_name": "tolaria-operator-leader",
        "lease_duration_seconds": 15.0,
        "renew_deadline_seconds": 10.0,
        "retry_period_seconds": 2.0,
    },
}


def test_every_default_is_pinned() -> None:
    settings = TolariaSettings()
    actual = {
        section.name: {
            f.name: getattr(getattr(settings, section.name), f.name)
            for f in dataclasses.fields(getattr(settings, section.name))
        }
        for section in dataclasses.fields(settings)
    }
    assert actual == DEFAULTS


def test_every_setting_documents_its_unit_or_reason() -> None:
    import ast
    import inspect

    from tolaria_operator import config

    tree = ast.parse(inspect.getsource(config))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name != "TolariaSettings":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    following = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(following, ast.Expr) and isinstance(
                        following.value, ast.Constant
                    ), f"{node.name}.{ast.unparse(stmt.target)} has no docstring"


def test_settings_come_from_the_environment() -> None:
    settings = from_env(
        {
            env_name("pods", "native_sidecar"): "false",
            env_name("status", "progress_patch_interval_seconds"): "0.5",
            env_name("network", "operator_pod_labels"): "app=op,tier=control",
            env_name("network", "metrics_namespace_labels"): '{"team": "obs"}',
            env_name("escalation", "watch_namespaces"): "a, b",
            env_name("metrics", "port"): "0",
            "UNRELATED": "x",
        }
    )
    assert settings.pods.native_sidecar is False
    assert settings.status.progress_patch_interval_seconds == 0.5
    assert settings.network.operator_pod_labels == {"app": "op", "tier": "control"}
    assert settings.network.metrics_namespace_labels == {"team": "obs"}
    assert settings.escalation.watch_namespaces == ("a", "b")
    assert settings.metrics.port == 0
    assert env_name("pods", "native_sidecar") == "TOLARIA_OPERATOR_PODS_NATIVE_SIDECAR"


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("TOLARIA_OPERATOR_PODS_NATIVE_SIDECAR", "maybe", "must be true or false"),
        ("TOLARIA_OPERATOR_METRICS_PORT", "nine", "must be a number"),
        ("TOLARIA_OPERATOR_STATUS_RESYNC_INTERVAL_SECONDS", "-1", "must be >= 0"),
        ("TOLARIA_OPERATOR_NETWORK_OPERATOR_POD_LABELS", "novalue", "key=value"),
        ("TOLARIA_OPERATOR_PODS_NATIVE_SIDECARS", "true", "names no setting"),
        ("TOLARIA_OPERATOR_IMAGES_PULL_POLICY", "Sometimes", "must be one of Always"),
        ("TOLARIA_OPERATOR_IMAGES_TRAINER", "", "image reference without spaces"),
        ("TOLARIA_OPERATOR_IMAGES_SIDECAR", "reg.io/sidecar:1 --x", "without spaces"),
        ("TOLARIA_OPERATOR_TOKENS_KEY_SECRET", "Not_A_Name", "must be a Secret name"),
        (
            "TOLARIA_OPERATOR_ESCALATION_MAX_SCOPE",
            "group",
            "must be one of run, namespace, cluster",
        ),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(name: str, value: str, rule: str) -> None:
    with pytest.raises(SettingsInvalid, match=rule) as caught:
        from_env({name: value})
    assert caught.value.name == name


def test_run_images_come_from_the_environment() -> None:
    settings = from_env(
        {
            env_name("images", "trainer"): "reg.example/ml/trainer:1.2",
            env_name("images", "sidecar"): "reg.example/ml/sidecar:1.2",
            env_name("images", "pull_policy"): "Always",
            env_name("images", "pull_secrets"): "regcred, other",
        }
    )
    assert settings.images.trainer == "reg.example/ml/trainer:1.2"
    assert settings.images.sidecar == "reg.example/ml/sidecar:1.2"
    assert settings.images.pull_policy == "Always"
    assert settings.images.pull_secrets == ("regcred", "other")


def test_the_escalation_policy_comes_from_the_environment() -> None:
    """The Helm chart passes the tenant boundary as these two variables."""
    settings = from_env(
        {
            env_name("escalation", "max_scope"): "run",
            env_name("escalation", "cluster_scope_namespaces"): "ml-platform, sre",
        }
    )
    assert settings.escalation.max_scope == "run"
    assert settings.escalation.cluster_scope_namespaces == ("ml-platform", "sre")


def test_leader_election_comes_from_the_environment() -> None:
    election = from_env(
        {
            "TOLARIA_OPERATOR_LEADER_ELECTION_ENABLED": "true",
            "TOLARIA_OPERATOR_LEADER_ELECTION_LEASE_NAME": "ops-leader",
            "TOLARIA_OPERATOR_LEADER_ELECTION_LEASE_DURATION_SECONDS": "30",
            "TOLARIA_OPERATOR_NETWORK_OPERATOR_NAMESPACE": "tolaria-system",
        }
    ).leader_election
    assert (election.enabled, election.lease_name, election.lease_duration_seconds) == (
        True,
        "ops-leader",
        30.0,
    )


@pytest.mark.parametrize(
    ("env", "name", "rule"),
    [
        (
            {"RENEW_DEADLINE_SECONDS": "15"},
            "TOLARIA_OPERATOR_LEADER_ELECTION_RENEW_DEADLINE_SECONDS",
            "less than leader_election.lease_duration_seconds",
        ),
        (
            {"RETRY_PERIOD_SECONDS": "10"},
            "TOLARIA_OPERATOR_LEADER_ELECTION_RETRY_PERIOD_SECONDS",
            "less than leader_election.renew_deadline_seconds",
        ),
        (
            {"LEASE_NAME": "Not A Name"},
            "TOLARIA_OPERATOR_LEADER_ELECTION_LEASE_NAME",
            "must be a Lease name",
        ),
        (
            {"ENABLED": "true"},
            "TOLARIA_OPERATOR_LEADER_ELECTION_ENABLED",
            "needs the operator's namespace",
        ),
    ],
    ids=["renew-not-before-expiry", "retry-not-before-deadline", "bad-name", "no-namespace"],
)
def test_leader_election_refuses_timings_that_overlap_leaders_and_a_missing_namespace(
    env: dict[str, str], name: str, rule: str
) -> None:
    with pytest.raises(SettingsInvalid) as refused:
        from_env({f"TOLARIA_OPERATOR_LEADER_ELECTION_{k}": v for k, v in env.items()})
    assert refused.value.name == name
    assert rule in refused.value.rule
