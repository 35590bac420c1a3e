"""Bench M7: CRITICAL broadcast-to-ack latency through the control block, vs same-run baselines.

The writer is the sidecar's real `EmergencyMachine` over a real control block in shared memory.
N subscribers are separate processes; each runs a watcher thread that polls the generation
word every 1 ms (as the trainer's watcher does) and acks through `ControlBlock.ack`. One
message is timed from the machine's publish (the record's `raised_ns`) until the writer sees
all N acks (it spins, yielding, on the ack words); then the incident is resolved and the
RESUME acks are awaited untimed, so messages never overlap. A random 2-5 ms gap between
messages keeps them out of phase with the 1 ms poll.

Scenarios: (a) idle; (b) busy: the first `--busy-subscribers` subscriber processes also run a
2-thread torch-free CPU load (a numpy matmul thread and a pure-Python thread that holds the
GIL) plus a thread reading a large file from disk. Baselines, same run: shm spin ping-pong, a
pipe round trip, and a 1 ms sleep-poll echo (idle and busy). Prints p50/p99/max in ms and the
ratios to the sleep-poll baseline; targets (performance-anchors M7): idle p99 <= 2 ms, busy
p99 <= 10 ms and max <= 50 ms.

    python bench/emergency_ack.py                      # 1000 messages per scenario
    python bench/emergency_ack.py --n 50 --file-mb 8 --json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import mmap
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PARTICIPANT_IDS = (1, 2, 3, 5, 6, 7)
"""Control-block lines the subscribers use: TRAINER, KASMINA, TAMIYO, then spare lines (4 is
the sidecar's own)."""
RUN = "bench-m7-instance"
TIMEOUT_S = 10.0
"""A message whose acks take longer than this is recorded at this value (never seen so far)."""


# -- statistics ---------------------------------------------------------------------------------


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(s / 1e6 for s in samples_ns)
    return {
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else float("nan"),
        "n": float(len(ordered)),
    }


# -- load generators (subscriber side) --------------------------------------------------------


def start_load(file_path: Path | None) -> None:
    """Two CPU threads (numpy matmul, a GIL-holding Python loop) and a disk reader."""

    def matmul() -> None:
        try:
            import numpy as np
        except ImportError:  # no numpy: a second Python loop instead
            python_loop()
            return
        a = np.random.default_rng(0).random((384, 384))
        while True:
            a = (a @ a) / 384.0

    def python_loop() -> None:
        x = 0
        while True:
            x = (x + 1) % 1_000_003

    def reader() -> None:
        if file_path is None:
            return
        fadvise = getattr(os, "posix_fadvise", None)
        while True:
            with file_path.open("rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
                if fadvise is not None:
                    fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    for target in (matmul, python_loop, reader):
        threading.Thread(target=target, daemon=True).start()


def wait_for_stdin_eof() -> None:
    """Subscribers live until the bench closes their stdin."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(1):
            pass


def run_subscriber(args: argparse.Namespace) -> None:
    from leyline.shm import ControlBlock, ShmError

    control = ControlBlock.attach(Path(args.shm_dir) / f"tolaria-{RUN}-ctl", instance_id=RUN)
    participant = args.participant
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.busy:
        start_load(Path(args.file) if args.file else None)

    def watch() -> None:
        seen = control.emergency_generation()
        while True:
            time.sleep(0.001)
            generation = control.emergency_generation()
            if generation == seen:
                continue
            try:
                record = control.read_emergency()
            except ShmError:
                continue  # the writer was preempted mid-write: read again next millisecond
            control.ack(participant, record.generation, record.level, frozen=record.level == 4)
            seen = record.generation

    threading.Thread(target=watch, daemon=True).start()
    control.register(participant, os.getpid(), 1)
    wait_for_stdin_eof()
    os._exit(0)


class Words:
    """Three u64 words in a shared file: A (writer -> echo), B (echo -> writer), C (stop)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 4096)
        finally:
            os.close(fd)
        self.a = ctypes.c_uint64.from_buffer(self._mm, 0)
        self.b = ctypes.c_uint64.from_buffer(self._mm, 64)
        self.c = ctypes.c_uint64.from_buffer(self._mm, 128)

    def close(self) -> None:
        del self.a, self.b, self.c  # release the buffer exports before unmapping
        self._mm.close()


def run_echo(args: argparse.Namespace) -> None:
    """Baseline children: `spin` and `sleep` echo word A into word B; `pipe` echoes bytes."""
    if args.role == "pipe-echo":
        while byte := os.read(0, 1):
            os.write(1, byte)
        return
    words = Words(Path(args.word_file))
    if args.busy:
        start_load(Path(args.file) if args.file else None)
    words.b.value = 0
    seen = 0
    spin = args.role == "spin-echo"
    while not words.c.value:
        value = words.a.value
        if value != seen:
            words.b.value = value
            seen = value
        elif not spin:
            time.sleep(0.001)


# -- the writer side --------------------------------------------------------------------------


def _child(role: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *extra]


@contextlib.contextmanager
def subscribers(
    shm_dir: Path, count: int, busy: int, load_file: Path | None, switch_interval_ms: float
) -> Iterator[list[int]]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    ids = list(PARTICIPANT_IDS[:count])
    try:
        for i, participant in enumerate(ids):
            flags = ["--shm-dir", str(shm_dir), "--participant", str(participant)]
            if switch_interval_ms:
                flags += ["--switch-interval-ms", str(switch_interval_ms)]
            if i < busy:
                flags.append("--busy")
                if load_file is not None:
                    flags += ["--file", str(load_file)]
            procs.append(
                subprocess.Popen(_child("subscriber", *flags), stdin=subprocess.PIPE, env=env)
            )
        yield ids
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


WRITER_POLL_S = [0.0]
"""How the writer waits for acks: 0 spins (yielding), else sleeps this long between looks
(the sidecar's monitor sleeps 1 ms), so the writer does not take a core from the load."""


def _spin_until(done: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        if WRITER_POLL_S[0]:
            time.sleep(WRITER_POLL_S[0])
        else:
            os.sched_yield()
    return True


def measure_critical(
    shm_dir: Path,
    n: int,
    count: int,
    busy: int,
    load_file: Path | None,
    seed: int,
    switch_interval_ms: float = 0.0,
) -> dict[str, list[int]]:
    """Raises n CRITICALs through a real `EmergencyMachine`; returns the latencies (ns)."""
    from prometheus_client import CollectorRegistry

    from leyline import AnomalyKind, EmergencyLevel, EmergencySignal
    from leyline.shm import PARTICIPANT_FLAG_ATTACHED, ControlBlock
    from leyline.spec import DetectionSpec, EmergencySpec, RollbackSpec
    from tolaria_sidecar.config import Tuning
    from tolaria_sidecar.emergency import EmergencyMachine
    from tolaria_sidecar.events import EventLog
    from tolaria_sidecar.metrics import SidecarMetrics
    from tolaria_sidecar.protocols import MonotonicClock

    logging.getLogger("tolaria_sidecar").setLevel(logging.CRITICAL + 1)  # one line per raise
    path = shm_dir / f"tolaria-{RUN}-ctl"
    path.unlink(missing_ok=True)
    control = ControlBlock.create(path, 5, instance_id=RUN)
    machine = EmergencyMachine(
        run_id=RUN,
        control=control,
        emergency=EmergencySpec(),
        detection=DetectionSpec(),
        rollback=RollbackSpec(),
        tuning=Tuning(),
        clock=MonotonicClock(),
        events=EventLog(RUN, capacity=1000),
        metrics=SidecarMetrics(CollectorRegistry()),
    )
    visible: list[int] = []
    written: list[int] = []
    rng = random.Random(seed)
    with subscribers(shm_dir, count, busy, load_file, switch_interval_ms) as ids:
        if not _spin_until(
            lambda: all(control.participant(p).flags & PARTICIPANT_FLAG_ATTACHED for p in ids),
            60.0,
        ):
            raise RuntimeError("subscribers did not register within 60 s")
        machine.attach_trainer(1)
        time.sleep(0.5 if busy else 0.05)  # let the load threads get going
        signal = EmergencySignal(
            level=EmergencyLevel.EMERGENCY_LEVEL_CRITICAL,
            kind=AnomalyKind.ANOMALY_KIND_MANUAL,
            reason="bench",
        )
        for _ in range(n):
            time.sleep(rng.uniform(0.002, 0.005))
            generation, _ = machine.raise_signal(signal)
            raised = control.read_emergency().raised_ns
            ok = _spin_until(
                lambda g=generation: all(control.participant(p).ack_generation >= g for p in ids)
            )
            seen = time.monotonic_ns()
            lines = [control.participant(p) for p in ids]
            visible.append(seen - raised if ok else int(TIMEOUT_S * 1e9))
            written.append(max(line.acked_ns for line in lines) - raised if ok else visible[-1])
            machine.poll()
            resolved = control.emergency_generation() + 1
            if machine.active() is not None:
                active = machine.active()
                assert active is not None
                machine.resolve(active.generation, "bench", "next message")
            _spin_until(
                lambda g=resolved: all(control.participant(p).ack_generation >= g for p in ids)
            )
    control.close()
    path.unlink(missing_ok=True)
    return {"visible": visible, "written": written}


def measure_echo(
    role: str, shm_dir: Path, n: int, *, busy: bool, load_file: Path | None, seed: int
) -> list[int]:
    """Round trips through one echo child: spin or 1 ms sleep-poll on shm words, or a pipe."""
    rng = random.Random(seed)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    samples: list[int] = []
    if role == "pipe-echo":
        proc = subprocess.Popen(
            _child(role), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        out, back = proc.stdin.fileno(), proc.stdout.fileno()
        for _ in range(n):
            start = time.monotonic_ns()
            os.write(out, b"x")
            os.read(back, 1)
            samples.append(time.monotonic_ns() - start)
        proc.stdin.close()
        proc.wait(10)
        return samples
    word_file = shm_dir / f"words-{role}"
    word_file.write_bytes(bytes(4096))
    words = Words(word_file)
    words.b.value = 1  # the child clears it when it is ready
    flags = ["--word-file", str(word_file)]
    if busy:
        flags.append("--busy")
        if load_file is not None:
            flags += ["--file", str(load_file)]
    proc = subprocess.Popen(_child(role, *flags), env=env)
    try:
        if not _spin_until(lambda: words.b.value == 0, 60.0):
            raise RuntimeError(f"{role} child did not start")
        if busy:
            time.sleep(0.5)
        spin = role == "spin-echo"
        for i in range(1, n + 1):
            if not spin:
                time.sleep(rng.uniform(0.002, 0.005))
            start = time.monotonic_ns()
            words.a.value = i
            if spin:
                while words.b.value != i:
                    pass
                samples.append(time.monotonic_ns() - start)
            else:
                ok = _spin_until(lambda value=i: words.b.value == value)
                samples.append(time.monotonic_ns() - start if ok else int(TIMEOUT_S * 1e9))
    finally:
        words.c.value = 1
        proc.wait(10)
        words.close()
        word_file.unlink(missing_ok=True)
    return samples


def make_load_file(directory: Path, size_mb: int) -> Path | None:
    if size_mb <= 0:
        return None
    path = directory / "load.bin"
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size_mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [f"{'scenario':<28} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'n':>6}"]
    for name, r in results.items():
        rows.append(
            f"{name:<28} {r['p50']:>9.3f} {r['p99']:>9.3f} {r['max']:>9.3f} {int(r['n']):>6}"
        )
    ratios = []
    for scenario, baseline in (
        ("critical_idle", "sleep_poll_idle"),
        ("critical_busy", "sleep_poll_busy"),
        ("critical_idle", "pipe_roundtrip"),
        ("critical_idle", "spin_pingpong"),
    ):
        if scenario in results and baseline in results:
            s, b = results[scenario], results[baseline]
            ratios.append(
                f"{scenario} / {baseline}: p50 x{s['p50'] / b['p50']:.2f}, "
                f"p99 x{s['p99'] / b['p99']:.2f}"
            )
    checks = []
    if "critical_idle" in results:
        checks.append(f"idle p99 <= 2 ms: {results['critical_idle']['p99'] <= 2.0}")
    if "critical_busy" in results:
        busy = results["critical_busy"]
        checks.append(f"busy p99 <= 10 ms: {busy['p99'] <= 10.0}")
        checks.append(f"busy max <= 50 ms: {busy['max'] <= 50.0}")
    return "\n".join([*rows, "", *ratios, "", "M7 targets: " + "; ".join(checks)])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--n", type=int, default=1000, help="messages per scenario")
    parser.add_argument("--subscribers", type=int, default=3, help="subscriber processes (<= 6)")
    parser.add_argument(
        "--busy-subscribers", type=int, default=1, help="subscribers running the load when busy"
    )
    parser.add_argument("--file-mb", type=int, default=256, help="size of the file read in load")
    parser.add_argument("--scenarios", default="idle,busy", help="comma list: idle, busy")
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.0,
        help="sys.setswitchinterval in the subscribers (0: Python's 5 ms); a shorter GIL "
        "switch interval is the trainer-side lever when a Python thread holds the GIL",
    )
    parser.add_argument(
        "--writer-poll-ms",
        type=float,
        default=0.0,
        help="writer waits for acks by sleeping this long between looks (0: spin, yielding)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--shm-dir", help=argparse.SUPPRESS)
    parser.add_argument("--participant", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--word-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "subscriber":
        run_subscriber(args)
        return {}
    if args.role in ("spin-echo", "sleep-echo", "pipe-echo"):
        run_echo(args)
        return {}
    if not 1 <= args.subscribers <= len(PARTICIPANT_IDS):
        parser.error(f"--subscribers must be 1..{len(PARTICIPANT_IDS)}")
    scenarios = [s for s in args.scenarios.split(",") if s]
    WRITER_POLL_S[0] = args.writer_poll_ms / 1e3
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    results: dict[str, dict[str, float]] = {}
    written: dict[str, dict[str, float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="m7-", dir=shm_root) as shm_text,
        tempfile.TemporaryDirectory(prefix="m7-load-") as load_text,
    ):
        shm_dir = Path(shm_text)
        load_file = make_load_file(Path(load_text), args.file_mb) if "busy" in scenarios else None
        results["spin_pingpong"] = stats(
            measure_echo("spin-echo", shm_dir, args.n, busy=False, load_file=None, seed=args.seed)
        )
        results["pipe_roundtrip"] = stats(
            measure_echo("pipe-echo", shm_dir, args.n, busy=False, load_file=None, seed=args.seed)
        )
        for scenario in scenarios:
            busy = scenario == "busy"
            results[f"sleep_poll_{scenario}"] = stats(
                measure_echo(
                    "sleep-echo", shm_dir, args.n, busy=busy, load_file=load_file, seed=args.seed
                )
            )
            measured = measure_critical(
                shm_dir,
                args.n,
                args.subscribers,
                args.busy_subscribers if busy else 0,
                load_file,
                args.seed,
                args.switch_interval_ms,
            )
            results[f"critical_{scenario}"] = stats(measured["visible"])
            written[f"critical_{scenario}_acks_written"] = stats(measured["written"])
    results.update(written)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"M7 CRITICAL ack latency, {args.subscribers} subscriber processes, "
            f"{args.n} messages per scenario, busy = {args.busy_subscribers} subscriber(s) with "
            f"2 CPU threads + a {args.file_mb} MiB file read; GIL switch interval "
            f"{args.switch_interval_ms or 5.0:g} ms in the subscribers; writer "
            + (f"polls every {args.writer_poll_ms:g} ms" if args.writer_poll_ms else "spins")
        )
        print(table(results))
    return results


if __name__ == "__main__":
    main()
