"""The servicers over a fake `protocols.ServicedSidecar`: they need nothing of the concrete
`Sidecar`, only the seam, so a fake built from the Protocols serves them (STYLE "Protocols at
the seams"). Every part is autospecced from its Protocol: a renamed method fails here."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import MagicMock, create_autospec

import grpc
import pytest

from leyline import EmergencySignal, HealthStatus, RunPhase
from leyline.v1 import sidecar_pb2 as pb
from tests.fakes import FakeClock
from tests.sidecar.doubles import RUN_ID, tolaria_run
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import PreconditionFailed
from tolaria_sidecar.protocols import (
    DurableStore,
    EmergencyDesk,
    EventFeed,
    PersistQueue,
    ServicedSidecar,
    SlotDesk,
    VerifyQueue,
)
from tolaria_sidecar.sidecar_control import SidecarControlService
from tolaria_sidecar.trainer_link import TrainerLinkService
from tolaria_sidecar.values import SlotEntry


@pytest.fixture
def sidecar(tmp_path: Path) -> MagicMock:
    """A `ServicedSidecar` whose every part is an autospec of its Protocol."""
    fake = create_autospec(ServicedSidecar, instance=True)
    fake.config = SidecarConfig.from_run(tolaria_run(), socket_path=tmp_path / "s.sock")
    fake.clock = FakeClock()
    fake.slots = create_autospec(SlotDesk, instance=True)
    fake.machine = create_autospec(EmergencyDesk, instance=True)
    fake.store = create_autospec(DurableStore, instance=True)
    fake.events = create_autospec(EventFeed, instance=True)
    fake.verifier = create_autospec(VerifyQueue, instance=True)
    fake.persister = create_autospec(PersistQueue, instance=True)
    fake.wal_recovery = None
    fake.stop_requested = False
    fake.stop_reason = ""
    return fake


def context(*, time_remaining: float | None = None) -> MagicMock:
    ctx = create_autospec(grpc.ServicerContext, instance=True)
    ctx.time_remaining.return_value = time_remaining
    ctx.abort.side_effect = grpc.RpcError
    return ctx


@pytest.mark.req("R10.1")
def test_a_heartbeat_reaches_the_sidecar_and_answers_stop_and_emergency(
    sidecar: MagicMock,
) -> None:
    sidecar.stop_requested = True
    sidecar.stop_reason = "checkpoint-then-stop: suspend"
    active = EmergencySignal(generation=3, level=2)
    sidecar.machine.active.return_value = active
    request = pb.HeartbeatRequest(
        run_id=RUN_ID, epoch=2, phase=RunPhase.Running, health=HealthStatus.HEALTH_STATUS_HEALTHY
    )

    response = TrainerLinkService(sidecar).Heartbeat(request, context())

    sidecar.heartbeat.assert_called_once_with(request)
    assert response.stop_requested and response.stop_reason == "checkpoint-then-stop: suspend"
    assert response.active_emergency == active


@pytest.mark.req("R6.2")
def test_a_commit_the_header_does_not_show_is_answered_not_accepted_and_never_verified(
    sidecar: MagicMock,
) -> None:
    sidecar.slots.commit.side_effect = PreconditionFailed("generation", "header shows 1, not 2")
    sidecar.slots.infos.return_value = []

    response = TrainerLinkService(sidecar).CommitSnapshot(
        pb.CommitSnapshotRequest(slot=0, generation=2), context()
    )

    assert not response.accepted and "header shows 1" in response.error
    sidecar.verifier.submit.assert_not_called()


@pytest.mark.req("R10.1")
def test_a_checkpoint_request_never_waits_past_the_clients_deadline(sidecar: MagicMock) -> None:
    sidecar.slots.newest_persistable.return_value = SlotEntry(
        index=1,
        generation=7,
        global_step=70,
        epoch=3,
        flags=0,
        committed_ns=0,
        verified=True,
        rejected=False,
        durable=False,
        pinned=False,
    )
    sidecar.persister.schedule.return_value = (True, "")
    sidecar.persister.wait.return_value = None  # still being written

    response = SidecarControlService(sidecar).RequestCheckpoint(
        pb.CheckpointRequest(reason="suspend"), context(time_remaining=2.0)
    )

    sidecar.persister.wait.assert_called_once_with(7, pytest.approx(1.8))
    assert response.scheduled and "generation 7 still being written" in response.error
    sidecar.checkpoint_done.assert_not_called()
