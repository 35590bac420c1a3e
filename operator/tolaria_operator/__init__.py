"""Tolaria's Kubernetes operator (kopf): `TolariaRun` -> one pod per attempt with the trainer
and the rollback sidecar, status and conditions, full-rollback deadline enforcement, and
cluster-wide incidents through `TolariaIncident` (R10).

The public surface, for the entry point, the Helm chart's tests and the operator tests:
the settings, the pure builders and planners, the context an embedding test injects, and the
errors. Everything else is internal. Imports only leyline, kopf, kubernetes, aiohttp, grpc
and prometheus_client (never torch, the trainer or the sidecar).
"""

from tolaria_operator.clock import Clock, SystemClock, format_time, parse_time
from tolaria_operator.config import (
    EscalationSettings,
    MetricsSettings,
    NetworkSettings,
    PodSettings,
    SidecarLinkSettings,
    StatusSettings,
    SuspendSettings,
    TolariaSettings,
    from_env,
)
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.errors import (
    AckTimeout,
    KubeApiError,
    ObjectExists,
    OperatorError,
    PodNotGone,
    SettingsInvalid,
    SidecarCallFailed,
    SidecarUnavailable,
    SpecInvalid,
)
from tolaria_operator.kube import KubeApi
from tolaria_operator.metrics import MetricsServer, OperatorMetrics
from tolaria_operator.pods import (
    attempt_pod,
    manifest_config_map,
    network_policy,
    shm_size_bytes,
    sidecar_service,
    token_secret,
)
from tolaria_operator.resources import RunObject, parse_run
from tolaria_operator.sidecar_client import SidecarClient, SidecarConnector
from tolaria_operator.status import Plan, plan_run
from tolaria_operator.view import SidecarView

__all__ = [
    "AckTimeout",
    "Clock",
    "EscalationSettings",
    "KubeApi",
    "KubeApiError",
    "MetricsServer",
    "MetricsSettings",
    "NetworkSettings",
    "ObjectExists",
    "OperatorContext",
    "OperatorError",
    "OperatorMetrics",
    "Plan",
    "PodNotGone",
    "PodSettings",
    "RunObject",
    "SettingsInvalid",
    "SidecarCallFailed",
    "SidecarClient",
    "SidecarConnector",
    "SidecarLinkSettings",
    "SidecarUnavailable",
    "SidecarView",
    "SpecInvalid",
    "StatusSettings",
    "SuspendSettings",
    "SystemClock",
    "TolariaSettings",
    "attempt_pod",
    "build_context",
    "format_time",
    "from_env",
    "manifest_config_map",
    "network_policy",
    "parse_run",
    "parse_time",
    "plan_run",
    "shm_size_bytes",
    "sidecar_service",
    "token_secret",
]
