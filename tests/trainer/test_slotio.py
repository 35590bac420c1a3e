"""Copying tensors in and out of a slot region while computing its digest (R6.1, R6.2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from leyline.checksum import REGION_CHUNK_BYTES, region_digest
from leyline.shm import Slot
from tolaria_trainer.recovery.slotio import Placement, copy_hashing, copy_out, hash_region

ALIGN = 4096


@pytest.fixture
def slot(tmp_path: Path) -> Iterator[Slot]:
    made = Slot.create(
        tmp_path / "slot",
        0,
        8 * REGION_CHUNK_BYTES,
        1 << 16,
        prefault=True,
        instance_id="test-slotio",
    )
    try:
        yield made
    finally:
        made.close()


def tensors() -> list[torch.Tensor]:
    """Sizes that straddle chunk boundaries, a tiny one, odd dtypes, a strided view."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * REGION_CHUNK_BYTES // 4 + 11, generator=g)
    return [
        torch.randn(5, generator=g),
        big,
        torch.randn(700, 300, generator=g).to(torch.bfloat16),
        torch.randint(0, 100, (4097,), generator=g, dtype=torch.int64),
        torch.randn(64, 32, generator=g).t(),  # not contiguous: copied whole
        torch.tensor(True),
    ]


def layout(live: list[torch.Tensor]) -> tuple[list[Placement], int]:
    offset, out = 0, []
    for t in live:
        nbytes = t.numel() * t.element_size()
        out.append(Placement(offset, nbytes, t))
        offset = -(-(offset + nbytes) // ALIGN) * ALIGN  # padding between tensors
    return out, offset


@pytest.mark.req("R6.1")
def test_a_snapshot_copy_returns_the_region_digest_of_what_it_wrote(slot: Slot) -> None:
    slot.data[: 8 * REGION_CHUNK_BYTES] = b"\xff" * (8 * REGION_CHUNK_BYTES)  # stale bytes
    placements, total = layout(tensors())
    found = copy_hashing(slot, placements, total_bytes=total)
    assert found == region_digest(slot.data[:total])


@pytest.mark.req("R6.2")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_verified_region_copies_back_every_tensor_on_any_thread_count(
    slot: Slot, threads: int
) -> None:
    saved = tensors()
    placements, total = layout(saved)
    written = copy_hashing(slot, placements, total_bytes=total)
    assert hash_region(slot, total_bytes=total, threads=threads) == written
    live = [torch.zeros_like(t) for t in saved]
    live[4] = torch.zeros(64, 32).t()  # the strided target stays strided
    targets = [Placement(p.offset, p.nbytes, t) for p, t in zip(placements, live, strict=True)]
    copy_out(slot, targets, total_bytes=total, threads=threads)
    for before, after in zip(saved, live, strict=True):
        assert torch.equal(before, after)


@pytest.mark.req("R13.2")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_damaged_byte_in_any_chunk_changes_the_region_digest(slot: Slot, threads: int) -> None:
    saved = tensors()
    placements, total = layout(saved)
    written = copy_hashing(slot, placements, total_bytes=total)
    for offset in (0, REGION_CHUNK_BYTES + 3, total // 2, total - 1):
        slot.data[offset] ^= 0x40
        assert hash_region(slot, total_bytes=total, threads=threads) != written
        slot.data[offset] ^= 0x40
    assert hash_region(slot, total_bytes=total, threads=threads) == written
