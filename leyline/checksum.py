"""The checksums every Tolaria component uses, defined once (R6.4).

Data (snapshot slots, checkpoint payloads) is hashed with xxh3-64, about
14 GB/s here and released from the GIL, so a background hash does not stall
training. Small fixed headers (WAL records) use CRC32C (hardware SSE4.2).
zlib.crc32 (2.5 GB/s) is never used for data.
"""

from __future__ import annotations

from collections.abc import Iterable

import google_crc32c
import xxhash

from leyline.v1.resilience_pb2 import ChecksumAlgorithm

DATA_ALGORITHM = ChecksumAlgorithm.CHECKSUM_ALGORITHM_XXH3_64
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
