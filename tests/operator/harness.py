"""The whole operator in-process against kmock (kopf's own approach): kmock serves the API,
kopf runs `tolaria_operator.handlers` in this event loop (time faked by looptime), and small
real gRPC sidecars on 127.0.0.1 answer for the runs. Helpers here act as the kubelet and as
the user; `eventually` polls against a generous REAL deadline, so a slow machine only makes
a test slower, never wrong."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import kubernetes.config.kube_config
import pytest
from prometheus_client import CollectorRegistry

import tolaria_operator.handlers  # noqa: F401 - registers the handlers in kopf's default registry
from tests.operator.fake_sidecar import FakeSidecar, closed_port
from tests.operator.process_kubelet import ProcessKubelet
from tolaria_operator.clock import SystemClock
from tolaria_operator.config import MetricsSettings, TolariaSettings
from tolaria_operator.context import OperatorContext, build_context
from tolaria_operator.control_tls import ControlCA
from tolaria_operator.kube import KubeApi
from tolaria_operator.lifecycle import CONTEXT_KEY

EPOCH = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
REAL_DEADLINE_S = 180.0
"""How long (real seconds) `eventually` waits at most: it returns as soon as the probe holds,
so only a failing test pays it. Real pods-as-processes import torch and train; on a loaded
2-core CI machine that took over a minute, so 60 s failed runs that were only slow."""

RUNS = "tolaria.dev/v1alpha1/tolariaruns"
INCIDENTS = "tolaria.dev/v1alpha1/tolariaincidents"


class LoopClock:
    """Wall-clock time driven by the event loop's (looptime's) clock."""

    def now(self) -> datetime:
        return EPOCH + timedelta(seconds=asyncio.get_running_loop().time())


@dataclass
class RecordingEvents:
    posted: list[tuple[str, str, str, str]] = field(default_factory=list)

    def post(self, ref: Any, type_: str, reason: str, message: str) -> None:
        self.posted.append((ref["metadata"]["name"], type_, reason, message))

    def reasons(self, run: str) -> list[str]:
        return [reason for name, _, reason, _ in self.posted if name == run]


def operator_settings() -> TolariaSettings:
    base = TolariaSettings()
    return replace(
        base,
        metrics=MetricsSettings(port=0),
        sidecar=replace(base.sidecar, reconnect_max_seconds=2.0),
    )


def configure_kmock(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kmock.resources.load_bundled()
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    kmock.resources[RUNS] = kmock.ResourceInfo(
        kind="TolariaRun",
        singular="tolariarun",
        namespaced=True,
        verbs=verbs,
        subresources={"status"},
    )
    kmock.resources[INCIDENTS] = kmock.ResourceInfo(
        kind="TolariaIncident",
        singular="tolariaincident",
        namespaced=False,
        verbs=verbs,
        subresources={"status"},
    )
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{kmock.url}'}}}}]\n"
        "users: [{name: test, user: {token: test-token}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: test}}]\n"
        "current-context: kmock\n",
        encoding="utf-8",
    )
    # The kubernetes client captured $KUBECONFIG at import time (toolchain.md §5d).
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


class Cluster:
    """kmock + the operator + fake sidecars, as one test sees them."""

    def __init__(self, kmock: Any) -> None:
        self.kmock = kmock
        self.url = str(kmock.url).rstrip("/")
        self.events = RecordingEvents()
        self.sidecars: dict[tuple[str, str], FakeSidecar] = {}
        self.dead_port = closed_port()
        self.registry = CollectorRegistry()
        self.ctx: OperatorContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self.settings = operator_settings()
        self.token_key = secrets.token_bytes(32)
        """The run-token key of every operator this test starts (one kept across restarts)."""
        self.clock: LoopClock | SystemClock = LoopClock()
        self.namespace = "default"
        """The namespace the operator watches."""
        """The operator's wall clock: looptime's by default, the machine's for real processes."""

    # -- the operator ------------------------------------------------------------------------

    def resolve(self, namespace: str, run: str, port: int) -> str:
        del port
        sidecar = self.sidecars.get((namespace, run))
        live = sidecar is not None and sidecar.server is not None
        return f"127.0.0.1:{sidecar.port if live and sidecar else self.dead_port}"

    async def start_operator(self) -> OperatorContext:
        """A fresh operator process: new context, memory and metrics; only the API persists."""
        self.registry = CollectorRegistry()
        ctx = build_context(
            self.settings,
            kube=KubeApi(),  # as in production: the configuration kopf's login loaded
            clock=self.clock,
            resolve=self.resolve,
            registry=self.registry,
            events=self.events,
            token_key=self.token_key,
        )
        self.ctx = ctx
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True  # kmock 0.8 fails cluster-wide namespace lists
        settings.watching.server_timeout = 30
        settings.posting.enabled = False
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(
            kopf.operator(
                registry=kopf.get_default_registry(),
                settings=settings,
                standalone=True,
                namespaces=[self.namespace],
                memo=kopf.Memo({CONTEXT_KEY: ctx}),
                stop_flag=self._stop,
            )
        )
        return ctx

    async def stop_operator(self) -> None:
        if self._task is None or self._stop is None:
            return
        self._stop.set()
        # A watch stream the emulator is still answering while kopf closes its session ends in
        # a ConnectionError on kopf's side: the way this in-process server stops, not a fault
        # of the operator.
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.wait_for(self._task, timeout=120)
        self._task = None
        if self.ctx is not None:
            await self.ctx.kube.close()

    def pods(self) -> list[dict[str, Any]]:
        """Every pod kmock holds (not deleted)."""
        return [
            dict(obj.raw)
            for (resource, _, _), obj in self.kmock.objects.items()
            if resource.plural == "pods" and not obj.deleted
        ]

    def run_pods_as_processes(
        self, workdir: Path, drills: dict[str, list[str]] | None = None
    ) -> ProcessKubelet:
        """A node that runs the operator's pods as local processes (start it, close it). Each
        run's sidecar resolves to its pod's control port, as the headless Service would, and
        the operator uses the machine's clock: real processes, real time."""
        node = ProcessKubelet(
            get=self.get,
            list_pods=self.pods,
            patch_status=self.kubelet,
            workdir=workdir,
            drills=drills,
        )

        def resolve(namespace: str, run: str, port: int) -> str:
            del port
            return node.address_of(namespace, run) or f"127.0.0.1:{self.dead_port}"

        self.resolve = resolve  # type: ignore[method-assign]
        self.clock = SystemClock()
        return node

    # -- sidecars ----------------------------------------------------------------------------

    def token(self, namespace: str, run: str) -> Callable[[], str | None]:
        """What the run's sidecar reads: the token in the Secret its current pod mounts."""

        def read() -> str | None:
            pod = self.get("pods", namespace, self.run_status(run, namespace).get("podName", ""))
            volumes = {v["name"]: v for v in ((pod or {}).get("spec") or {}).get("volumes", [])}
            name = volumes.get("token", {}).get("secret", {}).get("secretName", "")
            secret = self.get("secrets", namespace, name) if name else None
            if secret is None:
                return None
            return base64.b64decode(secret["data"]["token"]).decode()

        return read

    async def sidecar(self, run: str, namespace: str = "default") -> FakeSidecar:
        """A fake sidecar for `run`; start it before the operator, which cancels every task
        started while it runs when it stops (gRPC's server tasks included)."""
        fake = FakeSidecar(run, self.token(namespace, run), self.clock.now)
        await fake.start(ControlCA(self.token_key).issue(namespace, run))
        self.sidecars[(namespace, run)] = fake
        return fake

    async def close(self) -> None:
        """Stop the sidecars, then the operator (which would cancel their server tasks)."""
        for fake in self.sidecars.values():
            with contextlib.suppress(asyncio.CancelledError):
                await fake.stop()
        await self.stop_operator()

    # -- the API, as the user and the kubelet ------------------------------------------------

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, json=body, headers={"Content-Type": content_type}
            ) as response,
        ):
            assert response.status < 300, await response.text()
            return await response.json()

    async def create_run(self, body: dict[str, Any]) -> None:
        ns = body["metadata"]["namespace"]
        await self.request("POST", f"/apis/tolaria.dev/v1alpha1/namespaces/{ns}/tolariaruns", body)

    async def delete_run(self, name: str, namespace: str = "default") -> None:
        await self.request(
            "DELETE", f"/apis/tolaria.dev/v1alpha1/namespaces/{namespace}/tolariaruns/{name}"
        )

    async def kubelet(
        self,
        pod: str,
        status: dict[str, Any],
        namespace: str = "default",
        spec: dict[str, Any] | None = None,
    ) -> None:
        """Patch a pod's status (and spec.nodeName) the way a kubelet would."""
        patch: dict[str, Any] = {"status": status}
        if spec:
            patch["spec"] = spec
        await self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{pod}",
            patch,
            "application/merge-patch+json",
        )

    async def trainer_running(
        self, pod: str, node: str = "node-a", namespace: str = "default"
    ) -> None:
        await self.kubelet(
            pod,
            {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "restartCount": 0,
                        "state": {"running": {"startedAt": "2026-11-25T12:00:00Z"}},
                    }
                ],
                "initContainerStatuses": [
                    {
                        "name": "sidecar",
                        "restartCount": 0,
                        "state": {"running": {"startedAt": "2026-11-25T12:00:00Z"}},
                    }
                ],
            },
            namespace,
            spec={"nodeName": node},
        )

    async def attempt_running(self, run: str, attempt: int = 1) -> None:
        """Wait for the attempt's pod and its name in the status, run its trainer, and wait
        until the run says Running."""
        pod = f"{run}-a{attempt}"
        await self.eventually(f"pod {pod}", lambda: self.get("pods", "default", pod))
        await self.eventually(
            f"{run} records {pod}", lambda: self.run_status(run).get("podName") == pod
        )
        await self.trainer_running(pod)
        await self.eventually(
            f"{run} Running", lambda: self.run_status(run).get("phase") == "Running"
        )

    # -- reading -----------------------------------------------------------------------------

    def _object(self, plural: str, namespace: str | None, name: str) -> Any:
        for (resource, ns, obj_name), obj in self.kmock.objects.items():
            if resource.plural == plural and ns == namespace and obj_name == name:
                return obj
        return None

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self._object(plural, namespace, name)
        return None if obj is None or obj.deleted else dict(obj.raw)

    def was_deleted(self, plural: str, namespace: str | None, name: str) -> bool:
        obj = self._object(plural, namespace, name)
        return obj is not None and any(v is None for v in obj.history)

    def run_status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return (self.get("tolariaruns", namespace, name) or {}).get("status") or {}

    def incidents(self) -> list[dict[str, Any]]:
        return [
            dict(obj.raw)
            for (resource, _, _), obj in self.kmock.objects.items()
            if resource.plural == "tolariaincidents" and not obj.deleted
        ]

    async def eventually(self, what: str, probe: Callable[[], Any], *, step_s: float = 0.1) -> Any:
        """Polls `probe` until it returns something truthy; fails after REAL_DEADLINE_S."""
        end = time.monotonic() + REAL_DEADLINE_S
        last: Any = None
        while time.monotonic() < end:
            last = probe()
            if last:
                return last
            await asyncio.sleep(step_s)
        pytest.fail(f"{what}: not within {REAL_DEADLINE_S:.0f} s (last: {last!r})")
