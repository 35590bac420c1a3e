"""Hypothesis strategies for the sidecar's durable records (torch-free, unlike tests/strategies.py).

Keep examples small: they feed property tests that must stay fast on a loaded 2-core box.
"""

from __future__ import annotations

from hypothesis import strategies as st

from leyline.v1.resilience_pb2 import CheckpointRecord, ChecksumAlgorithm

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def transaction_ids() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=16, max_size=16)


@st.composite
def checkpoint_records(draw: st.DrawFn) -> CheckpointRecord:
    """Any CheckpointRecord a store could commit (the header carries its transaction id)."""
    record = CheckpointRecord(
        version=draw(U32),
        checkpoint_id=draw(st.text(max_size=40)),
        sequence=draw(U64),
        transaction_id=draw(transaction_ids()),
        epoch=draw(U32),
        global_step=draw(U64),
        file_name=draw(st.text(max_size=60)),
        payload_bytes=draw(U64),
        checksum_algorithm=draw(st.sampled_from(list(ChecksumAlgorithm.values()))),
        payload_checksum=draw(st.binary(min_size=8, max_size=8)),
        snapshot_generation=draw(U64),
        run_id=draw(st.text(max_size=40)),
    )
    record.committed_at.FromNanoseconds(draw(st.integers(0, 2**62)))
    return record
