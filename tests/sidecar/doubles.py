"""Stand-ins for the sidecar's neighbours in tests: a torch-free trainer and recording sinks.

`TrainerDouble` does what the real trainer does to the shared memory (hide a slot, write its
bytes, publish the header last, register participant lines, heartbeat, ack) with plain
Python and `leyline.shm`, so sidecar tests need neither torch nor the trainer package.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from leyline import SCHEMA_VERSION, Participant, SnapshotManifest
from leyline.checksum import REGION_ALGORITHM, digest_bytes, region_digest
from leyline.shm import SLOT_FLAG_EPOCH_BOUNDARY, ControlBlock, Slot
from leyline.spec import TolariaRun, validate_manifest

RUN_ID = "sidecar-test"
INSTANCE_ID = "sidecar-test-instance"
"""The instance every sidecar under test serves (segments are named from it)."""
IN_PROCESS = (
    Participant.PARTICIPANT_TRAINER,
    Participant.PARTICIPANT_KASMINA,
    Participant.PARTICIPANT_TAMIYO,
)


def manifest_doc(name: str = RUN_ID, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": {**spec, "training": {"task": "synthetic-mlp", **spec.get("training", {})}},
    }


def tolaria_run(name: str = RUN_ID, **spec: Any) -> TolariaRun:
    return validate_manifest(manifest_doc(name, **spec))


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating bytes (a corrupt byte is never a no-op)."""
    block = bytes((seed * 131 + i * 7) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


@contextmanager
def short_dir(prefix: str = "tls-") -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), reverse=True):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink(missing_ok=True)
        path.rmdir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], *, timeout_s: float = 120.0, interval_s: float = 0.01
) -> Any:
    """Polls `condition` until it returns something truthy; fails after `timeout_s`.

    The deadline only bounds a failure (a met condition returns at once), so it is sized for a
    real sidecar process on a loaded 2-core machine, not for an idle one."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@dataclass
class TrainerDouble:
    """The trainer's shared-memory side, without torch."""

    control: ControlBlock
    slots: dict[int, Slot] = field(default_factory=dict)
    attempt: int = 1

    @classmethod
    def mapping(cls, directory: Path, control_name: str, slot_names: list[str]) -> TrainerDouble:
        control = ControlBlock.attach(directory / control_name, instance_id=None)
        slots = {}
        for name in slot_names:
            slot = Slot.attach(directory / name, instance_id=None)
            slots[slot.index] = slot
        return cls(control, slots)

    def register(self, participants: tuple[int, ...] = IN_PROCESS) -> None:
        for p in participants:
            self.control.register(p, os.getpid(), self.attempt)

    def write(
        self,
        index: int,
        generation: int,
        data: bytes,
        *,
        step: int = 10,
        epoch: int = 1,
        fingerprint: str = "layout-a",
        corrupt: bool = False,
        epoch_end: bool = False,
        manifest_checksum: bool = True,
        algorithm: int = REGION_ALGORITHM,
    ) -> SnapshotManifest:
        """Writes one snapshot as the trainer's writer does: hide, copy, publish last.

        `corrupt` flips a data byte after hashing, as memory damage would.
        """
        slot = self.slots[index]
        slot.invalidate()
        slot.data[: len(data)] = data
        checksum = region_digest(memoryview(data), algorithm)
        if corrupt:
            slot.data[len(data) // 2] = (data[len(data) // 2] + 1) % 256
        manifest = SnapshotManifest(
            version=SCHEMA_VERSION,
            run_id=RUN_ID,
            generation=generation,
            global_step=step,
            epoch=epoch,
            data_bytes=len(data),
            checksum_algorithm=algorithm,
            layout_fingerprint=fingerprint,
            epoch_boundary=epoch_end,
        )
        if manifest_checksum:
            manifest.checksum = digest_bytes(checksum)
        slot.publish(
            generation=generation,
            manifest=manifest.SerializeToString(),
            data_length=len(data),
            data_checksum=checksum,
            checksum_algorithm=algorithm,
            global_step=step,
            epoch=epoch,
            flags=SLOT_FLAG_EPOCH_BOUNDARY if epoch_end else 0,
        )
        return manifest

    def ack_all(self, *, frozen: bool, participants: tuple[int, ...] = IN_PROCESS) -> int:
        record = self.control.read_emergency()
        for p in participants:
            self.control.ack(p, record.generation, record.level, frozen=frozen)
        return record.generation

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.control.close()


@dataclass
class RecordedEvents:
    """An `EventSink` that keeps every event (kind, message)."""

    events: list[tuple[str, Message]] = field(default_factory=list)

    def publish(self, kind: str, message: Message) -> int:
        self.events.append((kind, message))
        return len(self.events)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    def of(self, kind: str) -> list[Any]:
        return [m for k, m in self.events if k == kind]
