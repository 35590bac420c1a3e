"""Copy bandwidth of this machine, and from it whether the fast tier fits its commit budget
(R6.1).

Called once by `allocation.SlotAllocator.attach`, when the trainer first declares its state
size; the answer goes to the trainer (Attach), the status and the metrics. The measurement
copies between two private anonymous buffers: it never touches a slot, the trainer's memory
or the disk, and it never runs on the trainer's hot path.
"""

from __future__ import annotations

import ctypes
import mmap
import time

from leyline.spec import RollbackSpec, SnapshotSpec
from tolaria_sidecar.values import Feasibility


def measure_copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Bytes per second of one memcpy between two pre-faulted anonymous buffers (best of
    `repeats`, so one preempted copy on a busy machine does not condemn the fast tier)."""
    src = mmap.mmap(-1, nbytes)
    dst = mmap.mmap(-1, nbytes)
    try:
        for buf, fill in ((src, 0x5A), (dst, 0)):
            anchor = ctypes.c_char.from_buffer(buf)
            ctypes.memset(ctypes.addressof(anchor), fill, nbytes)  # faults every page in
            del anchor
        best_ns = 0
        with memoryview(src) as s, memoryview(dst) as d:
            for _ in range(repeats):
                start = time.perf_counter_ns()
                d[:] = s
                elapsed = max(1, time.perf_counter_ns() - start)
                best_ns = elapsed if best_ns == 0 else min(best_ns, elapsed)
        return nbytes / (best_ns / 1e9)
    finally:
        src.close()
        dst.close()


def assess(
    state_bytes: int, copy_bytes_per_second: float, rollback: RollbackSpec, snapshots: SnapshotSpec
) -> Feasibility:
    """`state_bytes / bandwidth <= rollback.commit_ms` -> feasible; else the reason, in numbers."""
    if not snapshots.enabled:
        return Feasibility(False, "spec.snapshots.enabled is false", copy_bytes_per_second)
    needs_ms = state_bytes / copy_bytes_per_second * 1e3
    if needs_ms <= rollback.commit_ms:
        return Feasibility(True, "", copy_bytes_per_second)
    reason = (
        f"{state_bytes / 1e9:.2f} GB at {copy_bytes_per_second / 1e9:.1f} GB/s needs "
        f"{needs_ms:.0f} ms > {rollback.commit_ms:g} ms commit budget"
    )
    return Feasibility(False, reason, copy_bytes_per_second)
