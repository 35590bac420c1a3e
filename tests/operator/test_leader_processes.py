"""Two real operator processes (`python -m tolaria_operator`, election on, short lease timings)
against kmock: only the Lease holder handles runs; when it is SIGKILLed the standby takes the
Lease after it expires and carries on, with no run lost and none handled twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.operator.builders import run_body
from tests.operator.fake_sidecar import closed_port
from tests.operator.harness import REAL_DEADLINE_S, Cluster, configure_kmock

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

OPERATOR_NAMESPACE = "tolaria-system"
LEASE = "tolaria-operator-leader"
LEASE_DURATION_S = 3
LONG_START = {"failurePolicy": {"podStartTimeoutSeconds": 86_400}}
"""Pods in kmock never start by themselves; keep the start timeout out of the way."""

LAUNCHER = """
import sys
import kopf
from tolaria_operator.__main__ import main

@kopf.on.startup()
def kmock_friendly(settings: kopf.OperatorSettings, **_: object) -> None:
    # as the in-process harness does: kmock 0.8 fails cluster-wide namespace lists, and
    # Events are not what this test is about
    settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.watching.server_timeout = 30

sys.exit(main(sys.argv[1:]))
"""
"""`tolaria-operator` itself, with kopf set up for kmock the way `harness.Cluster` does (the
CLI has no flags for kopf's scanning), by one more startup handler in kopf's registry."""


class Operator:
    """One operator process; its output goes to a file the test reads."""

    def __init__(self, name: str, tmp_path: Path, kubeconfig: Path) -> None:
        self.name = name
        self.log = tmp_path / f"{name}.log"
        self.metrics_port = closed_port()
        launcher = tmp_path / "launch_operator.py"
        launcher.write_text(LAUNCHER, encoding="utf-8")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TOLARIA_OPERATOR_")},
            "KUBECONFIG": str(kubeconfig),
            "POD_NAME": name,
            "POD_NAMESPACE": OPERATOR_NAMESPACE,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        sets = {
            "leader_election.enabled": "true",
            "leader_election.lease_name": LEASE,
            "leader_election.lease_duration_seconds": str(LEASE_DURATION_S),
            "leader_election.renew_deadline_seconds": "2",
            "leader_election.retry_period_seconds": "0.5",
            "metrics.port": str(self.metrics_port),
            "metrics.address": "127.0.0.1",
            "retention.sweep_interval_seconds": "0",
        }
        args = [sys.executable, str(launcher), "-n", "default", "--standalone", "--verbose"]
        args += [f"--set={k}={v}" for k, v in sets.items()]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def output_until_leader(self) -> str:
        """What it logged before it held the lease (all of it if it never did)."""
        return self.output().split("acquired as", 1)[0]

    async def leader_gauge(self) -> float | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
            ):
                text = await response.text()
        except aiohttp.ClientError:
            return None
        for line in text.splitlines():
            if line.startswith("tolaria_operator_leader "):
                return float(line.split()[1])
        return None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    async def terminate(self, cluster: Cluster) -> None:
        """SIGTERM, then wait without blocking the loop (kmock serves from it)."""
        self.process.terminate()
        await cluster.eventually(f"{self.name} exits", lambda: self.process.poll() is not None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


@pytest.fixture
def operators() -> Iterator[list[Operator]]:
    started: list[Operator] = []
    yield started
    for operator in started:
        operator.stop()


async def eventually_async(what: str, probe: Callable[[], Awaitable[Any]]) -> Any:
    """`Cluster.eventually` for an awaitable probe (same generous real deadline)."""
    end = time.monotonic() + REAL_DEADLINE_S
    while time.monotonic() < end:
        if (found := await probe()) is not None:
            return found
        await asyncio.sleep(0.2)
    pytest.fail(f"{what}: not within {REAL_DEADLINE_S:.0f} s")


def lease_holder(cluster: Cluster) -> str:
    lease = cluster.get("leases", OPERATOR_NAMESPACE, LEASE) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def pod_names(cluster: Cluster) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods())


@pytest.mark.slow
@pytest.mark.asyncio
async def test_when_the_leader_is_killed_the_standby_takes_over_losing_and_doubling_no_run(
    kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operators: list[Operator]
) -> None:
    configure_kmock(kmock, tmp_path, monkeypatch)
    cluster = Cluster(kmock)
    kubeconfig = tmp_path / "kubeconfig"

    first = Operator("op-a", tmp_path, kubeconfig)
    operators.append(first)
    await cluster.eventually("op-a leads", lambda: lease_holder(cluster).startswith("op-a_"))
    second = Operator("op-b", tmp_path, kubeconfig)
    operators.append(second)
    await cluster.eventually(
        "op-b waits as a standby", lambda: "waiting for the leader lease" in second.output()
    )
    await eventually_async("op-b serves its metrics", second.leader_gauge)

    # the leader handles the first run; the standby does not
    await cluster.create_run(run_body("r1", spec=LONG_START))
    await cluster.eventually("r1's pod", lambda: cluster.get("pods", "default", "r1-a1"))
    await cluster.eventually(
        "r1 records its attempt", lambda: cluster.run_status("r1").get("attempt") == 1
    )
    await asyncio.sleep(2 * LEASE_DURATION_S)  # time for a standby to (wrongly) act
    assert pod_names(cluster) == ["r1-a1"]
    assert lease_holder(cluster).startswith("op-a_")
    assert await second.leader_gauge() == 0.0
    assert "acquired as" not in second.output()

    # kill the leader outright: no release, the lease must expire
    first.kill()
    await cluster.create_run(run_body("r2", spec=LONG_START))
    await cluster.eventually("op-b leads", lambda: lease_holder(cluster).startswith("op-b_"))
    await cluster.eventually("op-b logs it leads", lambda: "acquired as op-b_" in second.output())
    standby_log = second.output_until_leader()
    assert "Handler" not in standby_log, standby_log  # kopf ran no handler while it waited
    assert "reconcile_run" not in standby_log, standby_log

    await cluster.eventually("r2's pod", lambda: cluster.get("pods", "default", "r2-a1"))
    await cluster.eventually(
        "r2 records its attempt", lambda: cluster.run_status("r2").get("attempt") == 1
    )
    await cluster.eventually(
        "op-b resumed r1", lambda: "[default/r1]" in second.output().split("acquired as", 1)[1]
    )
    await asyncio.sleep(2 * LEASE_DURATION_S)  # time for a double handling to show
    assert pod_names(cluster) == ["r1-a1", "r2-a1"]
    assert cluster.run_status("r1").get("attempt") == 1
    assert cluster.run_status("r1").get("podName") == "r1-a1"
    assert await second.leader_gauge() == 1.0
    lease = cluster.get("leases", OPERATOR_NAMESPACE, LEASE) or {}
    assert lease["spec"]["leaseTransitions"] == 1

    # a clean stop releases the lease for the next standby
    await second.terminate(cluster)
    assert "leader lease tolaria-system/tolaria-operator-leader released" in second.output()
    assert lease_holder(cluster) == ""
