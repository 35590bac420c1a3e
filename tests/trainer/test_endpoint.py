"""The metrics endpoint: which port and why, a bind refused by the name the user wrote, and
/metrics served on a socket bound elsewhere (real sockets on port 0, a fresh registry)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from leyline.spec import TelemetrySpec
from tolaria_trainer.endpoint import (
    bind_metrics_socket,
    metrics_port,
    metrics_url,
    open_metrics_socket,
)
from tolaria_trainer.errors import MetricsPortUnavailable
from tolaria_trainer.metrics import MetricsServer, TrainerMetrics


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.req("R8.3")
@pytest.mark.parametrize(
    ("flag", "in_manifest", "expected"),
    [
        (None, 0, None),
        (None, 9400, (9400, "spec.telemetry.metricsPort")),
        (0, 0, (0, "--metrics-port")),
        (0, 9400, (0, "--metrics-port")),
        (9401, 9400, (9401, "--metrics-port")),
    ],
)
def test_the_flag_wins_and_its_0_picks_a_port_while_the_manifests_0_is_off(
    flag: int | None, in_manifest: int, expected: tuple[int, str] | None
) -> None:
    assert metrics_port(TelemetrySpec(metrics_port=in_manifest), flag) == expected


def test_port_0_binds_a_free_port_and_the_url_names_it() -> None:
    with bind_metrics_socket("127.0.0.1", 0, field="--metrics-port") as sock:
        port = sock.getsockname()[1]
        assert port != 0 and metrics_url(sock) == f"http://127.0.0.1:{port}/metrics"


@pytest.mark.req("R13.5")
def test_a_port_in_use_is_refused_naming_the_field_and_the_port(taken_port: int) -> None:
    with pytest.raises(MetricsPortUnavailable) as info:
        open_metrics_socket(TelemetrySpec(metrics_port=taken_port), None)
    assert str(info.value) == (
        f"spec.telemetry.metricsPort: cannot serve metrics on 127.0.0.1:{taken_port}: "
        "the port is already in use"
    )
    assert (info.value.field, info.value.port) == ("spec.telemetry.metricsPort", taken_port)


def test_an_address_of_another_machine_is_refused_naming_the_address_field() -> None:
    with pytest.raises(MetricsPortUnavailable) as info:
        bind_metrics_socket("192.0.2.1", 0, field="--metrics-port")  # TEST-NET-1: nobody's
    assert str(info.value) == (
        "spec.telemetry.metricsAddress: cannot serve metrics on 192.0.2.1:0: "
        "not an address of this machine"
    )


def test_metrics_are_served_on_a_socket_bound_by_someone_else() -> None:
    sock = bind_metrics_socket("127.0.0.1", 0, field="--metrics-port")
    url = metrics_url(sock)
    server = MetricsServer(TrainerMetrics(CollectorRegistry()).registry, sock)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert url == f"http://127.0.0.1:{server.port}/metrics"
    assert 'tolaria_breaker_state{breaker="BREAKER_HOOK_TIMING"} 1.0' in body
