"""Moving tensor bytes in and out of a slot's data region while hashing them.

The region checksum is Leyline's `region_digest`: xxh3-64 per 1 MiB chunk of the
whole data region (padding included), then over those digests. Snapshots
(`copy_hashing`, on the background worker) copy chunk by chunk and hash each
chunk right after writing it, from cache. Restores are all-or-nothing (R13.2):
`hash_region` proves the slot intact first, reading it on a few threads, and
only then does `copy_out` copy it into the live tensors, also on a few threads.
Hashing while copying would cross memory once instead of twice, but a mismatch
found halfway would leave the live tensors half overwritten; the verification
pass costs one extra read of the slot (measured in `docs/performance.md`).
numpy's copy and xxhash both release the GIL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from leyline.checksum import REGION_CHUNK_BYTES, combine_chunk_digests, region_chunks
from leyline.shm import Slot

MAX_RESTORE_THREADS = 4
"""Beyond a few threads the copy is memory-bound and more threads only contend."""


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


def _host_contiguous(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.device.type == "cpu"


def copy_hashing(slot: Slot, placements: Iterable[Placement], *, total_bytes: int) -> int:
    """Copies every placement into the slot and returns the region digest of the region's first
    `total_bytes` bytes; padding is zeroed. Placements must be in offset order and must not
    overlap. (Reading a slot back is `hash_region` then `copy_out`.)"""
    region = region_tensor(slot)
    data = slot.data
    digests: list[int] = []
    hashed = 0  # bytes of the region hashed so far, always a whole number of chunks

    def hash_ready(upto: int) -> None:
        nonlocal hashed
        while hashed + REGION_CHUNK_BYTES <= upto:
            digests.append(xxhash.xxh3_64_intdigest(data[hashed : hashed + REGION_CHUNK_BYTES]))
            hashed += REGION_CHUNK_BYTES

    done = 0
    for p in placements:
        if p.offset > done:
            region[done : p.offset].zero_()
        live = p.live
        if not _host_contiguous(live):
            _copy_whole(region, p, to_slot=True)
        else:
            live_bytes = as_bytes(live)
            for start in range(0, p.nbytes, REGION_CHUNK_BYTES):
                end = min(start + REGION_CHUNK_BYTES, p.nbytes)
                region[p.offset + start : p.offset + end].copy_(live_bytes[start:end])
                hash_ready(p.offset + end)
        done = p.offset + p.nbytes
        hash_ready(done)
    if total_bytes > done:
        region[done:total_bytes].zero_()
    hash_ready(total_bytes)
    if hashed < total_bytes:
        digests.append(xxhash.xxh3_64_intdigest(data[hashed:total_bytes]))
    return combine_chunk_digests(digests)


def _copy_whole(region: torch.Tensor, p: Placement, *, to_slot: bool) -> None:
    view = region[p.offset : p.offset + p.nbytes].view(p.live.dtype).view(p.live.shape)
    with torch.no_grad():
        if to_slot:
            view.copy_(p.live)
        else:
            p.live.copy_(view)


@dataclass(frozen=True)
class _Segment:
    """The part of one host tensor that lies in one chunk: region bytes [start, end)."""

    start: int
    end: int
    target: np.ndarray
    target_offset: int


def _segments_by_chunk(
    placements: Sequence[Placement], total_bytes: int
) -> tuple[list[list[_Segment]], list[Placement]]:
    """Each chunk's host-tensor segments, and the placements that must be copied whole
    (device or strided tensors)."""
    chunks: list[list[_Segment]] = [[] for _ in range(region_chunks(total_bytes))]
    whole: list[Placement] = []
    for p in placements:
        if not _host_contiguous(p.live):
            whole.append(p)
            continue
        with torch.no_grad():
            target = as_bytes(p.live.detach()).numpy()
        start, end = p.offset, p.offset + p.nbytes
        while start < end:
            index = start // REGION_CHUNK_BYTES
            stop = min(end, (index + 1) * REGION_CHUNK_BYTES)
            chunks[index].append(_Segment(start, stop, target, start - p.offset))
            start = stop
    return chunks, whole


def _run_threads(count: int, work: Callable[[int], None]) -> None:
    """Runs `work(k)` for k in 0..count-1, k=0 on the calling thread; re-raises the first error."""
    failures: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            work(k)
        except BaseException as err:  # re-raised on the calling thread
            failures.append(err)

    helpers = [
        threading.Thread(target=guarded, args=(k,), name=f"slotio-{k}", daemon=True)
        for k in range(1, count)
    ]
    for helper in helpers:
        helper.start()
    try:
        guarded(0)
    finally:
        for helper in helpers:
            helper.join()
    if failures:
        raise failures[0]


def _workers(threads: int | None, chunks: int) -> int:
    return max(1, min(threads or torch.get_num_threads(), MAX_RESTORE_THREADS, chunks))


def hash_region(slot: Slot, *, total_bytes: int, threads: int | None = None) -> int:
    """The region digest of the slot's first `total_bytes` bytes, chunks hashed on `threads`
    threads (default: torch's intra-op threads, at most MAX_RESTORE_THREADS); reads only.

    The restore's verification pass: a slot is proven intact before a single live byte is
    touched (R13.2), so a rejected slot leaves the live state exactly as it was.
    """
    data = slot.data
    count = region_chunks(total_bytes)
    digests = [0] * count
    workers = _workers(threads, count)

    def work(first: int) -> None:
        for index in range(first, count, workers):
            lo = index * REGION_CHUNK_BYTES
            hi = min(total_bytes, lo + REGION_CHUNK_BYTES)
            digests[index] = xxhash.xxh3_64_intdigest(data[lo:hi])

    _run_threads(workers, work)
    return combine_chunk_digests(digests)


def copy_out(
    slot: Slot,
    placements: Sequence[Placement],
    *,
    total_bytes: int,
    threads: int | None = None,
) -> None:
    """Copies every placement out of the slot into the live tensors, chunk by chunk on
    `threads` threads (numpy's copy releases the GIL); device or strided tensors are copied
    whole on the calling thread. Call only after `hash_region` verified the slot."""
    chunks, whole = _segments_by_chunk(placements, total_bytes)
    region = np.frombuffer(slot.data, dtype=np.uint8, count=total_bytes)
    workers = _workers(threads, len(chunks))

    def work(first: int) -> None:
        for index in range(first, len(chunks), workers):
            for s in chunks[index]:
                length = s.end - s.start
                np.copyto(
                    s.target[s.target_offset : s.target_offset + length],
                    region[s.start : s.end],
                )

    _run_threads(workers, work)
    if whole:
        tensor = region_tensor(slot)
        for p in whole:
            _copy_whole(tensor, p, to_slot=False)
