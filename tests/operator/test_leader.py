"""Leader election on a Lease (`leader.LeaderElector`) against kmock, with looptime for time: the
lease timings are the defaults (15 s duration, 10 s renew deadline, 2 s retry) and cost no
real time. Expiry is judged by the event loop's clock, which looptime drives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from kubernetes.client import Configuration

from tolaria_operator.errors import KubeApiError, ObjectExists
from tolaria_operator.kube import KubeApi
from tolaria_operator.leader import LeaderElector
from tolaria_operator.resources import LEASES, Resource

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NAMESPACE = "tolaria-system"
LEASE = "tolaria-operator-leader"
DURATION_S = 15.0
DEADLINE_S = 10.0
RETRY_S = 2.0


@pytest_asyncio.fixture
async def api(kmock: Any) -> AsyncIterator[KubeApi]:
    kmock.resources.load_bundled()  # coordination.k8s.io/v1 leases are among kmock's own
    client = KubeApi(Configuration(host=str(kmock.url).rstrip("/")))
    try:
        yield client
    finally:
        await client.close()


def elector(kube: Any, identity: str, on_lost: Callable[[], None] | None = None) -> LeaderElector:
    return LeaderElector(
        kube,
        namespace=NAMESPACE,
        name=LEASE,
        identity=identity,
        on_lost=on_lost or (lambda: None),
        lease_duration_s=DURATION_S,
        renew_deadline_s=DEADLINE_S,
        retry_period_s=RETRY_S,
    )


async def holder(api: KubeApi) -> str:
    lease = await api.get(LEASES, NAMESPACE, LEASE)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


async def transitions(api: KubeApi) -> int:
    lease = await api.get(LEASES, NAMESPACE, LEASE)
    return int(((lease or {}).get("spec") or {}).get("leaseTransitions") or 0)


async def cancelled(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_first_elector_creates_the_lease_and_leads(api: KubeApi) -> None:
    first = elector(api, "a")
    await asyncio.wait_for(first.acquire(), timeout=5)
    assert first.is_leader
    assert await holder(api) == "a"
    lease = await api.get(LEASES, NAMESPACE, LEASE)
    assert lease is not None
    assert lease["spec"]["leaseDurationSeconds"] == DURATION_S
    assert lease["spec"]["leaseTransitions"] == 0


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_second_elector_waits_while_the_leader_renews(api: KubeApi) -> None:
    first, second = elector(api, "a"), elector(api, "b")
    await first.acquire()
    renewing = asyncio.create_task(first.renew_forever())
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(10 * DURATION_S)  # ten lease durations, all renewed
    assert not waiting.done()
    assert not second.is_leader
    assert first.is_leader
    assert await holder(api) == "a"
    await cancelled(renewing, waiting)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_when_the_leader_stops_renewing_the_standby_takes_over_after_expiry(
    api: KubeApi,
) -> None:
    """The leader is killed: its renewal stops, nothing releases the lease."""
    loop = asyncio.get_running_loop()
    first, second = elector(api, "a"), elector(api, "b")
    await first.acquire()
    renewing = asyncio.create_task(first.renew_forever())
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(3 * RETRY_S)
    await cancelled(renewing)
    killed_at = loop.time()
    await asyncio.wait_for(waiting, timeout=4 * DURATION_S)
    assert second.is_leader
    assert await holder(api) == "b"
    assert await transitions(api) == 1
    assert loop.time() - killed_at >= DURATION_S - RETRY_S  # not before the lease expired


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_clean_release_hands_over_at_once(api: KubeApi) -> None:
    loop = asyncio.get_running_loop()
    first, second = elector(api, "a"), elector(api, "b")
    await first.acquire()
    renewing = asyncio.create_task(first.renew_forever())
    waiting = asyncio.create_task(second.acquire())
    await asyncio.sleep(3 * RETRY_S)
    await cancelled(renewing)
    await first.release()
    released_at = loop.time()
    assert not first.is_leader
    await asyncio.wait_for(waiting, timeout=4 * DURATION_S)
    assert await holder(api) == "b"
    assert loop.time() - released_at <= 2 * RETRY_S  # its next retry, not the lease's expiry


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_leader_that_cannot_renew_within_the_deadline_calls_on_lost(
    api: KubeApi,
) -> None:
    loop = asyncio.get_running_loop()
    lost_at: list[float] = []
    broken = BreakableKube(api)
    first = elector(broken, "a", on_lost=lambda: lost_at.append(loop.time()))
    await first.acquire()
    renewing = asyncio.create_task(first.renew_forever())
    await asyncio.sleep(3 * RETRY_S)
    broken.broken = True
    broken_at = loop.time()
    await asyncio.wait_for(renewing, timeout=4 * DURATION_S)
    assert len(lost_at) == 1
    assert not first.is_leader
    # it gives up after the renew deadline, before the others may take the lease
    assert DEADLINE_S - RETRY_S <= lost_at[0] - broken_at < DURATION_S


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_leader_whose_lease_another_holder_took_calls_on_lost(api: KubeApi) -> None:
    lost: list[bool] = []
    first = elector(api, "a", on_lost=lambda: lost.append(True))
    await first.acquire()
    renewing = asyncio.create_task(first.renew_forever())
    await api.patch(LEASES, NAMESPACE, LEASE, {"spec": {"holderIdentity": "usurper"}})
    await asyncio.wait_for(renewing, timeout=4 * DURATION_S)
    assert lost == [True]
    assert not first.is_leader


@pytest.mark.asyncio
async def test_of_two_concurrent_takers_the_one_whose_update_conflicts_does_not_lead() -> None:
    """kmock does not enforce `resourceVersion` (it merges any patch), so the API server's
    optimistic concurrency is played by `VersionedLeases`, a small in-memory stand-in that
    answers 409 to a write carrying a stale `resourceVersion`, as the API server does."""
    leases = VersionedLeases()  # released: both may take it at once
    first, second = elector(leases, "a"), elector(leases, "b")
    won = await asyncio.gather(first.try_acquire_or_renew(), second.try_acquire_or_renew())
    assert sorted(won) == [False, True]
    assert leases.spec["holderIdentity"] == ("a" if won[0] else "b")
    assert leases.conflicts == 1
    assert leases.spec["leaseTransitions"] == 1


class BreakableKube:
    """Delegates to the API until `broken`, then fails every call as an unreachable server."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self.broken = False

    def _check(self, method: str) -> None:
        if self.broken:
            raise KubeApiError(method, "/leases", 0, "ClientConnectorError", "unreachable")

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Any:
        self._check("GET")
        return await self._api.get(resource, namespace, name)

    async def create(self, resource: Resource, namespace: str | None, body: Any) -> Any:
        self._check("POST")
        return await self._api.create(resource, namespace, body)

    async def patch(self, resource: Resource, namespace: str | None, name: str, patch: Any) -> Any:
        self._check("PATCH")
        return await self._api.patch(resource, namespace, name, patch)


class VersionedLeases:
    """One Lease with a `resourceVersion` that every write must carry (else 409 Conflict).
    Each read yields to the loop, so two concurrent takers both read before either writes."""

    def __init__(self) -> None:
        self.spec: dict[str, Any] = {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "leaseTransitions": 0,
        }
        self.version = 1
        self.conflicts = 0

    def _object(self) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": str(self.version)}, "spec": dict(self.spec)}

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Any:
        seen = self._object()
        await asyncio.sleep(0)
        return seen

    async def create(self, resource: Resource, namespace: str | None, body: Any) -> Any:
        raise ObjectExists("POST", "/leases", 409, "AlreadyExists", "exists")

    async def patch(self, resource: Resource, namespace: str | None, name: str, patch: Any) -> Any:
        if patch["metadata"]["resourceVersion"] != str(self.version):
            self.conflicts += 1
            raise ObjectExists("PATCH", "/leases", 409, "Conflict", "the object has been modified")
        self.spec.update(patch["spec"])
        self.version += 1
        return self._object()
