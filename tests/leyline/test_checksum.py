"""The region digest every snapshot slot and manifest carries (R6.4)."""

from __future__ import annotations

import struct

import pytest
import xxhash

from leyline.checksum import (
    DATA_ALGORITHM,
    REGION_ALGORITHM,
    REGION_CHUNK_BYTES,
    combine_chunk_digests,
    region_chunks,
    region_digest,
    xxh3,
)
from leyline.v1.resilience_pb2 import ChecksumAlgorithm


def blob(n: int) -> bytes:
    return bytes((i * 31 + 7) % 251 for i in range(n))


@pytest.mark.req("R6.4")
@pytest.mark.parametrize("length", [0, 1, REGION_CHUNK_BYTES, 2 * REGION_CHUNK_BYTES + 5])
def test_the_region_digest_is_xxh3_over_the_little_endian_chunk_digests(length: int) -> None:
    data = blob(length)
    chunks = [data[i : i + REGION_CHUNK_BYTES] for i in range(0, length, REGION_CHUNK_BYTES)]
    expected = xxhash.xxh3_64_intdigest(
        struct.pack(f"<{len(chunks)}Q", *(xxhash.xxh3_64_intdigest(c) for c in chunks))
    )
    assert region_chunks(length) == len(chunks)
    assert region_digest(memoryview(data)) == expected
    assert combine_chunk_digests([xxh3(c) for c in chunks]) == expected


@pytest.mark.req("R6.4")
def test_one_flipped_byte_in_any_chunk_changes_the_region_digest() -> None:
    data = bytearray(blob(3 * REGION_CHUNK_BYTES))
    clean = region_digest(memoryview(data))
    data[2 * REGION_CHUNK_BYTES + 17] ^= 1
    assert region_digest(memoryview(data)) != clean


@pytest.mark.req("R6.4")
def test_the_plain_algorithm_is_still_readable_for_older_records() -> None:
    data = blob(REGION_CHUNK_BYTES + 3)
    assert region_digest(memoryview(data), DATA_ALGORITHM) == xxh3(data)
    assert region_digest(memoryview(data), DATA_ALGORITHM) != region_digest(memoryview(data))


@pytest.mark.req("R6.4")
def test_a_non_data_algorithm_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="algorithm 2 is not a region hash"):
        region_digest(memoryview(b"x"), ChecksumAlgorithm.CHECKSUM_ALGORITHM_CRC32C)


def test_regions_use_the_chunked_leyline_algorithm() -> None:
    assert REGION_ALGORITHM == ChecksumAlgorithm.CHECKSUM_ALGORITHM_XXH3_64_CHUNKED_1MIB
