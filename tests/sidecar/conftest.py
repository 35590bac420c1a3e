"""Fixtures of the sidecar's service tests: real shared memory in a per-test directory, a
clock on the control block's time base, the real durable store, fresh metric registries."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from leyline.shm import ControlBlock, control_name
from leyline.spec import TolariaRun
from leyline.v1.sidecar_pb2 import AttachRequest, AttachResponse
from leyline.v1.sidecar_pb2_grpc import SidecarControlStub, TrainerLinkStub
from tests.fakes import FakeClock
from tests.sidecar.doubles import (
    INSTANCE_ID,
    RUN_ID,
    RecordedEvents,
    TrainerDouble,
    short_dir,
    tolaria_run,
)
from tolaria_sidecar.auth import bearer
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import SidecarConfig, Tuning
from tolaria_sidecar.emergency import EmergencyMachine
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import PersistGuard
from tolaria_sidecar.protocols import DurableStore as DurableStoreProtocol
from tolaria_sidecar.serving import Running, serve
from tolaria_sidecar.sidecar import Sidecar
from tolaria_sidecar.slots import SlotManager

COPY_BYTES_PER_SECOND = 10e9
"""Injected copy bandwidth, so tests never depend on how fast this machine copies."""


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private shared-memory directory (`TOLARIA_SHM_DIR`) for this test's segments."""
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setenv("TOLARIA_SHM_DIR", str(path))
    return path


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock that starts at the real CLOCK_MONOTONIC, the base of heartbeats and acks
    that `leyline.shm` stamps, so both can be compared."""
    return FakeClock(start_ns=time.monotonic_ns())


@pytest.fixture
def run() -> TolariaRun:
    return tolaria_run()


@pytest.fixture
def config(run: TolariaRun, shm_dir: Path, tmp_path: Path) -> SidecarConfig:
    return SidecarConfig.from_run(
        run,
        socket_path=tmp_path / "s.sock",
        checkpoint_dir=tmp_path / "checkpoints",
        instance_id=INSTANCE_ID,
    )


@pytest.fixture
def control(config: SidecarConfig) -> Iterator[ControlBlock]:
    block = ControlBlock.create(
        config.shm_dir / control_name(config.instance_id),
        config.snapshots.slots,
        instance_id=config.instance_id,
    )
    yield block
    block.close()


@pytest.fixture
def metrics() -> SidecarMetrics:
    return SidecarMetrics(CollectorRegistry())


@pytest.fixture
def recorded() -> RecordedEvents:
    return RecordedEvents()


@pytest.fixture
def guard(config: SidecarConfig) -> PersistGuard:
    return PersistGuard(config.drills)


@pytest.fixture
def store(config: SidecarConfig, guard: PersistGuard) -> Iterator[DurableStore]:
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with DurableStore(
        config.checkpoint_dir,
        config.checkpoints,
        run_id=RUN_ID,
        instance_id=config.instance_id,
        faults=guard,
    ) as opened:
        yield opened


def make_slot_manager(
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStoreProtocol,
    guard: PersistGuard,
    clock: FakeClock,
    *,
    events: RecordedEvents | None = None,
    metrics: SidecarMetrics | None = None,
    bandwidth: float | None = COPY_BYTES_PER_SECOND,
) -> SlotManager:
    return SlotManager(
        run_id=config.run_id,
        instance_id=config.instance_id,
        lineage_id=config.lineage_id,
        resume=config.resume,
        control=control,
        directory=config.shm_dir,
        snapshots=config.snapshots,
        rollback=config.rollback,
        tuning=config.tuning,
        store=store,
        guard=guard,
        events=events if events is not None else RecordedEvents(),
        metrics=metrics if metrics is not None else SidecarMetrics(CollectorRegistry()),
        clock=clock,
        copy_bytes_per_second=bandwidth,
    )


@pytest.fixture
def slots(
    config: SidecarConfig,
    control: ControlBlock,
    store: DurableStore,
    guard: PersistGuard,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
    clock: FakeClock,
) -> Iterator[SlotManager]:
    manager = make_slot_manager(
        config, control, store, guard, clock, events=recorded, metrics=metrics
    )
    yield manager
    manager.close(unlink=False)


@pytest.fixture
def machine(
    config: SidecarConfig,
    control: ControlBlock,
    clock: FakeClock,
    recorded: RecordedEvents,
    metrics: SidecarMetrics,
) -> EmergencyMachine:
    return EmergencyMachine(
        run_id=config.run_id,
        control=control,
        emergency=config.emergency,
        detection=config.detection,
        rollback=config.rollback,
        tuning=Tuning(),
        clock=clock,
        events=recorded,
        metrics=metrics,
    )


STATE_BYTES = 64 * 1024
"""The state size the fake trainer declares: small, so each test allocates little."""


@pytest.fixture
def trainer(slots: SlotManager, config: SidecarConfig) -> Iterator[TrainerDouble]:
    """A fake trainer attached to freshly created slots of `STATE_BYTES`."""
    slots.attach(state_bytes=STATE_BYTES, manifest_bytes=1024)
    double = TrainerDouble.mapping(
        config.shm_dir, control_name(config.instance_id), [i.shm_name for i in slots.infos()]
    )
    double.register()
    yield double
    double.close()


TOKEN = "s3cret-run-token"


@dataclass
class Served:
    """An in-process sidecar with clients for both services."""

    running: Running
    link: TrainerLinkStub
    control: SidecarControlStub
    socket_path: Path

    @property
    def sidecar(self) -> Sidecar:
        return self.running.sidecar

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return bearer(TOKEN)

    def attach(self, *, state_bytes: int = STATE_BYTES, attempt: int = 1) -> AttachResponse:
        return self.link.Attach(
            AttachRequest(
                version=1,
                run_id=RUN_ID,
                state_bytes=state_bytes,
                layout_fingerprint="layout-a",
                pid=os.getpid(),
                attempt=attempt,
                manifest_bytes=1024,
            ),
            timeout=30,
        )

    def trainer(self, response: AttachResponse) -> TrainerDouble:
        double = TrainerDouble.mapping(
            self.sidecar.config.shm_dir,
            response.control_block_name,
            [s.shm_name for s in response.slots],
        )
        double.attempt = 1
        double.register()
        return double


GENEROUS_BUDGETS = {
    "criticalMs": 60_000,
    "severeMs": 60_000,
    "majorMs": 60_000,
    "minorMs": 60_000,
    "haltAfterSeconds": 600,
}
"""Response budgets no loaded machine misses: service tests that do not test a budget must not
see an escalation because the test process was descheduled for half a second."""


@pytest.fixture
def serve_sidecar(shm_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Starts an in-process sidecar (Unix socket + TCP control with `TOKEN`) per call; the
    manifest has `GENEROUS_BUDGETS` unless the test passes its own."""
    run = tolaria_run(emergency=GENEROUS_BUDGETS)
    started: list[tuple[Served, list[grpc.Channel]]] = []
    with short_dir() as directory:

        def start(*, clock: FakeClock | None = None, manifest: TolariaRun | None = None) -> Served:
            socket_path = directory / f"s{len(started)}.sock"
            config = SidecarConfig.from_run(
                manifest or run,
                socket_path=socket_path,
                checkpoint_dir=tmp_path / "checkpoints",
                control_address="127.0.0.1:0",
                token=TOKEN,
                instance_id=INSTANCE_ID,
            )
            running = serve(config, clock=clock, copy_bytes_per_second=COPY_BYTES_PER_SECOND)
            link = grpc.insecure_channel(f"unix:{socket_path}")
            control = grpc.insecure_channel(f"127.0.0.1:{running.control_port}")
            served = Served(
                running, TrainerLinkStub(link), SidecarControlStub(control), socket_path
            )
            started.append((served, [link, control]))
            return served

        yield start
        for served, channels in started:
            for channel in channels:
                channel.close()
            served.running.stop()
