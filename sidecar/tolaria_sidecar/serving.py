"""The sidecar process: its gRPC servers and metrics endpoint started around a `Sidecar`, the
READY line, and a graceful stop on SIGTERM/SIGINT.

`run` is what `python -m tolaria_sidecar` (`__main__`) calls; `serve` is what the tests call
for an in-process sidecar. `start_trainer_server` serves `TrainerLink` on the Unix socket
(born mode 0600); `start_control_server` serves the token-authenticated `SidecarControl` on
TCP (TLS with the operator-issued certificate; plain text on loopback only, which `config`
enforces) and refuses to start without a token; the stop lets in-flight calls finish within
`Tuning.shutdown_grace_seconds`. Nothing here touches a slot or the disk beyond the socket:
the servicers (`trainer_link`, `sidecar_control`) and the `Sidecar` do the work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from prometheus_client import CollectorRegistry

from leyline.lifecycle import supervised
from leyline.v1.sidecar_pb2_grpc import (
    add_SidecarControlServicer_to_server,
    add_TrainerLinkServicer_to_server,
)
from tolaria_sidecar.auth import TokenAuth
from tolaria_sidecar.config import ControlAddress, ControlTls, SidecarConfig, Tuning
from tolaria_sidecar.errors import ConfigInvalid
from tolaria_sidecar.metrics import serve as serve_metrics
from tolaria_sidecar.orphan import wait_for_trainer
from tolaria_sidecar.protocols import Clock, ServicedSidecar
from tolaria_sidecar.protocols import DurableStore as StoreProtocol
from tolaria_sidecar.sidecar import Sidecar
from tolaria_sidecar.sidecar_control import SidecarControlService
from tolaria_sidecar.trainer_link import TrainerLinkService

logger = logging.getLogger(__name__)


def start_trainer_server(sidecar: ServicedSidecar, socket_path: Path, workers: int) -> grpc.Server:
    """Serves `TrainerLink` on a Unix socket created mode 0600 (a stale socket is replaced)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise ConfigInvalid("--socket", f"{socket_path} exists and is not a socket")
        socket_path.unlink()
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainer-link"))
    add_TrainerLinkServicer_to_server(TrainerLinkService(sidecar), server)
    previous = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        bound = server.add_insecure_port(f"unix:{socket_path.resolve()}")
    except RuntimeError as err:
        raise ConfigInvalid("--socket", f"cannot listen on {socket_path}: {err}") from err
    finally:
        os.umask(previous)
    if not bound:
        raise ConfigInvalid("--socket", f"cannot listen on {socket_path}")
    server.start()
    os.chmod(socket_path, 0o600)
    return server


def control_options(tuning: Tuning) -> list[tuple[str, int]]:
    """Server keepalive: idle connections are pinged and dropped when the peer is gone, and
    the operator's 10 s client pings (also on idle streams) are accepted, not GOAWAY'd."""
    return [
        ("grpc.keepalive_time_ms", int(tuning.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(tuning.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(tuning.min_client_ping_seconds * 1000),
        ),
    ]


def start_control_server(
    sidecar: ServicedSidecar,
    address: ControlAddress,
    token: str | None,
    tuning: Tuning,
    tls: ControlTls | None = None,
) -> tuple[grpc.Server, int]:
    """Serves `SidecarControl` on TCP behind `TokenAuth`, over TLS when `tls` is given;
    returns (server, bound port).

    The pool has `tuning.unary_workers` threads more than the event-stream cap, so a unary
    control call always gets a thread. Raises `TokenRequired` without a token: the control
    server is never unauthenticated.
    """
    auth = TokenAuth(token)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=tuning.control_workers, thread_name_prefix="control"),
        interceptors=[auth],
        options=control_options(tuning),
    )
    service = SidecarControlService(sidecar, max_streams=tuning.event_streams)
    add_SidecarControlServicer_to_server(service, server)
    try:
        if tls is None:
            port = server.add_insecure_port(address.target)
        else:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            port = server.add_secure_port(address.target, credentials)
    except RuntimeError as err:
        raise ConfigInvalid("--control-address", f"cannot bind {address.target}: {err}") from err
    if not port:
        raise ConfigInvalid("--control-address", f"cannot bind {address.target}")
    server.start()
    return server, port


@dataclass
class Running:
    """A started sidecar and its endpoints."""

    sidecar: Sidecar
    trainer_server: grpc.Server
    control_server: grpc.Server | None
    control_port: int | None
    metrics_server: object | None
    metrics_port: int | None

    def ready_line(self) -> str:
        config = self.sidecar.config
        control = "-"
        if config.control_address is not None and self.control_port is not None:
            control = f"{config.control_address.host}:{self.control_port}"
        metrics = "-" if self.metrics_port is None else str(self.metrics_port)
        return f"READY socket={config.socket_path} control={control} metrics={metrics}"

    def stop(self) -> None:
        """Stops accepting, lets in-flight work finish within the grace period, releases."""
        grace = self.sidecar.config.tuning.shutdown_grace_seconds
        self.sidecar.events.close()  # ends event streams, so the servers drain at once
        stopped = [self.trainer_server.stop(grace)]
        if self.control_server is not None:
            stopped.append(self.control_server.stop(grace))
        self.sidecar.stop(grace_s=grace)
        for done in stopped:
            done.wait(grace)
        shutdown = getattr(self.metrics_server, "shutdown", None)
        if shutdown is not None:
            shutdown()
        config = self.sidecar.config
        self.sidecar.release(unlink=config.cleanup_on_exit)
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        if config.remove_socket_dir:
            try:
                config.socket_path.parent.rmdir()  # only when empty: never anyone else's files
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.warning("socket directory %s left: %s", config.socket_path.parent, err)


def serve(
    config: SidecarConfig,
    *,
    registry: CollectorRegistry | None = None,
    clock: Clock | None = None,
    store: StoreProtocol | None = None,
    copy_bytes_per_second: float | None = None,
) -> Running:
    """Builds and starts everything; the caller stops it with `Running.stop`."""
    if config.control_address is not None:
        TokenAuth(config.token)  # refuse before any segment or socket is touched
    registry = registry or CollectorRegistry()
    sidecar = Sidecar(
        config,
        registry=registry,
        clock=clock,
        store=store,
        copy_bytes_per_second=copy_bytes_per_second,
    )
    trainer_server = control_server = None
    try:
        sidecar.start()
        workers = config.tuning.server_workers
        trainer_server = start_trainer_server(sidecar, config.socket_path, workers)
        control_port = metrics_port = None
        metrics_server = None
        if config.control_address is not None:
            control_server, control_port = start_control_server(
                sidecar, config.control_address, config.token, config.tuning, config.tls
            )
        if config.metrics_port is not None:
            metrics_server, metrics_port = serve_metrics(
                registry, config.metrics_port, config.metrics_address
            )
    except BaseException:
        for server in (trainer_server, control_server):
            if server is not None:
                server.stop(None)
        sidecar.stop(grace_s=0.0)
        sidecar.release(unlink=config.cleanup_on_exit)
        raise
    return Running(
        sidecar, trainer_server, control_server, control_port, metrics_server, metrics_port
    )


def run(config: SidecarConfig) -> int:
    """The sidecar process: serve, print READY, wait for SIGTERM/SIGINT, stop; exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("signal %d: stopping", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = serve(config)
        print(running.ready_line(), flush=True)  # noqa: T201 - the launcher reads this line
        while not stop.wait(0.5):  # a timed wait: signal handlers run between waits
            pass
        if supervised():  # the trainer may still be stopping and need us (orphan.py)
            wait_for_trainer(
                running.sidecar.trainer_pid, config.tuning.orphaned_trainer_wait_seconds
            )
        running.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("sidecar stopped")
    sys.stdout.flush()
    return 0
