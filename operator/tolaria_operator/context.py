"""`OperatorContext`: everything the handlers share (settings, API client, sidecar connector,
metrics, clock, event sink, the per-run sidecar views and locks), built once per operator.

The kopf startup handler builds it into kopf's `memo` unless the embedding code (a test)
put one there already, which is how tests inject a fake clock, kmock's API and sidecar
addresses on 127.0.0.1. Holds no global state: two operators in one process do not share
anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from tolaria_operator.clock import Clock, SystemClock
from tolaria_operator.config import TolariaSettings
from tolaria_operator.informer import Informer
from tolaria_operator.kube import KubeApi
from tolaria_operator.metrics import OperatorMetrics
from tolaria_operator.protocols import EventSink, Kube
from tolaria_operator.resources import MANAGED_BY_LABEL, MANAGER, PODS
from tolaria_operator.sidecar_client import AddressResolver, SidecarConnector
from tolaria_operator.tokens import RunTokens
from tolaria_operator.view import SidecarView

RunKey = tuple[str, str]


class NoEvents:
    """An EventSink that drops everything (before kopf's poster exists, and in unit tests)."""

    def post(self, ref: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        del ref, type_, reason, message


@dataclass
class OperatorContext:
    """Shared state of one operator process; see the module docstring."""

    settings: TolariaSettings
    kube: Kube
    sidecars: SidecarConnector
    metrics: OperatorMetrics
    clock: Clock
    events: EventSink
    tokens: RunTokens
    views: dict[RunKey, SidecarView] = field(default_factory=dict)
    locks: dict[RunKey, asyncio.Lock] = field(default_factory=dict)
    incidents_counted: bool = False
    pods: Informer | None = None
    """The operator's pods, watched with a server-side selector (None with a test's API)."""
    pod_watch: asyncio.Task[None] | None = None

    def lock(self, key: RunKey) -> asyncio.Lock:
        """The lock that serialises reconciles of one run (one writer of its status)."""
        return self.locks.setdefault(key, asyncio.Lock())

    def view(self, key: RunKey) -> SidecarView:
        return self.views.setdefault(key, SidecarView())

    def forget(self, key: RunKey) -> None:
        self.views.pop(key, None)
        self.locks.pop(key, None)
        self.metrics.forget_run(key)


def build_context(
    settings: TolariaSettings,
    *,
    kube: Kube | None = None,
    clock: Clock | None = None,
    resolve: AddressResolver | None = None,
    registry: CollectorRegistry | None = None,
    events: EventSink | None = None,
    token_key: bytes | None = None,
) -> OperatorContext:
    """A context with production collaborators unless others are given (`token_key`: the
    run-token key, instead of the one kept in the operator's namespace)."""
    api: Kube = kube if kube is not None else KubeApi()
    tokens = RunTokens(api, settings.tokens, settings.network.operator_namespace, key=token_key)
    return OperatorContext(
        settings=settings,
        kube=api,
        sidecars=SidecarConnector(
            api,
            settings.sidecar,
            control_port=settings.pods.control_port,
            tokens=tokens,
            resolve=resolve,
        ),
        metrics=OperatorMetrics(registry if registry is not None else CollectorRegistry()),
        clock=clock if clock is not None else SystemClock(),
        events=events if events is not None else NoEvents(),
        tokens=tokens,
        pods=Informer(
            api,
            PODS,
            namespaces=settings.escalation.watch_namespaces,
            labels={MANAGED_BY_LABEL: MANAGER},
        )
        if isinstance(api, KubeApi)
        else None,
    )
