"""Moving tensor bytes in and out of a slot's data region while hashing them.

The region checksum is xxh3-64 over the whole data region in order, padding
included. Snapshots (`copy_hashing`, on the background worker) copy in 4 MiB
chunks and hash each chunk after it is written. Restores (`restore_verifying`,
on the training thread, where every millisecond counts) hash the slot on a
second thread WHILE the training thread copies out of it with a single-threaded
memcpy: both stream through memory at once and both release the GIL, so a
verified restore costs little more than the copy alone (measured 1.17x memcpy
for 1.2 GB, against 1.7x for copy-then-hash). The single-threaded copy also
does not stall when the other core is busy, which a 2-thread OpenMP copy does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from leyline.shm import Slot

CHUNK_BYTES = 4 << 20


def region_tensor(slot: Slot) -> torch.Tensor:
    """The slot's data region as a uint8 tensor sharing its memory."""
    return torch.frombuffer(slot.data, dtype=torch.uint8)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (bool/0-d included)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


@dataclass(frozen=True)
class Placement:
    """One tensor's bytes in the region."""

    offset: int
    nbytes: int
    live: torch.Tensor


def copy_hashing(
    slot: Slot,
    placements: Iterable[Placement],
    *,
    to_slot: bool,
    total_bytes: int,
) -> int:
    """Copies every placement (live -> slot if `to_slot`, else slot -> live) and returns the
    xxh3 of the region's first `total_bytes` bytes. Padding is zeroed when writing."""
    region = region_tensor(slot)
    data = slot.data
    hasher = xxhash.xxh3_64()
    done = 0
    for p in placements:
        if p.offset > done:
            if to_slot:
                region[done : p.offset].zero_()
            hasher.update(data[done : p.offset])
        live = p.live
        contiguous = live.is_contiguous() and live.device.type == "cpu"
        if not contiguous:
            _copy_whole(region, p, to_slot=to_slot)
            hasher.update(data[p.offset : p.offset + p.nbytes])
        else:
            live_bytes = as_bytes(live)
            for start in range(0, p.nbytes, CHUNK_BYTES):
                end = min(start + CHUNK_BYTES, p.nbytes)
                dst_slice = region[p.offset + start : p.offset + end]
                if to_slot:
                    dst_slice.copy_(live_bytes[start:end])
                else:
                    live_bytes[start:end].copy_(dst_slice)
                hasher.update(data[p.offset + start : p.offset + end])
        done = p.offset + p.nbytes
    if total_bytes > done:
        if to_slot:
            region[done:total_bytes].zero_()
        hasher.update(data[done:total_bytes])
    return int(hasher.intdigest())


def _copy_whole(region: torch.Tensor, p: Placement, *, to_slot: bool) -> None:
    view = region[p.offset : p.offset + p.nbytes].view(p.live.dtype).view(p.live.shape)
    with torch.no_grad():
        if to_slot:
            view.copy_(p.live)
        else:
            p.live.copy_(view)


def restore_verifying(slot: Slot, placements: Iterable[Placement], *, total_bytes: int) -> int:
    """Copies every placement out of the slot into the live tensors and returns the xxh3 of
    the region's first `total_bytes` bytes, hashed concurrently on another thread.

    The caller compares the result with the header: on a mismatch the live tensors hold
    garbage and must be restored from an older slot.
    """
    digest: list[int] = []
    data = slot.data

    def hash_region() -> None:
        digest.append(int(xxhash.xxh3_64_intdigest(data[:total_bytes])))

    hasher = threading.Thread(target=hash_region, name="restore-hash", daemon=True)
    hasher.start()
    try:
        region = np.frombuffer(data, dtype=np.uint8, count=total_bytes)
        for p in placements:
            live = p.live
            if live.is_contiguous() and live.device.type == "cpu":
                with torch.no_grad():
                    target = as_bytes(live.detach()).numpy()
                np.copyto(target, region[p.offset : p.offset + p.nbytes])
            else:
                _copy_whole(region_tensor(slot), p, to_slot=False)
    finally:
        hasher.join()
    return digest[0]
