"""Child-process bodies for the crash tests: they write until the parent kills them.

Started through a `forkserver` context that preloads this module, so each child starts in
milliseconds instead of re-importing protobuf and pydantic. Each child reports to the parent over
a one-way pipe with 9-byte messages (kind, index) and never returns on its own before the parent
kills it (it stops after `MAX_ITERATIONS` if the parent is gone).
"""

from __future__ import annotations

import struct
from multiprocessing.connection import Connection
from pathlib import Path

from tests.sidecar.scenarios import (
    ANNOUNCE,
    DONE,
    RUN_ID,
    SPEC,
    write_index,
    write_new_epoch,
)
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.faults import Faults

MESSAGE = struct.Struct("<BQ")
MAX_ITERATIONS = 100_000


def write_checkpoints(directory: str, seed: int, start: int, conn: Connection) -> None:
    """Opens the store (recovering whatever the last kill left) and writes checkpoints forever."""
    with DurableStore(Path(directory), SPEC, run_id=RUN_ID) as store:
        for index in range(start, start + MAX_ITERATIONS):
            conn.send_bytes(MESSAGE.pack(ANNOUNCE, index))
            write_index(store, seed, index)
            conn.send_bytes(MESSAGE.pack(DONE, index))


def write_new_epoch_exiting_at(directory: str, seed: int, point: str, nth: int) -> None:
    """Writes the new epoch into a seeded directory; `os._exit(137)` at the `nth` `point`."""
    faults = Faults()
    faults.exit_at(point, nth)
    write_new_epoch(Path(directory), seed, faults)
