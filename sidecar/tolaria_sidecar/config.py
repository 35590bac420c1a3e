"""The sidecar's configuration: the manifest's resilience sections plus its command-line options.

Built once by `__main__` from a `TolariaRun` manifest (`load_manifest`) and the flags, then
handed to every component, which reads the spec objects (`SnapshotSpec`, `RollbackSpec`,
`DetectionSpec`, `EmergencySpec`, `CheckpointSpec`) directly: no budget default is restated
here or anywhere else in the sidecar. Numbers that are not part of the manifest (poll periods,
buffer sizes) live in `Tuning`, each written once with the reason for its value.

Everything from outside (flags, token file, drill strings) is validated here and refused with
`ConfigInvalid` naming the flag or field; nothing in this module opens sockets or segments.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from leyline.shm import check_instance_id, new_instance_id, shm_dir
from leyline.spec import (
    CheckpointSpec,
    DetectionSpec,
    EmergencySpec,
    RollbackSpec,
    SnapshotSpec,
    TolariaRun,
)
from leyline.spec.run import NAME_MAX_LENGTH, NAME_PATTERN
from tolaria_sidecar.errors import ConfigInvalid

TOKEN_ENV = "TOLARIA_SIDECAR_TOKEN"  # noqa: S105 - a variable name, not a secret
"""Environment variable holding the run token when `--token-file` is not given."""

UNIX_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL)."""

CHECKPOINT_IO_ERROR = "checkpoint-io-error"
"""Drill: the durable write of one epoch's checkpoint fails with ENOSPC."""
CORRUPT_CHECKPOINT = "corrupt-checkpoint"
"""Drill: the file of one epoch's checkpoint is damaged on disk after its commit (bit rot)."""
SLOW_CHECKPOINT = "slow-checkpoint"
"""Drill: the durable write of one epoch's checkpoint starts `seconds` late (a slow disk)."""
SLOW_CHECKPOINT_SECONDS = 3.0
"""The slow-checkpoint drill's default delay: longer than a trainer takes to detach and fetch
the status for its report, shorter than `Tuning.shutdown_grace_seconds`."""


@dataclass(frozen=True)
class Tuning:
    """Sidecar-internal numbers that are not part of the manifest, each written only here."""

    monitor_active_interval_ms: float = 1.0
    """Emergency monitor period while an acknowledgement is outstanding: the participants
    poll every 1 ms too (R7.3), so an ack is seen within about a millisecond of its write."""
    monitor_idle_interval_ms: float = 100.0
    """Monitor period otherwise: the stall watchdog and the rollback deadline (seconds-scale
    budgets) need no finer grain, and an idle sidecar stays off the trainer's cores."""
    event_buffer: int = 10_000
    """Events kept for `StreamEvents` replay; a client further behind loses the oldest
    (counted in `tolaria_sidecar_events_dropped_total`) and sees the gap in `sequence`."""
    emergency_history: int = 1_000
    """Emergencies kept with their acks and resolution for status and the run report."""
    progress_event_interval_seconds: float = 1.0
    """At most one `progress` event per this interval, however often the trainer heartbeats."""
    bandwidth_probe_bytes: int = 64 << 20
    """Size of the one memcpy that measures copy bandwidth at the first attach: big enough to
    leave the small caches, small enough to cost ~10 ms."""
    manifest_min_bytes: int = 1 << 20
    """Smallest manifest region of a slot; manifests grow with the tensor count."""
    manifest_growth_factor: int = 4
    """Manifest region = this many times the trainer's manifest estimate (seeds add tensors)."""
    shutdown_grace_seconds: float = 5.0
    """On SIGTERM: time for an in-flight checkpoint and in-flight RPCs before they are
    abandoned (a pod's default termination grace is 30 s; this leaves room for the trainer)."""
    orphaned_trainer_wait_seconds: float = 30.0
    """On SIGTERM after the launcher died (`tolaria run` killed): how long the sidecar keeps
    serving a trainer that is still running, so that it can finish its step, detach and fetch
    the status for its report before the segments go; longer than a step plus the report."""
    server_workers: int = 8
    """gRPC worker threads of the trainer's Unix-socket server."""
    event_streams: int = 4
    """Concurrent `StreamEvents` of the control server; one more is refused at once with
    RESOURCE_EXHAUSTED. Each open stream holds a worker thread, so without a cap a few
    forgotten streams (eight, the old pool size) left no thread for `GetStatus` or
    `ResolveEmergency`. The operator keeps one stream per run; four leave room for a
    reconnect overlapping the old stream and for a human's debugging client."""
    unary_workers: int = 4
    """Control worker threads beyond `event_streams`: a unary control call always finds one,
    however many streams are open."""
    keepalive_seconds: float = 20.0
    """The control server pings an idle connection this often and drops it when the ping is
    not answered within `keepalive_timeout_seconds`: a dead operator's stream (its node gone,
    no FIN ever) frees its slot instead of holding it forever."""
    keepalive_timeout_seconds: float = 10.0
    min_client_ping_seconds: float = 5.0
    """Client pings closer together than this are a misbehaving client (the operator's
    client pings every 10 s): gRPC answers too many with GOAWAY."""

    @property
    def control_workers(self) -> int:
        return self.event_streams + self.unary_workers


@dataclass(frozen=True)
class ControlAddress:
    """`--control-address HOST:PORT` (port 0: any free port, printed on the READY line)."""

    host: str
    port: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """Reachable from this machine only: `localhost` or a loopback IP."""
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @classmethod
    def parse(cls, text: str) -> ControlAddress:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigInvalid("--control-address", f"{text!r} must be HOST:PORT")
        try:
            port = int(port_text)
        except ValueError as err:
            raise ConfigInvalid(
                "--control-address", f"port {port_text!r} must be an integer"
            ) from err
        if not 0 <= port <= 65535:
            raise ConfigInvalid("--control-address", f"port {port} must be 0..65535")
        return cls(host, port)


@dataclass(frozen=True)
class ControlTls:
    """`--tls-cert`/`--tls-key`: the PEM certificate and key the control port serves; the
    operator issues them per attempt under its CA, for the run's Service names."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, cert: Path, key: Path) -> ControlTls:
        """Reads and checks the pair: both PEM, and the key is the certificate's, so a wrong
        mount fails here naming the flag and not at the first handshake."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        cert_pem = _read_pem("--tls-cert", cert)
        key_pem = _read_pem("--tls-key", key)
        try:
            public = x509.load_pem_x509_certificate(cert_pem).public_key()
        except ValueError as err:
            raise ConfigInvalid("--tls-cert", f"{cert} is not a PEM certificate") from err
        try:
            private = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as err:
            raise ConfigInvalid("--tls-key", f"{key} is not an unencrypted PEM key") from err
        if private.public_key() != public:
            raise ConfigInvalid("--tls-key", f"{key} is not the key of {cert}")
        return cls(cert_pem, key_pem)


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigInvalid(flag, f"cannot read {path}: {err}") from err


@dataclass(frozen=True)
class CheckpointDrill:
    """A sidecar drill on the checkpoint of epoch N: `checkpoint-io-error@epoch=N` (the write
    fails with ENOSPC), `corrupt-checkpoint@epoch=N` (its file is damaged after the commit) or
    `slow-checkpoint@epoch=N[,seconds=S]` (it starts S seconds late)."""

    raw: str
    epoch: int
    name: str = CHECKPOINT_IO_ERROR
    seconds: float = 0.0
    """slow-checkpoint: the delay."""

    @classmethod
    def parse(cls, raw: str) -> CheckpointDrill:
        name, sep, rest = raw.partition("@")
        known = (CHECKPOINT_IO_ERROR, CORRUPT_CHECKPOINT, SLOW_CHECKPOINT)
        if name not in known:
            raise ConfigInvalid(
                "--inject", f"unknown sidecar drill {name!r} (known: {', '.join(known)})"
            )
        trigger, *options = rest.split(",")
        key, eq, value = trigger.partition("=")
        if not sep or key != "epoch" or not eq:
            raise ConfigInvalid("--inject", f"{raw!r}: expected {name}@epoch=N")
        try:
            epoch = int(value)
        except ValueError as err:
            raise ConfigInvalid("--inject", f"{raw!r}: epoch must be an integer") from err
        if epoch < 0:
            raise ConfigInvalid("--inject", f"{raw!r}: epoch must be >= 0")
        seconds = SLOW_CHECKPOINT_SECONDS if name == SLOW_CHECKPOINT else 0.0
        for option in options:
            key, eq, value = option.partition("=")
            if name != SLOW_CHECKPOINT or key != "seconds" or not eq:
                raise ConfigInvalid("--inject", f"{raw!r}: unknown option {option!r}")
            try:
                seconds = float(value)
            except ValueError as err:
                raise ConfigInvalid("--inject", f"{raw!r}: seconds must be a number") from err
            if not 0 <= seconds <= 60:
                raise ConfigInvalid("--inject", f"{raw!r}: seconds must be 0..60")
        return cls(raw, epoch, name, seconds)


@dataclass(frozen=True)
class SidecarConfig:
    """Everything one sidecar process needs; built by `from_run`, never edited."""

    run_id: str
    """The run's name, checked on every request that carries one."""
    instance_id: str
    """This run instance (a local `tolaria run`, a pod attempt): names the shared-memory
    segments (`tolaria-<instance>-*`), is written into them and into every checkpoint, and
    must match the trainer's Attach (R13.1)."""
    lineage_id: str
    """The run this instance continues: itself, or the instance it resumed."""
    resume: bool
    """The durable tier may load checkpoints of other instances of `lineage_id` (the user or
    the operator asked to resume); otherwise only this instance's own."""
    socket_path: Path
    """Unix socket of the `TrainerLink` service (mode 0600)."""
    checkpoint_dir: Path
    """Where the durable store keeps checkpoint files and the WAL."""
    shm_dir: Path
    """Directory of the shared-memory segments (`$TOLARIA_SHM_DIR` or /dev/shm)."""
    snapshots: SnapshotSpec
    rollback: RollbackSpec
    detection: DetectionSpec
    emergency: EmergencySpec
    checkpoints: CheckpointSpec
    control_address: ControlAddress | None
    """TCP address of the authenticated `SidecarControl` service; None: not served."""
    token: str | None
    """The run token every `SidecarControl` call must carry; never logged."""
    tls: ControlTls | None
    """The control port's certificate; None: plain text, loopback addresses only."""
    metrics_port: int | None
    """Prometheus port (0: any free port); None: no metrics endpoint."""
    metrics_address: str
    """Bind address of the metrics endpoint."""
    cleanup_on_exit: bool
    """Unlink the run's segments at exit (local mode); in a pod they must outlive restarts."""
    remove_socket_dir: bool
    """The launcher made the socket's directory for this sidecar alone (`tolaria run`): remove
    it at exit (when empty), also when the launcher died and cannot."""
    drills: tuple[CheckpointDrill, ...]
    tuning: Tuning = field(default_factory=Tuning)

    @classmethod
    def from_run(
        cls,
        run: TolariaRun,
        *,
        socket_path: Path,
        run_id: str | None = None,
        instance_id: str | None = None,
        lineage_id: str | None = None,
        resume: bool = False,
        control_address: str | None = None,
        token: str | None = None,
        token_file: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        metrics_port: int | None = None,
        metrics_address: str | None = None,
        checkpoint_dir: Path | None = None,
        cleanup_on_exit: bool = False,
        remove_socket_dir: bool = False,
        inject: tuple[str, ...] = (),
        tuning: Tuning | None = None,
    ) -> SidecarConfig:
        """Validates the options against the manifest; raises `ConfigInvalid` naming the flag.

        `token` wins over `token_file`, which wins over `$TOLARIA_SIDECAR_TOKEN`. A control
        address without any token is refused here (`TokenRequired` comes from the server).
        A control address that is not loopback needs `tls_cert` and `tls_key`: the token must
        never cross a network in clear.
        """
        rid = run.name if run_id is None else run_id
        if not re.fullmatch(NAME_PATTERN, rid) or len(rid) > NAME_MAX_LENGTH:
            raise ConfigInvalid(
                "--run-id", f"{rid!r} must match {NAME_PATTERN} and be <= {NAME_MAX_LENGTH} chars"
            )
        instance = _identity("--instance-id", instance_id or new_instance_id())
        lineage = _identity("--lineage-id", lineage_id or instance)
        if len(os.fsencode(str(socket_path))) > UNIX_PATH_MAX:
            raise ConfigInvalid(
                "--socket",
                f"path is {len(os.fsencode(str(socket_path)))} bytes; a Unix socket path "
                f"must be <= {UNIX_PATH_MAX}",
            )
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ConfigInvalid("--metrics-port", f"{metrics_port} must be 0..65535")
        address = ControlAddress.parse(control_address) if control_address is not None else None
        if (tls_cert is None) != (tls_key is None):
            missing = "--tls-key" if tls_key is None else "--tls-cert"
            raise ConfigInvalid(missing, "--tls-cert and --tls-key go together")
        tls = None if tls_cert is None or tls_key is None else ControlTls.load(tls_cert, tls_key)
        if address is not None and tls is None and not address.loopback:
            raise ConfigInvalid(
                "--control-address",
                f"{address.target} is not loopback: serving it needs --tls-cert and --tls-key "
                "(plain text would send the run token across the network in clear)",
            )
        spec = run.spec
        if checkpoint_dir is None:
            configured = spec.checkpoints.directory
            checkpoint_dir = Path(configured) if configured else socket_path.parent / "checkpoints"
        return cls(
            run_id=rid,
            instance_id=instance,
            lineage_id=lineage,
            resume=resume,
            socket_path=socket_path,
            checkpoint_dir=checkpoint_dir,
            shm_dir=shm_dir(),
            snapshots=spec.snapshots,
            rollback=spec.rollback,
            detection=spec.detection,
            emergency=spec.emergency,
            checkpoints=spec.checkpoints,
            control_address=address,
            token=token if token is not None else read_token(token_file),
            tls=tls,
            metrics_port=metrics_port,
            metrics_address=metrics_address or spec.telemetry.metrics_address,
            cleanup_on_exit=cleanup_on_exit,
            remove_socket_dir=remove_socket_dir,
            drills=tuple(CheckpointDrill.parse(raw) for raw in inject),
            tuning=tuning or Tuning(),
        )


def _identity(flag: str, value: str) -> str:
    try:
        return check_instance_id(value)
    except ValueError as err:
        raise ConfigInvalid(flag, str(err)) from err


def read_token(token_file: Path | None) -> str | None:
    """The run token from `token_file`, else `$TOLARIA_SIDECAR_TOKEN`, else None."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigInvalid("--token-file", f"cannot read {token_file}: {err}") from err
        if not token:
            raise ConfigInvalid("--token-file", f"{token_file} is empty")
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env or None
