"""The real `tolaria-sidecar` process end to end: a torch-free fake trainer attaches over the
Unix socket, commits a snapshot, raises CRITICAL and acks from its participant lines, while
the operator's side streams events over authenticated TCP and scrapes Prometheus."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from leyline import AnomalyKind, EmergencyLevel, EmergencySignal, EmergencyState, Participant
from leyline.shm import control_name
from leyline.spec.resilience import CheckpointSpec
from leyline.v1 import sidecar_pb2 as pb
from leyline.v1.sidecar_pb2_grpc import SidecarControlStub, TrainerLinkStub
from tests.sidecar.conftest import GENEROUS_BUDGETS
from tests.sidecar.doubles import (
    INSTANCE_ID,
    RUN_ID,
    TrainerDouble,
    manifest_doc,
    payload,
    short_dir,
    wait_for,
)
from tolaria_sidecar.auth import bearer
from tolaria_sidecar.checkpoints import DurableStore

TOKEN = "e2e-token"
STATE_BYTES = 256 * 1024
CRITICAL = EmergencyLevel.EMERGENCY_LEVEL_CRITICAL
SEVERE = EmergencyLevel.EMERGENCY_LEVEL_SEVERE


def sidecar_command() -> list[str]:
    script = Path(sys.executable).parent / "tolaria-sidecar"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tolaria_sidecar"]


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[str]
    socket: Path
    control: str | None
    metrics_port: int | None
    channels: list[grpc.Channel] = field(default_factory=list)

    def link(self) -> TrainerLinkStub:
        channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.channels.append(channel)
        return TrainerLinkStub(channel)

    def operator(self) -> SidecarControlStub:
        if self.control is None:
            raise AssertionError("started without --control-address")
        channel = grpc.insecure_channel(self.control)
        self.channels.append(channel)
        return SidecarControlStub(channel)

    def terminate(self, timeout_s: float = 60) -> int:
        for channel in self.channels:
            channel.close()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@dataclass
class Workspace:
    root: Path
    shm: Path
    manifest: Path
    token_file: Path
    started: list[SidecarProcess] = field(default_factory=list)

    def start(self, *flags: str, ready_timeout_s: float = 120) -> SidecarProcess:
        env = {
            **os.environ,
            "TOLARIA_SHM_DIR": str(self.shm),
            "PYTHONUNBUFFERED": "1",
            "TOLARIA_INSTANCE_ID": INSTANCE_ID,
        }
        env.pop("TOLARIA_SIDECAR_TOKEN", None)
        socket_path = self.root / "sidecar.sock"
        proc = subprocess.Popen(
            [
                *sidecar_command(),
                "--manifest",
                str(self.manifest),
                "--socket",
                str(socket_path),
                "--checkpoint-dir",
                str(self.root / "checkpoints"),
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=(self.root / f"stderr-{len(self.started)}.log").open("w"),
            text=True,
            env=env,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True
        ).start()
        try:
            line = lines.get(timeout=ready_timeout_s)
        except queue.Empty:
            proc.kill()
            raise AssertionError("no READY line from tolaria-sidecar") from None
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        assert line.startswith("READY "), line
        running = SidecarProcess(
            proc,
            Path(fields["socket"]),
            None if fields["control"] == "-" else fields["control"],
            None if fields["metrics"] == "-" else int(fields["metrics"]),
        )
        self.started.append(running)
        return running


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    with short_dir() as root:
        shm = root / "shm"
        shm.mkdir()
        manifest = root / "run.yaml"
        manifest.write_text(yaml.safe_dump(manifest_doc(emergency=GENEROUS_BUDGETS)))
        token_file = root / "token"
        token_file.write_text(TOKEN + "\n")
        ws = Workspace(root, shm, manifest, token_file)
        yield ws
        for running in ws.started:
            if running.proc.poll() is None:
                running.proc.kill()
                running.proc.wait(30)


def attach(link: TrainerLinkStub, attempt: int = 1) -> pb.AttachResponse:
    return link.Attach(
        pb.AttachRequest(
            version=1,
            run_id=RUN_ID,
            state_bytes=STATE_BYTES,
            layout_fingerprint="layout-a",
            pid=os.getpid(),
            attempt=attempt,
            manifest_bytes=2048,
        ),
        timeout=60,
    )


def segments(shm: Path) -> list[str]:
    return sorted(p.name for p in shm.glob(f"tolaria-{RUN_ID}-*"))


@pytest.mark.req("R7.3")
def test_a_fake_trainer_and_an_operator_drive_the_real_sidecar_end_to_end(
    workspace: Workspace,
) -> None:
    sidecar = workspace.start(
        "--control-address",
        "127.0.0.1:0",
        "--token-file",
        str(workspace.token_file),
        "--metrics-port",
        "0",
        "--cleanup-on-exit",
    )
    link = sidecar.link()
    reply = attach(link)
    assert reply.control_block_name == control_name(INSTANCE_ID)
    trainer = TrainerDouble.mapping(
        workspace.shm, reply.control_block_name, [s.shm_name for s in reply.slots]
    )
    trainer.register()

    events: list[pb.SidecarEvent] = []
    stream = sidecar.operator().StreamEvents(
        pb.StreamEventsRequest(after_sequence=0), metadata=bearer(TOKEN)
    )

    def follow() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end of the test
            events.extend(stream)

    threading.Thread(target=follow, daemon=True).start()

    trainer.write(0, 1, payload(STATE_BYTES), step=12, epoch=1)
    assert link.CommitSnapshot(pb.CommitSnapshotRequest(slot=0, generation=1)).accepted

    raised = link.RaiseEmergency(
        EmergencySignal(
            level=CRITICAL, kind=AnomalyKind.ANOMALY_KIND_BREAKER_STORM, reason="breaker storm"
        )
    )
    assert trainer.control.read_emergency().generation == raised.generation
    trainer.ack_all(frozen=True)
    wait_for(
        lambda: (
            trainer.control.read_emergency().state == EmergencyState.EMERGENCY_STATE_ACKNOWLEDGED
        )
    )

    def acked_by() -> set[int]:
        return {e.ack.participant for e in list(events) if e.WhichOneof("event") == "ack"}

    wait_for(
        lambda: (
            acked_by()
            == {
                Participant.PARTICIPANT_TRAINER,
                Participant.PARTICIPANT_KASMINA,
                Participant.PARTICIPANT_TAMIYO,
                Participant.PARTICIPANT_SIDECAR,
            }
        )
    )
    wait_for(lambda: any(e.WhichOneof("event") == "snapshot" for e in list(events)))
    kinds = [e.WhichOneof("event") for e in list(events)]
    assert "emergency" in kinds
    sequences = [e.sequence for e in list(events)]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

    assert sidecar.metrics_port is not None
    with urllib.request.urlopen(
        f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=30
    ) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    assert all(name.startswith("tolaria_sidecar_") for name in families if "sidecar" in name)
    emergencies = {
        (s.labels["level"], s.labels["kind"]): s.value
        for s in families["tolaria_sidecar_emergencies"].samples
        if s.name.endswith("_total")
    }
    critical = EmergencyLevel.Name(CRITICAL)
    assert emergencies[(critical, AnomalyKind.Name(AnomalyKind.ANOMALY_KIND_BREAKER_STORM))] == 1
    commits = families["tolaria_sidecar_snapshot_commits"].samples
    assert [s.value for s in commits if s.name.endswith("_total")] == [1]
    assert "tolaria_sidecar_trainer_heartbeat_age_seconds" in families

    stream.cancel()
    trainer.close()
    assert sidecar.terminate() == 0
    assert segments(workspace.shm) == []
    assert not sidecar.socket.exists()


@pytest.mark.req("R6.2")
def test_segments_outlive_a_sidecar_restart_with_their_slots_and_emergency_generation(
    workspace: Workspace,
) -> None:
    first = workspace.start()
    link = first.link()
    reply = attach(link)
    trainer = TrainerDouble.mapping(
        workspace.shm, reply.control_block_name, [s.shm_name for s in reply.slots]
    )
    trainer.register()
    trainer.write(2, 4, payload(STATE_BYTES), step=40, epoch=3)
    assert link.CommitSnapshot(pb.CommitSnapshotRequest(slot=2, generation=4)).accepted
    raised = link.RaiseEmergency(EmergencySignal(level=SEVERE, reason="loss spike"))
    trainer.close()
    assert first.terminate() == 0
    kept = segments(workspace.shm)
    assert control_name(INSTANCE_ID) in kept and len(kept) == 6

    second = workspace.start("--cleanup-on-exit")
    again = attach(second.link(), attempt=2)
    assert (again.resume_slot.index, again.resume_slot.generation) == (2, 4)
    assert again.active_emergency.generation == raised.generation
    escalated = second.link().RaiseEmergency(EmergencySignal(level=CRITICAL, reason="worse"))
    assert escalated.generation == raised.generation + 1
    assert second.terminate() == 0
    assert segments(workspace.shm) == []


@pytest.mark.req("R10.5")
@pytest.mark.parametrize(
    ("flags", "manifest", "named"),
    [
        (["--inject", "disk-full@epoch=1"], None, "--inject"),
        (["--inject", "checkpoint-io-error@step=1"], None, "--inject"),
        (["--control-address", "127.0.0.1:0"], None, "--token-file"),
        (["--control-address", "no-port"], None, "--control-address"),
        ([], {"snapshots": {"slots": 1}}, "spec.snapshots.slots"),
    ],
)
def test_invalid_input_exits_2_naming_the_field(
    workspace: Workspace, flags: list[str], manifest: dict[str, object] | None, named: str
) -> None:
    if manifest is not None:
        workspace.manifest.write_text(yaml.safe_dump(manifest_doc(**manifest)))
    env = {**os.environ, "TOLARIA_SHM_DIR": str(workspace.shm)}
    env.pop("TOLARIA_SIDECAR_TOKEN", None)
    done = subprocess.run(
        [
            *sidecar_command(),
            "--manifest",
            str(workspace.manifest),
            "--socket",
            str(workspace.root / "s.sock"),
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert segments(workspace.shm) == []


@pytest.mark.req("R6.3")
def test_a_second_sidecar_on_a_checkpoint_directory_in_use_exits_2_naming_it(
    workspace: Workspace,
) -> None:
    checkpoints = workspace.root / "checkpoints"
    env = {
        **os.environ,
        "TOLARIA_SHM_DIR": str(workspace.shm),
        "TOLARIA_INSTANCE_ID": "second-sidecar-1",
    }
    env.pop("TOLARIA_SIDECAR_TOKEN", None)
    with DurableStore(checkpoints, CheckpointSpec(), run_id=RUN_ID):  # the first writer
        done = subprocess.run(
            [
                *sidecar_command(),
                "--manifest",
                str(workspace.manifest),
                "--socket",
                str(workspace.root / "s.sock"),
                "--checkpoint-dir",
                str(checkpoints),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "--checkpoint-dir" in done.stderr and str(checkpoints) in done.stderr
    assert segments(workspace.shm) == []


@pytest.mark.req("R10.1")
def test_a_manifest_with_a_key_written_twice_exits_2_naming_its_path_and_lines(
    workspace: Workspace,
) -> None:
    """The sidecar reads the manifest file through the same loader as `tolaria run`."""
    text = yaml.safe_dump(manifest_doc())
    workspace.manifest.write_text(text + "kind: TolariaRun\n")
    line = len(text.splitlines()) + 1
    socket = workspace.root / "s.sock"
    done = subprocess.run(
        [*sidecar_command(), "--manifest", str(workspace.manifest), "--socket", str(socket)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOLARIA_SHM_DIR": str(workspace.shm)},
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"kind: duplicate key at line {line} (first at line " in done.stderr
    assert segments(workspace.shm) == [] and not socket.exists()
