"""Child-process bodies for the crash tests: they write until the parent kills them.

Started through a `forkserver` context that preloads this module, so each child starts in
milliseconds instead of re-importing protobuf and pydantic. Each child reports to the parent over
a one-way pipe with 9-byte messages (kind, index) and never returns on its own before the parent
kills it (it stops after `MAX_ITERATIONS` if the parent is gone).
"""

from __future__ import annotations

import os
import struct
from multiprocessing.connection import Connection
from pathlib import Path

from leyline.checksum import REGION_ALGORITHM, region_digest
from leyline.shm import SLOT_DYNAMIC_AT, Slot, TornHeader, slot_name
from tests.sidecar.scenarios import (
    ANNOUNCE,
    DONE,
    INSTANCE_ID,
    RUN_ID,
    SPEC,
    content,
    write_index,
    write_new_epoch,
)
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.faults import Faults

MESSAGE = struct.Struct("<BQ")
MAX_ITERATIONS = 100_000
PIECE_BYTES = 4096
"""Slot data is copied piece by piece (as a trainer copies tensor by tensor), so a kill can land
in the middle of the data."""
SLOT_CAPACITY = 64 * 1024
SLOT_COUNT = 2


def write_checkpoints(directory: str, seed: int, start: int, conn: Connection) -> None:
    """Opens the store (recovering whatever the last kill left) and writes checkpoints forever."""
    with DurableStore(Path(directory), SPEC, run_id=RUN_ID) as store:
        for index in range(start, start + MAX_ITERATIONS):
            conn.send_bytes(MESSAGE.pack(ANNOUNCE, index))
            write_index(store, seed, index)
            conn.send_bytes(MESSAGE.pack(DONE, index))


def _even_sequence(slot: Slot) -> None:
    # A writer killed inside a seqlock write leaves the sequence odd; the next writer must
    # make it even first, or its own writes would look stable to readers.
    word = slot.seg.u64(SLOT_DYNAMIC_AT)
    if word.value & 1:
        word.value += 1


def _held_generation(slot: Slot) -> int:
    """The generation a slot offers readers now (0: nothing restorable)."""
    try:
        header = slot.header()
    except TornHeader:
        return 0
    return header.generation if header.visible else 0


def publish_snapshots(shm_dir: str, seed: int, start: int, conn: Connection) -> None:
    """Publishes generation after generation, each into the least recent slot, as a trainer does.

    The least recent slot is judged by what the headers offer (not by generation parity), so a
    restarted publisher never overwrites the newest restorable snapshot first.
    """
    os.environ["TOLARIA_SHM_DIR"] = shm_dir
    slots = [
        Slot.attach(Path(shm_dir) / slot_name(INSTANCE_ID, i), instance_id=INSTANCE_ID)
        for i in range(SLOT_COUNT)
    ]
    for slot in slots:
        _even_sequence(slot)
    held = [_held_generation(slot) for slot in slots]
    for generation in range(start, start + MAX_ITERATIONS):
        manifest, data = content(seed, generation, max_bytes=SLOT_CAPACITY)
        index = held.index(min(held))
        slot = slots[index]
        conn.send_bytes(MESSAGE.pack(ANNOUNCE, generation))
        held[index] = 0
        slot.invalidate()
        region = slot.data
        for offset in range(0, len(data), PIECE_BYTES):
            end = min(offset + PIECE_BYTES, len(data))
            region[offset:end] = data[offset:end]
        slot.publish(
            generation=generation,
            manifest=manifest,
            data_length=len(data),
            data_checksum=region_digest(memoryview(data)),
            checksum_algorithm=REGION_ALGORITHM,
            global_step=generation,
            epoch=0,
            flags=0,
        )
        held[index] = generation
        conn.send_bytes(MESSAGE.pack(DONE, generation))


def write_new_epoch_exiting_at(directory: str, seed: int, point: str, nth: int) -> None:
    """Writes the new epoch into a seeded directory; `os._exit(137)` at the `nth` `point`."""
    faults = Faults()
    faults.exit_at(point, nth)
    write_new_epoch(Path(directory), seed, faults)
