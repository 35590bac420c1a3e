"""Bench: durable checkpoint commit and full load vs same-run raw I/O (performance-anchors M5, M6).

M6 (i): `DurableStore.write` bytes/s from its call until durable (file fdatasync, directory
fsync, WAL BEGIN and COMMIT) against a raw `write` + `fsync` of the same bytes into a new file,
with as many earlier files kept as the store keeps; the whole call (which then deletes the
checkpoint past `keep`) and a raw write into just-freed blocks are reported beside it.
M6 (ii): WAL record append p50/p99 against a raw `O_DSYNC` 4 KiB append.
M5: `load_latest` into a pre-faulted buffer (every byte verified) with the page cache dropped
before each run, against a raw cold read of the same file, with and without xxh3.
Candidates and baselines alternate in one run, the first of each round rotating.
Also prints the same-run memcpy rate so machines and runs can be compared. Never imports torch.

    python bench/durable_commit.py                       # 1.2 GB, 5 runs, 1000 appends
    python bench/durable_commit.py --mb 64 --runs 5 --appends 200 --dir /mnt/ckpt
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from leyline.checksum import DATA_ALGORITHM
from leyline.spec.resilience import CheckpointSpec
from leyline.v1.resilience_pb2 import CheckpointRecord
from tolaria_sidecar.checkpoints import CHUNK_BYTES, DurableStore, drop_page_cache
from tolaria_sidecar.wal import WriteAheadLog

Stats = dict[str, float]


def _percentile(ordered: list[int], p: float) -> float:
    return float(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))])


def _latency_us(samples_ns: list[int]) -> Stats:
    ordered = sorted(samples_ns)
    return {
        "p50_us": _percentile(ordered, 50) / 1e3,
        "p99_us": _percentile(ordered, 99) / 1e3,
        "max_us": ordered[-1] / 1e3,
        "n": float(len(ordered)),
    }


def _throughput(samples_ns: list[int], nbytes: int) -> Stats:
    median = statistics.median(samples_ns)
    return {
        "median_s": median / 1e9,
        "min_s": min(samples_ns) / 1e9,
        "max_s": max(samples_ns) / 1e9,
        "gb_per_s": nbytes / median,
        "n": float(len(samples_ns)),
    }


def _timed(fn: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def _payload(nbytes: int) -> bytearray:
    """Incompressible bytes, built from one random block (os.urandom of 1 GB would take seconds)."""
    block = os.urandom(16 << 20)
    data = bytearray(nbytes)
    view = memoryview(data)
    for start in range(0, nbytes, len(block)):
        end = min(start + len(block), nbytes)
        view[start:end] = block[: end - start]
    return data


def _prefault(buffer: bytearray) -> None:
    """Touches every page now, so no first-touch fault lands in a timed load."""
    ctypes.memset((ctypes.c_char * len(buffer)).from_buffer(buffer), 1, len(buffer))


def _raw_write_fsync(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = data[start : start + CHUNK_BYTES]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path, into: memoryview, *, head: int, hash_it: bool) -> int:
    """Reads `head` bytes, then the rest in 16 MiB pieces: the store's I/O pattern, no checks."""
    hasher = xxhash.xxh3_64()
    total = 0
    with io.FileIO(path, "r") as f:
        if hasattr(os, "posix_fadvise"):  # as the store does
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if head:
            total = f.readinto(into[:head])
        while True:
            chunk = into[total : total + CHUNK_BYTES]
            got = f.readinto(chunk)
            if not got:
                break
            if hash_it:
                hasher.update(chunk[:got])
            total += got
    return total


def _order(run: int, kinds: int) -> list[int]:
    """0..kinds-1 starting at `run % kinds`: which kind goes first changes every run."""
    return [(run + i) % kinds for i in range(kinds)]


def bench_commit(directory: Path, data: memoryview, runs: int) -> dict[str, Stats]:
    """Store writes and two raw baselines, interleaved (rotating which goes first).

    `raw_write_fsync` writes a new file while the last `keep` raw files are kept, as the store
    must; `raw_write_fsync_reuse` deletes the previous file first, so it rewrites blocks just
    freed, which a VM's disk serves much faster than fresh ones (measured ~1.8x here).
    """
    spec = CheckpointSpec()
    store = DurableStore(directory / "store", spec, run_id="bench")
    kept: list[Path] = []
    samples: dict[str, list[int]] = {
        "commit": [],
        "write_call": [],
        "raw_write_fsync": [],
        "raw_write_fsync_reuse": [],
    }
    reuse = directory / "raw-reuse.bin"

    def store_write(run: int) -> None:
        write = functools.partial(
            store.write,
            manifest=b"{}",
            data=data,
            epoch=run,
            global_step=run,
            snapshot_generation=run,
        )
        samples["write_call"].append(_timed(write))
        samples["commit"].append(store.last_durable_ns)

    def raw_kept(run: int) -> None:
        path = directory / f"raw-{run}.bin"
        samples["raw_write_fsync"].append(_timed(functools.partial(_raw_write_fsync, path, data)))
        kept.append(path)
        while len(kept) > spec.keep:
            kept.pop(0).unlink()

    def raw_reuse(run: int) -> None:
        reuse.unlink(missing_ok=True)
        write = functools.partial(_raw_write_fsync, reuse, data)
        samples["raw_write_fsync_reuse"].append(_timed(write))

    kinds = (store_write, raw_kept, raw_reuse)
    try:
        for run in range(runs):
            for i in _order(run, len(kinds)):
                kinds[i](run)
    finally:
        store.close()
        for path in [*kept, reuse]:
            path.unlink(missing_ok=True)
    return {name: _throughput(ns, len(data)) for name, ns in samples.items()}


def bench_wal(directory: Path, appends: int) -> tuple[Stats, Stats]:
    wal_dir = directory / "wal"
    log = WriteAheadLog(wal_dir, CheckpointSpec(wal_rotate_bytes=1 << 40))
    record = CheckpointRecord(
        version=1,
        checkpoint_id="bench/0000000001",
        sequence=1,
        transaction_id=os.urandom(16),
        epoch=12,
        global_step=120_000,
        file_name="ckpt-0000000001-e12.bin",
        payload_bytes=1_200_000_000,
        checksum_algorithm=DATA_ALGORITHM,
        payload_checksum=os.urandom(8),
        snapshot_generation=77,
        run_id="bench",
    )
    record.committed_at.FromNanoseconds(time.time_ns())
    raw_fd = os.open(
        wal_dir / "raw-dsync.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_DSYNC, 0o644
    )
    block = os.urandom(4096)
    wal_ns: list[int] = []
    raw_ns: list[int] = []
    try:
        for i in range(appends):
            order = ("wal", "raw") if i % 2 == 0 else ("raw", "wal")
            for kind in order:
                if kind == "wal":
                    log.commit(record)
                    wal_ns.append(log.last_append_ns)
                else:
                    raw_ns.append(_timed(lambda: os.write(raw_fd, block)))
    finally:
        os.close(raw_fd)
        log.close()
    return _latency_us(wal_ns), _latency_us(raw_ns)


def bench_load(directory: Path, nbytes: int, runs: int) -> tuple[dict[str, Stats], bool]:
    """`load_latest` and raw reads of the same file, page cache dropped before each, interleaved.

    The raw reads use the store's I/O pattern (the header and manifest, then 16 MiB pieces):
    here a page-unaligned sequence of 16 MiB reads keeps readahead ahead of the reader and runs
    ~1.5x faster than a page-aligned one, so an aligned baseline would flatter the store.
    """
    store = DurableStore(directory / "store", CheckpointSpec(), run_id="bench")
    latest = store.latest()
    if latest is None:
        raise RuntimeError("bench_load needs a committed checkpoint (run bench_commit first)")
    path = store.directory / latest.file_name
    size = path.stat().st_size
    head = size - latest.payload_bytes
    into = bytearray(size)
    _prefault(into)
    view = memoryview(into)
    samples: dict[str, list[int]] = {
        "load_latest_cold": [],
        "raw_cold_read": [],
        "raw_cold_read_xxh3": [],
    }
    calls: dict[str, Callable[[], object]] = {
        "load_latest_cold": functools.partial(store.load_latest, view),
        "raw_cold_read": functools.partial(_raw_read, path, view, head=head, hash_it=False),
        "raw_cold_read_xxh3": functools.partial(_raw_read, path, view, head=head, hash_it=True),
    }
    names = list(samples)
    dropped = True
    try:
        for run in range(runs):
            for i in _order(run, len(names)):
                name = names[i]
                dropped &= drop_page_cache(path)
                store.drop_page_cache()
                samples[name].append(_timed(calls[name]))
    finally:
        calls.clear()
        view.release()
        store.close()
    return {name: _throughput(ns, nbytes) for name, ns in samples.items()}, dropped


def bench_memcpy(data: bytearray) -> Stats:
    target = bytearray(len(data))
    _prefault(target)
    src = (ctypes.c_char * len(data)).from_buffer(data)
    dst = (ctypes.c_char * len(target)).from_buffer(target)
    copy = functools.partial(ctypes.memmove, dst, src, len(data))
    samples = [_timed(copy) for _ in range(3)]
    del copy, src, dst
    return _throughput(samples, len(data))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mb", type=int, default=1200, help="payload size in MB (10^6 bytes)")
    parser.add_argument("--runs", type=int, default=5, help="A/B runs of commit and load")
    parser.add_argument("--appends", type=int, default=1000, help="WAL appends of each kind")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: /tmp)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    nbytes = args.mb * 1_000_000
    directory = Path(tempfile.mkdtemp(prefix="durable-bench-", dir=args.dir))
    try:
        data = _payload(nbytes)
        memcpy = bench_memcpy(data)
        writes = bench_commit(directory, memoryview(data), args.runs)
        wal_append, raw_append = bench_wal(directory, args.appends)
        del data
        loads, dropped = bench_load(directory, nbytes, args.runs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    raw_write = writes["raw_write_fsync"]
    raw_read = loads["raw_cold_read"]
    results: dict[str, dict[str, float]] = {
        "memcpy": memcpy,
        **writes,
        "wal_append": wal_append,
        "raw_dsync_append_4k": raw_append,
        **loads,
        "ratios": {
            "commit_throughput_vs_raw_write_fsync": writes["commit"]["gb_per_s"]
            / raw_write["gb_per_s"],
            "write_call_throughput_vs_raw_write_fsync": writes["write_call"]["gb_per_s"]
            / raw_write["gb_per_s"],
            "commit_throughput_vs_raw_write_fsync_reuse": writes["commit"]["gb_per_s"]
            / writes["raw_write_fsync_reuse"]["gb_per_s"],
            "wal_p50_vs_raw_dsync_p50": wal_append["p50_us"] / raw_append["p50_us"],
            "wal_p99_vs_raw_dsync_p99": wal_append["p99_us"] / raw_append["p99_us"],
            "load_time_vs_raw_cold_read": loads["load_latest_cold"]["median_s"]
            / raw_read["median_s"],
            "load_time_vs_raw_cold_read_xxh3": loads["load_latest_cold"]["median_s"]
            / loads["raw_cold_read_xxh3"]["median_s"],
            "page_cache_dropped": float(dropped),
        },
    }
    if args.json:
        print(json.dumps(results))
        return results
    print(
        f"durable commit and load: {nbytes / 1e9:.3g} GB payload, {args.runs} interleaved runs, "
        f"{args.appends} WAL appends, in {directory.parent}"
    )
    print(f"same-run memcpy: {memcpy['gb_per_s']:.2f} GB/s")
    print(f"{'':24} {'median s':>9} {'GB/s':>7} {'min s':>8} {'max s':>8}")
    for name in (
        "commit",
        "write_call",
        "raw_write_fsync",
        "raw_write_fsync_reuse",
        "load_latest_cold",
        "raw_cold_read",
        "raw_cold_read_xxh3",
    ):
        s = results[name]
        print(
            f"{name:24} {s['median_s']:9.3f} {s['gb_per_s']:7.2f} "
            f"{s['min_s']:8.3f} {s['max_s']:8.3f}"
        )
    print(f"{'':24} {'p50 us':>9} {'p99 us':>9} {'max us':>9}")
    for name in ("wal_append", "raw_dsync_append_4k"):
        s = results[name]
        print(f"{name:24} {s['p50_us']:9.1f} {s['p99_us']:9.1f} {s['max_us']:9.1f}")
    for name, value in results["ratios"].items():
        print(f"{name:44} {value:6.2f}")
    if not dropped:
        print("note: posix_fadvise is unavailable here; the 'cold' reads may be warm")
    return results


if __name__ == "__main__":
    main()
