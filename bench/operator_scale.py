"""Bench: the operator at 1,000 runs against an emulated API server.

Two processes. The *world* (a child process) holds kmock, the kopf author's Kubernetes API
emulator, one gRPC sidecar that answers for every run over TLS (a certificate for
`*.<namespace>.svc` signed by the operator's control CA) and streams a progress event per run
every `--progress-every` seconds (5), and a kubelet that marks each new pod Running. The
*operator* runs in this process exactly as in production (kopf, the real handlers, the real
API client) against the world's URL, so the memory measured is the operator's own.

The world creates `--runs` TolariaRuns at once, spread over `--namespaces` tenant namespaces
(the emulator ignores label selectors, so one namespace would make every list of a run's pods
return all pods), and reports when every run's pod exists and
when every run's status says Running. Then, with every run Running and its sidecar streaming,
it counts every request the API server receives for `--window` seconds (watches included) and
reports API calls per run per minute in that steady state. This process reports its resident
memory before the operator started, at its peak, and at the end of the window.

Targets: steady state <= 2 API calls per run per minute; every pod created within 60 s.

    python bench/operator_scale.py                       # 1,000 runs, 120 s window: ~5 min
    python bench/operator_scale.py --runs 50 --window 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import logging
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for part in ("", "operator", "sidecar", "trainer_image"):
    if str(ROOT / part) not in sys.path:
        sys.path.insert(0, str(ROOT / part))

RUNS_PATH = "/apis/tolaria.dev/v1alpha1/tolariaruns"


def namespace_of(i: int, namespaces: int) -> str:
    """Runs are spread over tenant namespaces, as on a shared cluster."""
    return f"tenant-{i % namespaces:03d}"


TARGET_CALLS_PER_RUN_MINUTE = 2.0
TARGET_ALL_PODS_S = 60.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident memory (or its peak, `VmHWM`) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the world (child process) ------------------------------------------------------------------


def _wildcard_cert(key: bytes, namespaces: list[str]) -> tuple[bytes, bytes]:
    """A server certificate for every run's sidecar name in the bench namespace, signed by the
    control CA derived from the operator's token `key` (what a real attempt's certificate is
    signed by; real ones name one run each)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from tolaria_operator.control_tls import ControlCA

    ca = ControlCA(key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-sidecar")]))
        .issuer_name(ca.cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"*.{ns}.svc") for ns in namespaces]),
            critical=False,
        )
        .sign(ca._key, hashes.SHA256())  # the bench signs with the CA as the operator would
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def _sidecar(key: bytes, progress_every: float, namespaces: list[str]) -> Any:
    """One gRPC server answering `GetStatus` and `StreamEvents` for every run."""
    import grpc

    from leyline.v1 import sidecar_pb2 as pb
    from leyline.v1.sidecar_pb2_grpc import (
        SidecarControlServicer,
        add_SidecarControlServicer_to_server,
    )

    class Everyone(SidecarControlServicer):
        """Status and progress only: the bench raises no emergencies and asks no checkpoints."""

        async def GetStatus(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC
            return pb.SidecarStatus(trainer_attached=True, fast_tier_feasible=True)

        async def StreamEvents(  # noqa: N802 - the gRPC method's name
            self, request: Any, context: Any
        ) -> AsyncIterator[Any]:
            sequence = max(int(request.after_sequence), 1000)
            step = 0
            while True:
                await asyncio.sleep(progress_every)
                sequence += 1
                step += 1
                event = pb.SidecarEvent(sequence=sequence)
                event.at.GetCurrentTime()
                event.progress.epoch = step // 100
                event.progress.global_step = step
                event.progress.heartbeat.GetCurrentTime()
                yield event

    server = grpc.aio.server(  # the real sidecar's keepalive permissions (the client pings)
        options=[
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
    )
    add_SidecarControlServicer_to_server(Everyone(), server)  # type: ignore[abstract]
    cert, private = _wildcard_cert(key, namespaces)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(private, cert)]))
    await server.start()
    return server, port


def _run_body(i: int, namespaces: int) -> dict[str, Any]:
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {  # what the API server would fill in (the emulator does not)
            "name": f"run-{i:04d}",
            "namespace": namespace_of(i, namespaces),
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": {
            "training": {"task": "synthetic-mlp", "epochs": 1000},
            "failurePolicy": {"podStartTimeoutSeconds": 86_400},
        },
    }


def _running_status() -> dict[str, Any]:
    started = {"running": {"startedAt": "2026-12-01T00:00:00Z"}}
    return {
        "phase": "Running",
        "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": started}],
        "initContainerStatuses": [{"name": "sidecar", "restartCount": 0, "state": started}],
    }


async def world(args: argparse.Namespace) -> None:
    import aiohttp
    from kmock import KubernetesEmulator
    from kmock._internal import apps

    key = secrets.token_bytes(32)
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    async with KubernetesEmulator() as kmock, apps.Server(kmock):
        kmock.resources.load_bundled()
        for plural, kind, namespaced in (
            ("tolariaruns", "TolariaRun", True),
            ("tolariaincidents", "TolariaIncident", False),
        ):
            kmock.resources[f"tolaria.dev/v1alpha1/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=verbs,
                subresources={"status"},
            )
        tally = Tally()
        kmock._requests = tally
        tenants = sorted({namespace_of(i, args.namespaces) for i in range(args.runs)})
        server, port = await _sidecar(key, args.progress_every, tenants)
        url = str(kmock.url).rstrip("/")
        print(json.dumps({"url": url, "sidecar_port": port, "key": key.hex()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # go

        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            semaphore = asyncio.Semaphore(64)

            async def objects(path: str) -> list[dict[str, Any]]:
                async with session.get(url + path) as r:
                    r.raise_for_status()
                    return list((await r.json()).get("items") or [])

            async def create(i: int) -> None:
                body = _run_body(i, args.namespaces)
                ns = body["metadata"]["namespace"]
                path = f"/apis/tolaria.dev/v1alpha1/namespaces/{ns}/tolariaruns"
                async with semaphore, session.post(url + path, json=body) as r:
                    r.raise_for_status()

            await asyncio.gather(*(create(i) for i in range(args.runs)))
            created_s = time.monotonic() - start
            marked: set[tuple[str, str]] = set()
            all_pods_s = all_running_s = None
            next_note = start
            deadline = start + args.settle_timeout
            while time.monotonic() < deadline:
                pods = await objects("/api/v1/pods")

                async def run_pod(ns: str, name: str) -> None:  # as the kubelet would
                    async with (
                        semaphore,
                        session.patch(
                            f"{url}/api/v1/namespaces/{ns}/pods/{name}",
                            json={"status": _running_status(), "spec": {"nodeName": "node-a"}},
                            headers={"Content-Type": "application/merge-patch+json"},
                        ) as r,
                    ):
                        r.raise_for_status()

                new = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods} - marked
                marked |= new
                await asyncio.gather(*(run_pod(ns, name) for ns, name in new))
                if all_pods_s is None and len(pods) >= args.runs:
                    created = tally.nth("POST pods", args.runs)  # when it arrived, not seen
                    all_pods_s = (created or time.monotonic()) - start
                running = (
                    sum(
                        1
                        for run in await objects(RUNS_PATH)
                        if (run.get("status") or {}).get("phase") == "Running"
                    )
                    if all_pods_s is not None
                    else 0
                )
                if time.monotonic() >= next_note:
                    next_note = time.monotonic() + 10
                    print(
                        f"[{time.monotonic() - start:6.1f} s] pods {len(pods)}/{args.runs}, "
                        f"Running {running}/{args.runs}",
                        file=sys.stderr,
                        flush=True,
                    )
                if running >= args.runs:
                    all_running_s = time.monotonic() - start
                    break
                await asyncio.sleep(2.0)  # each poll lists every pod and run: keep them rare
            await asyncio.sleep(args.warmup)
            first = time.monotonic()
            await asyncio.sleep(args.window)
            kinds = tally.between(first, time.monotonic())
            window = sum(kinds.values())
            runs = max(args.runs, 1)
            print(
                json.dumps(
                    {
                        "runs": args.runs,
                        "namespaces": args.namespaces,
                        "create_s": round(created_s, 2),
                        "all_pods_s": None if all_pods_s is None else round(all_pods_s, 2),
                        "all_running_s": None if all_running_s is None else round(all_running_s, 2),
                        "window_s": args.window,
                        "requests_in_window": window,
                        "calls_per_run_per_minute": round(window / runs / (args.window / 60), 3),
                        "by_kind": dict(kinds.most_common()),
                        "emulator_cpu_s": round(_cpu_s(), 1),
                    }
                ),
                flush=True,
            )
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # done
        await server.stop(grace=None)


class Tally(list):  # type: ignore[type-arg]
    """Every request the emulator served, by kind and time. kmock keeps every request and
    matches each new one against all it kept (quadratic: at 1,000 runs kmock, not the
    operator, would be measured). Put in place of kmock's log, this keeps only the request
    being matched (kmock matches it in the same loop step it logs it) and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, str]] = []

    def append(self, request: Any) -> None:
        self.seen.append((time.monotonic(), _kind(request)))
        self.clear()
        super().append(request)

    def between(self, start: float, end: float) -> collections.Counter[str]:
        return collections.Counter(k for t, k in self.seen if start <= t < end)

    def nth(self, kind: str, n: int) -> float | None:
        """When the `n`-th request of `kind` arrived (the operator's pod creations)."""
        times = [t for t, k in self.seen if k == kind]
        return times[n - 1] if len(times) >= n else None


def _kind(request: Any) -> str:
    watch = str(request.params.get("watch", "")).lower() in ("true", "1")
    verb = "WATCH" if watch else str(request.method).split(".")[-1].upper()
    path = re.sub(r"/namespaces/[^/]+", "", request.url.path)
    resource = next((p for p in path.strip("/").split("/") if p in _PLURALS), path)
    return f"{verb} {resource}{'/status' if path.endswith('/status') else ''}"


_PLURALS = {
    "tolariaruns",
    "tolariaincidents",
    "pods",
    "secrets",
    "configmaps",
    "services",
    "networkpolicies",
    "events",
    "leases",
}


# -- the operator (this process) -----------------------------------------------------------------


async def operate(args: argparse.Namespace) -> dict[str, Any]:
    import kubernetes.config.kube_config

    import tolaria_operator.handlers  # noqa: F401 - registers the handlers

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--world",
        *sys.argv[1:] if args.forward is None else args.forward,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    if child.stdout is None or child.stdin is None:
        raise RuntimeError("the world process has no pipes")
    hello = json.loads(await child.stdout.readline())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "kubeconfig"
        config.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: w, cluster: {{server: '{hello['url']}'}}}}]\n"
            "users: [{name: b, user: {token: bench}}]\n"
            "contexts: [{name: w, context: {cluster: w, user: b}}]\ncurrent-context: w\n",
            encoding="utf-8",
        )
        kube_config = kubernetes.config.kube_config
        previous = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(config)  # restored below
        in_cluster = os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        try:
            return await _operate(args, child, hello)
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = previous
            if in_cluster is not None:
                os.environ["KUBERNETES_SERVICE_HOST"] = in_cluster


async def _operate(args: argparse.Namespace, child: Any, hello: dict[str, Any]) -> dict[str, Any]:
    import kopf

    from tolaria_operator.config import EscalationSettings, MetricsSettings, TolariaSettings
    from tolaria_operator.context import build_context
    from tolaria_operator.kube import KubeApi
    from tolaria_operator.lifecycle import CONTEXT_KEY

    base = TolariaSettings()
    settings = TolariaSettings(
        **{
            **{f: getattr(base, f) for f in base.__dataclass_fields__},
            "metrics": MetricsSettings(port=0),
            "escalation": EscalationSettings(watch_namespaces=()),
        }
    )
    port = hello["sidecar_port"]
    api = KubeApi()
    ctx = build_context(
        settings,
        kube=api,
        resolve=lambda namespace, run, _port: f"127.0.0.1:{port}",
        token_key=bytes.fromhex(hello["key"]),
    )
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.scanning.disabled = True  # the emulator cannot list namespaces
    kopf_settings.posting.enabled = False
    kopf_settings.watching.server_timeout = 300
    stop = asyncio.Event()
    before_kib = rss_kib()
    cpu_before = _cpu_s()
    task = asyncio.create_task(
        kopf.operator(
            registry=kopf.get_default_registry(),
            settings=kopf_settings,
            standalone=True,
            clusterwide=True,
            memo=kopf.Memo({CONTEXT_KEY: ctx}),
            stop_flag=stop,
        )
    )
    child.stdin.write(b"go\n")
    await child.stdin.drain()
    line = await child.stdout.readline()
    result: dict[str, Any] = json.loads(line) if line else {"error": "the world ended"}
    result["operator_rss_mib"] = {
        "before": round(before_kib / 1024, 1),
        "peak": round(rss_kib("VmHWM") / 1024, 1),
        "end": round(rss_kib() / 1024, 1),
    }
    result["operator_cpu_s"] = round(_cpu_s() - cpu_before, 1)
    result["resyncs_from_cache"] = int(ctx.metrics.cached_resyncs._value.get())
    stop.set()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError, TimeoutError):
        await asyncio.wait_for(task, timeout=60)
    await api.close()
    child.stdin.write(b"done\n")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await child.stdin.drain()
    await child.wait()
    return result


def report(result: dict[str, Any]) -> str:
    calls = result.get("calls_per_run_per_minute", float("nan"))
    pods = result.get("all_pods_s")
    rss = result.get("operator_rss_mib", {})
    lines = [
        f"runs: {result.get('runs')} in {result.get('namespaces')} namespaces",
        f"all runs created in {result.get('create_s')} s; every pod created after {pods} s "
        f"(target <= {TARGET_ALL_PODS_S:.0f} s); every run Running after "
        f"{result.get('all_running_s')} s",
        f"steady state: {result.get('requests_in_window')} requests in "
        f"{result.get('window_s')} s = {calls} calls/run/min "
        f"(target <= {TARGET_CALLS_PER_RUN_MINUTE}); resyncs settled from the cache: "
        f"{result.get('resyncs_from_cache')}",
        "  " + ", ".join(f"{k}: {v}" for k, v in (result.get("by_kind") or {}).items()),
        f"operator memory (RSS): {rss.get('before')} MiB before, {rss.get('end')} MiB at the "
        f"end, {rss.get('peak')} MiB peak",
        f"CPU seconds: operator {result.get('operator_cpu_s')}, emulator and sidecar "
        f"{result.get('emulator_cpu_s')}",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--namespaces", type=int, default=50, help="tenant namespaces to spread over")
    p.add_argument("--window", type=float, default=120.0, help="steady-state seconds counted")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds after all are Running")
    p.add_argument("--progress-every", type=float, default=5.0, help="sidecar event period")
    p.add_argument("--settle-timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--world", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.forward = None
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.world:
        if os.environ.get("BENCH_PROFILE"):
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            try:
                asyncio.run(world(args))
            finally:
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
            return {}
        asyncio.run(world(args))
        return {}
    args.forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(operate(args))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return result


if __name__ == "__main__":
    main()
