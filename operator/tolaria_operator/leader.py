"""`LeaderElector`: one active operator among replicas, by a `coordination.k8s.io/v1` Lease, the
way client-go's `leaderelection` does it.

Why not kopf's peering: peers of equal priority all keep running, and a higher-priority peer
pauses the others only after it has been seen, so two operators may handle the same run. A
Lease is taken with optimistic concurrency instead: the holder renews it every retry period;
a standby takes it only when the holder has not renewed it for the lease duration, or when it
was released.

Expiry is judged by this process's own clock (when did *I* last see the record change), never
by comparing the holder's `renewTime` with the local wall clock: the two machines' clocks
may disagree, the local monotonic clock cannot jump. Every write carries the
`resourceVersion` it read, so of two standbys taking an expired lease at once the API server
lets one win and answers the other 409 Conflict. The writes are JSON merge patches with
`metadata.resourceVersion` (a precondition the API server enforces on a patch as on a PUT),
through `KubeApi.patch`, so the Lease needs `get`, `create` and `patch`.

A leader that cannot renew within the renew deadline has LOST the lease: it must stop at once
(`on_lost`; in production a critical log and `os._exit(1)`, crash-only), because the next
leader may start as soon as the lease duration has passed. A clean stop releases the lease
(empty holder), so the standby takes over at its next retry instead of after expiry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import config as kube_config
from kubernetes.client import Configuration

from tolaria_operator.clock import Clock, SystemClock
from tolaria_operator.errors import KubeApiError, ObjectExists
from tolaria_operator.protocols import Kube
from tolaria_operator.resources import LEASES

logger = logging.getLogger(__name__)


def default_identity() -> str:
    """The pod's name (its hostname in Kubernetes) and a random suffix: a restarted pod, or two
    processes on one host, never mistake the other's lease for their own."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}_{secrets.token_hex(4)}"


def cluster_configuration() -> Configuration:
    """The API credentials, loaded here: kopf logs in only after its startup handlers ran, and
    the election runs inside one. In-cluster (with token refresh) or else the kubeconfig."""
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        kube_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


def micro_time(clock: Clock) -> str:
    """A Lease's `MicroTime`: RFC 3339 with microseconds, in UTC."""
    return clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class LeaderElector:
    """Acquires, renews and releases one Lease for one identity (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_lost: Callable[[], None],
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = _loop_time,
        on_leading: Callable[[bool], None] | None = None,
    ) -> None:
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._on_lost = on_lost
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._monotonic = monotonic
        """The local clock expiry is judged by (the event loop's, which looptime fakes)."""
        self._on_leading = on_leading
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._resource_version = ""
        self.is_leader = False

    # -- one attempt ----------------------------------------------------------------------

    def _observe(self, lease: Mapping[str, Any]) -> dict[str, Any]:
        """Remember the record and when it last changed, by the local clock."""
        spec = dict(lease.get("spec") or {})
        if spec != self._observed:
            self._observed = spec
            self._observed_at = self._monotonic()
        self._resource_version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        return spec

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration_s)),
            "acquireTime": acquire_time,
            "renewTime": micro_time(self._clock),
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this identity holds the lease afterwards. False when another
        holder's lease has not expired, or another writer won a race (409)."""
        lease = await self._kube.get(LEASES, self.namespace, self.name)
        if lease is None:
            body = {
                "apiVersion": LEASES.api_version,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(micro_time(self._clock), 0),
            }
            try:
                created = await self._kube.create(LEASES, self.namespace, body)
            except ObjectExists:
                return False  # another replica created it first
            self._observe(created or body)
            return True
        spec = self._observe(lease)
        holder = str(spec.get("holderIdentity") or "")
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        expired = self._monotonic() >= self._observed_at + duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new = self._spec(str(spec.get("acquireTime") or micro_time(self._clock)), transitions)
        else:
            new = self._spec(micro_time(self._clock), transitions + 1)
        patch = {"metadata": {"resourceVersion": self._resource_version}, "spec": new}
        try:
            updated = await self._kube.patch(LEASES, self.namespace, self.name, patch)
        except ObjectExists:
            return False  # the record changed since it was read: another writer won
        if updated is None:
            return False  # deleted meanwhile; the next attempt creates it
        self._observe(updated)
        return True

    # -- the life of a leader ---------------------------------------------------------------

    def _lead(self, leading: bool) -> None:
        self.is_leader = leading
        if self._on_leading is not None:
            self._on_leading(leading)

    async def acquire(self) -> None:
        """Returns once this identity holds the lease; retries every retry period meanwhile
        (API errors included: a standby keeps waiting)."""
        logger.info("waiting for the leader lease %s/%s", self.namespace, self.name)
        while True:
            try:
                if await self.try_acquire_or_renew():
                    break
            except KubeApiError as err:
                logger.warning("leader lease not acquired: %s", err)
            await asyncio.sleep(self.retry_period_s)
        self._lead(True)
        logger.info("leader lease %s/%s acquired as %s", self.namespace, self.name, self.identity)

    async def renew_forever(self) -> None:
        """Renews every retry period. When no renewal succeeded within the renew deadline, or
        the lease names another holder, leadership is lost: `on_lost` is called (and this
        returns, when `on_lost` does)."""
        last_renewed = self._monotonic()
        while True:
            await asyncio.sleep(self.retry_period_s)
            left = self.renew_deadline_s - (self._monotonic() - last_renewed)
            try:
                renewed = await asyncio.wait_for(
                    self.try_acquire_or_renew(), timeout=max(left, self.retry_period_s)
                )
            except (KubeApiError, TimeoutError) as err:
                logger.warning("leader lease not renewed: %s", err)
                renewed = False
            if renewed:
                last_renewed = self._monotonic()
                continue
            holder = (self._observed or {}).get("holderIdentity") or ""
            taken = holder not in ("", self.identity)
            if taken or self._monotonic() - last_renewed >= self.renew_deadline_s:
                self._lead(False)
                logger.critical(
                    "leader lease %s/%s lost by %s (%s)",
                    self.namespace,
                    self.name,
                    self.identity,
                    "taken by another holder" if taken else "not renewed within the deadline",
                )
                self._on_lost()
                return

    async def release(self) -> None:
        """Gives the lease up (empty holder) so a standby takes over at its next retry, not
        after expiry. Best effort: a failed release only delays the takeover."""
        if not self.is_leader:
            return
        self._lead(False)
        patch = {
            "metadata": {"resourceVersion": self._resource_version},
            "spec": {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(self._clock),
            },
        }
        try:
            await self._kube.patch(LEASES, self.namespace, self.name, patch)
        except KubeApiError as err:
            logger.warning("leader lease not released (the standby waits for expiry): %s", err)
        else:
            logger.info("leader lease %s/%s released", self.namespace, self.name)

    async def close(self) -> None:
        """Closes the client's connections, when it has any to close."""
        close = getattr(self._kube, "close", None)
        if close is not None:
            await close()


def exit_now() -> None:
    """Production `on_lost`: leave at once, without cleanup. A graceful shutdown would keep
    handling runs while the next leader starts; the Deployment restarts this pod as a
    standby."""
    logging.shutdown()
    os._exit(1)
