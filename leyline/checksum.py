"""The checksums every Tolaria component uses, defined once (R6.4).

Data is hashed with xxh3-64: about 9 GB/s from memory and 22 GB/s from cache
on one core here, and released from the GIL, so a background hash does not
stall training. Snapshot regions (slot headers and snapshot manifests) use the
chunked form, `region_digest`: a digest of per-1-MiB-chunk digests, so a
restore can copy and verify chunk by chunk on every core, hashing each chunk
while it is still in cache (one pass over memory instead of two). Checkpoint
files hash their payload as one xxh3-64 stream while writing. Small fixed
headers (WAL records) use CRC32C (hardware SSE4.2). zlib.crc32 (2.5 GB/s) is
never used for data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import google_crc32c
import xxhash

from leyline.v1.resilience_pb2 import ChecksumAlgorithm

DATA_ALGORITHM = ChecksumAlgorithm.CHECKSUM_ALGORITHM_XXH3_64
"""Checkpoint file payloads: one xxh3-64 stream."""
REGION_ALGORITHM = ChecksumAlgorithm.CHECKSUM_ALGORITHM_XXH3_64_CHUNKED_1MIB
"""Snapshot regions (slot headers, snapshot manifests): `region_digest`."""
REGION_CHUNK_BYTES = 1 << 20
"""Chunk of `region_digest`: small enough to stay in L2/L3 between its copy and its hash."""
CHUNK_BYTES = 8 << 20
"""Hash in 8 MiB pieces so a reader of a live region can be interrupted between pieces."""


def xxh3(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a buffer, as an unsigned 64-bit integer."""
    return int(xxhash.xxh3_64_intdigest(data))


def xxh3_chunks(chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    """xxh3-64 over a sequence of buffers, equal to `xxh3` of their concatenation."""
    h = xxhash.xxh3_64()
    for chunk in chunks:
        h.update(chunk)
    return int(h.intdigest())


def xxh3_region(view: memoryview) -> int:
    """xxh3-64 of a (possibly huge) region, hashed piecewise."""
    return xxh3_chunks(view[i : i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES))


def region_chunks(length: int) -> int:
    """How many chunks `region_digest` splits a region of `length` bytes into."""
    return -(-length // REGION_CHUNK_BYTES)


def combine_chunk_digests(digests: Sequence[int]) -> int:
    """The region digest from its chunks' xxh3-64 digests, in chunk order."""
    return xxh3(struct.pack(f"<{len(digests)}Q", *digests))


def region_digest(view: memoryview, algorithm: int = REGION_ALGORITHM) -> int:
    """Digest of a snapshot region with `algorithm` (the chunked form unless a stored record
    says otherwise). Raises ValueError naming an algorithm that is not a data hash."""
    if algorithm == REGION_ALGORITHM:
        step = REGION_CHUNK_BYTES
        return combine_chunk_digests([xxh3(view[i : i + step]) for i in range(0, len(view), step)])
    if algorithm == DATA_ALGORITHM:
        return xxh3_region(view)
    raise ValueError(f"checksum algorithm {algorithm} is not a region hash")


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) of a small buffer, as an unsigned 32-bit integer."""
    return int(google_crc32c.value(bytes(data)))


def digest_bytes(value: int) -> bytes:
    """An xxh3-64 value as the 8 little-endian bytes stored in Leyline messages."""
    return value.to_bytes(8, "little")


def digest_int(value: bytes) -> int:
    """Inverse of `digest_bytes`; refuses anything but 8 bytes."""
    if len(value) != 8:
        raise ValueError(f"an xxh3-64 digest is 8 bytes, got {len(value)}")
    return int.from_bytes(value, "little")
