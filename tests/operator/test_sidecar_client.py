"""The operator's gRPC link against a real `SidecarControl` server on 127.0.0.1: the token
(derived from the run's UID, never read from a Secret), unreachable sidecars, acknowledgement
deadlines and a resumable event stream (R10.4, R10.5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from leyline import EmergencySignal
from tests.operator.builders import T0, run_body, run_object
from tests.operator.fake_kube import FakeKube
from tests.operator.fake_sidecar import FakeSidecar, closed_port
from tolaria_operator.config import SidecarLinkSettings, TokenSettings
from tolaria_operator.control_tls import ControlCA
from tolaria_operator.errors import AckTimeout, SidecarUnavailable
from tolaria_operator.resources import RUNS
from tolaria_operator.sidecar_client import SidecarClient, SidecarConnector, template_resolver
from tolaria_operator.tokens import RunTokens, derive_token

SETTINGS = SidecarLinkSettings(connect_timeout_seconds=5.0)


@pytest_asyncio.fixture
async def sidecar() -> AsyncIterator[FakeSidecar]:
    fake = FakeSidecar("r1", lambda: "s3cret", lambda: T0)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def client(fake: FakeSidecar, token: str = "s3cret") -> SidecarClient:
    return SidecarClient("default/r1", f"127.0.0.1:{fake.port}", token, SETTINGS)


@pytest.mark.req("R10.5")
@pytest.mark.asyncio
async def test_calls_carry_the_run_token(sidecar: FakeSidecar) -> None:
    async with client(sidecar) as link:
        status = await link.get_status()
    assert status.run_id == "r1" and sidecar.refused == 0


@pytest.mark.req("R10.5")
@pytest.mark.asyncio
async def test_a_refused_token_makes_the_sidecar_unavailable(sidecar: FakeSidecar) -> None:
    async with client(sidecar, token="wrong") as link:
        with pytest.raises(SidecarUnavailable, match="UNAUTHENTICATED"):
            await link.get_status()
    assert sidecar.refused == 1


@pytest.mark.req("R10.4")
@pytest.mark.asyncio
async def test_nothing_listening_is_unavailable() -> None:
    async with SidecarClient("default/r1", f"127.0.0.1:{closed_port()}", "t", SETTINGS) as link:
        with pytest.raises(SidecarUnavailable, match="UNAVAILABLE"):
            await link.get_status()


@pytest.mark.req("R10.4")
@pytest.mark.asyncio
async def test_an_acknowledged_signal_returns_the_ack_and_a_silent_one_times_out(
    sidecar: FakeSidecar,
) -> None:
    async with client(sidecar) as link:
        ack = await link.signal_emergency(
            EmergencySignal(version=1, level=4, incident_id="i-1"), 0.1
        )
        assert ack.generation == 1 and sidecar.signals[0].incident_id == "i-1"
        sidecar.acknowledge = False
        with pytest.raises(AckTimeout):
            await link.signal_emergency(EmergencySignal(version=1, level=4, incident_id="i-1"), 0.1)


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_the_event_stream_resumes_after_the_last_sequence(sidecar: FakeSidecar) -> None:
    sidecar.rollback_started("rb-1")
    sidecar.rollback_finished("rb-1")
    async with client(sidecar) as link:
        stream = link.events(0)
        first = await anext(stream)
        await stream.aclose()
        resumed = link.events(first.sequence)
        second = await anext(resumed)
        await resumed.aclose()
    assert first.WhichOneof("event") == "rollback_started"
    assert (
        second.WhichOneof("event") == "rollback_finished" and second.sequence == first.sequence + 1
    )


@pytest.mark.req("R10.1")
@pytest.mark.asyncio
async def test_a_checkpoint_request_returns_the_durable_record(sidecar: FakeSidecar) -> None:
    async with client(sidecar) as link:
        answer = await link.request_checkpoint("suspend", stop_after=True, timeout_s=30.0)
    assert answer.checkpoint.checkpoint_id == "ckpt-0007"
    assert (sidecar.checkpoint_requests[0].reason, sidecar.checkpoint_requests[0].stop_after) == (
        "suspend",
        True,
    )


@pytest.mark.req("R10.5")
@pytest.mark.asyncio
async def test_the_connector_derives_the_token_from_the_runs_uid_and_reads_no_secret() -> None:
    key = b"k" * 32
    run = run_object()
    sidecar = FakeSidecar("r1", lambda: derive_token(key, "default", "r1", run.uid), lambda: T0)
    await sidecar.start(ControlCA(key).issue("default", "r1"))
    kube = FakeKube()
    connector = SidecarConnector(
        kube,
        SETTINGS,
        control_port=7070,
        tokens=RunTokens(kube, TokenSettings(), "", key=key),
        resolve=lambda ns, name, port: f"127.0.0.1:{sidecar.port}",
    )
    try:
        with pytest.raises(SidecarUnavailable, match="the run does not exist"):
            await connector.open("default", "r1")
        await kube.create(RUNS, "default", run_body("r1"))
        async with await connector.open("default", "r1") as link:
            assert (await link.get_status()).run_id == "r1"
    finally:
        await sidecar.stop()
    assert {plural for _, plural, _ in kube.calls} == {"tolariaruns"}
    assert sidecar.refused == 0


@pytest.mark.req("R10.5")
@pytest.mark.asyncio
async def test_a_run_made_again_under_its_name_gets_another_token() -> None:
    kube = FakeKube()
    tokens = RunTokens(kube, TokenSettings(), "", key=b"k" * 32)
    connector = SidecarConnector(kube, SETTINGS, control_port=7070, tokens=tokens)
    await kube.create(RUNS, "default", run_body("r1", uid="11111111-aaaa"))
    first = await connector.token("default", "r1")
    await kube.delete(RUNS, "default", "r1")
    await kube.create(RUNS, "default", run_body("r1", uid="22222222-bbbb"))
    assert await connector.token("default", "r1") != first


def test_the_default_address_is_the_headless_service() -> None:
    resolve = template_resolver(SidecarLinkSettings().address_template)
    assert resolve("team-a", "r1", 7070) == "r1-sidecar.team-a.svc:7070"
