"""Moving tensor bytes in and out of a slot's data region while hashing them.

The region checksum is xxh3-64 over the whole data region in order, padding
included. Copying and hashing in 4 MiB chunks, hashing each chunk right after
it is copied, reads it from cache instead of from memory a second time, so a
verified copy costs little more than a plain one. Both directions share this
code: snapshots hash what they wrote, restores hash what they read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
