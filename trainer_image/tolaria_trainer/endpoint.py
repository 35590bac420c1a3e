"""The metrics endpoint's listening socket: bound once, at the edge, refused by name when taken.

`tolaria run` binds it in the supervisor before it creates anything or starts a child, so a
port in use is exit 2 with nothing on disk, and hands the bound socket to every trainer attempt
(`--metrics-fd`): the trainer serves /metrics on it, and a restarted trainer keeps the URL. A
trainer started on its own (a pod, `tolaria run --no-sidecar`) binds it in `runtime.build`,
before the run directory exists. Either way a bind that fails is `MetricsPortUnavailable`
naming the flag or field the port came from, never a traceback.

Imports neither torch nor prometheus_client: the supervisor uses it.
"""

from __future__ import annotations

import errno
import socket

from leyline.spec import TelemetrySpec
from tolaria_trainer.errors import MetricsPortUnavailable

PORT_FLAG = "--metrics-port"
PORT_FIELD = "spec.telemetry.metricsPort"
ADDRESS_FIELD = "spec.telemetry.metricsAddress"
LISTEN_BACKLOG = 16
"""Pending scrapes queued while no trainer accepts (between a crash and the restart)."""


def metrics_port(telemetry: TelemetrySpec, flag_port: int | None) -> tuple[int, str] | None:
    """The port to serve on and the flag or field it came from; None when metrics are off.

    `--metrics-port` wins, and its 0 picks a free port; in the manifest 0 means off.
    """
    if flag_port is not None:
        return flag_port, PORT_FLAG
    if telemetry.metrics_port:
        return telemetry.metrics_port, PORT_FIELD
    return None


def bind_metrics_socket(address: str, port: int, *, field: str) -> socket.socket:
    """A listening TCP socket on `address:port` (port 0: a free one, read it back with
    `getsockname`).

    Raises `MetricsPortUnavailable` naming `field` when the port is in use or may not be
    bound, and naming `spec.telemetry.metricsAddress` when the address does not resolve or
    is not this machine's.
    SO_REUSEADDR as in `http.server`: a port left in TIME_WAIT by an earlier run is free,
    one another process listens on is not.
    """
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        reason = err.strerror or str(err)
        raise MetricsPortUnavailable(ADDRESS_FIELD, address, port, reason) from err
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRNOTAVAIL:
            raise MetricsPortUnavailable(
                ADDRESS_FIELD, address, port, "not an address of this machine"
            ) from err
        reason = (
            "the port is already in use"
            if err.errno == errno.EADDRINUSE
            else (err.strerror or str(err))
        )
        raise MetricsPortUnavailable(field, address, port, reason) from err
    return sock


def open_metrics_socket(telemetry: TelemetrySpec, flag_port: int | None) -> socket.socket | None:
    """The bound metrics socket this run serves on, or None when metrics are off."""
    chosen = metrics_port(telemetry, flag_port)
    if chosen is None:
        return None
    port, field = chosen
    return bind_metrics_socket(telemetry.metrics_address, port, field=field)


def metrics_url(sock: socket.socket) -> str:
    """Where a scraper finds the metrics served on `sock` (the port it really bound)."""
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"
