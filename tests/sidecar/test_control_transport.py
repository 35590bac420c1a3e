"""The control port's transport (issue 9): TLS with the certificate the operator issues, plain
text on loopback only, and a bounded number of event streams so a control call always gets a
thread. Real gRPC servers (`serving.serve`) and the operator's own issuance and client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from leyline.spec import TolariaRun
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import SidecarControlStub
from tests.sidecar.conftest import TOKEN, Served
from tests.sidecar.doubles import INSTANCE_ID, short_dir
from tolaria_operator.config import SidecarLinkSettings
from tolaria_operator.control_tls import ControlCA, service_names, tls_name
from tolaria_operator.errors import SidecarUnavailable
from tolaria_operator.sidecar_client import SidecarClient
from tolaria_sidecar.auth import bearer
from tolaria_sidecar.config import SidecarConfig, Tuning
from tolaria_sidecar.errors import ConfigInvalid
from tolaria_sidecar.serving import Running, serve

KEY = b"operator-token-key-for-tests-32b"
NAMESPACE, RUN = "team-a", "r1"
LINK = SidecarLinkSettings(connect_timeout_seconds=5.0)
OLD_POOL = 8
"""The control pool size before the stream cap: this many streams used to take every thread."""


@pytest.fixture
def tls_sidecar(run: TolariaRun, shm_dir: Path, tmp_path: Path) -> Iterator[Running]:
    """An in-process sidecar serving control over TLS with a certificate the operator's CA
    issued for `NAMESPACE/RUN`, written where a pod mounts its Secret."""
    issued = ControlCA(KEY).issue(NAMESPACE, RUN)
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    with short_dir() as directory:
        config = SidecarConfig.from_run(
            run,
            socket_path=directory / "s.sock",
            checkpoint_dir=tmp_path / "checkpoints",
            control_address="127.0.0.1:0",
            token=TOKEN,
            tls_cert=tmp_path / "tls.crt",
            tls_key=tmp_path / "tls.key",
            instance_id=INSTANCE_ID,
        )
        running = serve(config)
        try:
            yield running
        finally:
            running.stop()


def status_via(running: Running, *, root_ca: bytes | None, name: str = "") -> pb.SidecarStatus:
    """`GetStatus` through the operator's client with the given trust."""

    async def call() -> pb.SidecarStatus:
        address = f"127.0.0.1:{running.control_port}"
        async with SidecarClient(
            f"{NAMESPACE}/{RUN}", address, TOKEN, LINK, root_ca=root_ca, tls_name=name
        ) as link:
            return await link.get_status()

    return asyncio.run(call())


def test_the_operators_client_calls_a_tls_sidecar_trusting_its_ca(tls_sidecar: Running) -> None:
    status = status_via(tls_sidecar, root_ca=ControlCA(KEY).cert_pem, name=tls_name(NAMESPACE, RUN))
    assert status.run_id == tls_sidecar.sidecar.config.run_id


def test_a_client_trusting_another_ca_is_refused(tls_sidecar: Running) -> None:
    other = ControlCA(b"another-operator-key-of-32-bytes").cert_pem
    with pytest.raises(SidecarUnavailable, match="UNAVAILABLE"):
        status_via(tls_sidecar, root_ca=other, name=tls_name(NAMESPACE, RUN))


def test_a_plain_text_client_is_refused(tls_sidecar: Running) -> None:
    with pytest.raises(SidecarUnavailable, match="UNAVAILABLE"):
        status_via(tls_sidecar, root_ca=None)


def test_a_certificate_of_another_run_does_not_answer_for_this_one(tls_sidecar: Running) -> None:
    """The client checks the run's Service name, not just the CA: every run's certificate
    comes from the same CA."""
    with pytest.raises(SidecarUnavailable, match="UNAVAILABLE"):
        status_via(tls_sidecar, root_ca=ControlCA(KEY).cert_pem, name=tls_name(NAMESPACE, "r2"))


def test_the_certificate_names_the_runs_service_and_is_issued_by_the_ca() -> None:
    ca = ControlCA(KEY)
    cert = x509.load_pem_x509_certificate(ca.issue(NAMESPACE, RUN).cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == service_names(NAMESPACE, RUN)
    assert tls_name(NAMESPACE, RUN) in service_names(NAMESPACE, RUN)
    cert.verify_directly_issued_by(ca.cert)


def test_the_ca_is_derived_so_a_restarted_operator_trusts_certificates_issued_before() -> None:
    issued = x509.load_pem_x509_certificate(ControlCA(KEY).issue(NAMESPACE, RUN).cert_pem)
    issued.verify_directly_issued_by(ControlCA(KEY).cert)  # a new instance: same CA
    with pytest.raises(InvalidSignature):
        issued.verify_directly_issued_by(ControlCA(b"another-operator-key-of-32-bytes").cert)


@pytest.mark.parametrize("address", ["0.0.0.0:7070", "10.1.2.3:7070", "sidecar:7070"])
def test_a_non_loopback_control_address_without_tls_is_refused(
    run: TolariaRun, tmp_path: Path, address: str
) -> None:
    with pytest.raises(ConfigInvalid, match="--tls-cert"):
        SidecarConfig.from_run(
            run, socket_path=tmp_path / "s.sock", control_address=address, token=TOKEN
        )


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:0", "[::1]:0"])
def test_plain_text_stays_available_on_loopback(
    run: TolariaRun, tmp_path: Path, address: str
) -> None:
    config = SidecarConfig.from_run(
        run, socket_path=tmp_path / "s.sock", control_address=address, token=TOKEN
    )
    assert config.tls is None


def test_a_key_that_is_not_the_certificates_is_refused(run: TolariaRun, tmp_path: Path) -> None:
    ca = ControlCA(KEY)
    (tmp_path / "tls.crt").write_bytes(ca.issue(NAMESPACE, RUN).cert_pem)
    (tmp_path / "tls.key").write_bytes(ca.issue(NAMESPACE, RUN).key_pem)
    with pytest.raises(ConfigInvalid, match="--tls-key"):
        SidecarConfig.from_run(
            run,
            socket_path=tmp_path / "s.sock",
            control_address="0.0.0.0:0",
            token=TOKEN,
            tls_cert=tmp_path / "tls.crt",
            tls_key=tmp_path / "tls.key",
        )


# -- bounded event streams ------------------------------------------------------------------


def open_streams(control: SidecarControlStub, count: int) -> list[grpc.Future]:
    """`count` event streams, each waiting for its first event (so each holds a thread)."""
    return [
        control.StreamEvents(pb.StreamEventsRequest(after_sequence=1 << 62), metadata=bearer(TOKEN))
        for _ in range(count)
    ]


def first_error(stream: grpc.Future, wait_s: float) -> grpc.StatusCode | None:
    """The stream's status code once it ends within `wait_s`; None while it is still open."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if stream.done():
            return stream.code()
        time.sleep(0.02)
    return None


def refused(streams: list[grpc.Future], count: int, wait_s: float = 60.0) -> list[grpc.Future]:
    """Waits (on progress, not a fixed time) until `count` of `streams` ended; returns them
    after checking each was refused for the cap. The others hold the server's places."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ended = [s for s in streams if s.done()]
        if len(ended) >= count:
            assert [s.code() for s in ended] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * count
            return ended
        time.sleep(0.02)
    raise AssertionError(f"{count} of {len(streams)} streams should have been refused")


Start = Callable[..., Served]


def test_with_the_stream_cap_reached_get_status_still_answers(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    cap = Tuning().event_streams
    streams = open_streams(served.control, cap + 1)
    try:
        refused(streams, 1)  # every place is held
        status = served.control.GetStatus(pb.GetStatusRequest(), metadata=served.auth, timeout=30)
        assert status.run_id
        assert sum(not s.done() for s in streams) == cap
    finally:
        for stream in streams:
            stream.cancel()


def test_one_stream_beyond_the_cap_is_refused_with_resource_exhausted(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    cap = Tuning().event_streams
    streams = open_streams(served.control, cap + 1)
    try:
        (_,) = refused(streams, 1)
        assert first_error(next(s for s in streams if not s.done()), 0.5) is None
    finally:
        for stream in streams:
            stream.cancel()


def test_as_many_streams_as_the_old_pool_had_threads_leave_get_status_an_answer(
    serve_sidecar: Start,
) -> None:
    """Eight open streams used to take all eight control threads: `GetStatus` then waited
    for a thread until its deadline."""
    served = serve_sidecar()
    streams = open_streams(served.control, OLD_POOL)
    try:
        refused(streams, OLD_POOL - Tuning().event_streams)
        status = served.control.GetStatus(pb.GetStatusRequest(), metadata=served.auth, timeout=30)
        assert status.run_id
    finally:
        for stream in streams:
            stream.cancel()


def test_a_closed_stream_frees_its_place(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    cap = Tuning().event_streams
    streams = open_streams(served.control, cap + 1)
    refused(streams, 1)
    held = [s for s in streams if not s.done()]
    held.pop().cancel()
    replacement: grpc.Future | None = None
    deadline = time.monotonic() + 60  # the server notices within its idle poll period
    try:
        while time.monotonic() < deadline:
            (replacement,) = open_streams(served.control, 1)
            if first_error(replacement, 1.0) is None:
                break
            assert replacement.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("no place came free after a stream closed")
    finally:
        for stream in [*held, *([replacement] if replacement else [])]:
            stream.cancel()
