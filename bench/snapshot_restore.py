"""Bench M1-M3: shared-memory snapshot restore, crash re-attach restore and snapshot stall,
each against same-run baselines (performance-anchors §5).

The code under test is the real thing, wired as in `tests/trainer/test_snapshots.py` (no
sidecar): a `TrainingState` over an MLP of six square Linear layers with AdamW state populated
by one real step, `SnapshotWriter` copying into pre-faulted `Slot`s under a temporary
`TOLARIA_SHM_DIR` in /dev/shm, and `Restorer`. The bench stands in for the sidecar: it creates
the control block and the slots, so they outlive the child processes of M2.

M1: `Restorer.restore` (PREPARE, COMMIT, CONFIRM: model, optimizer, RNG and documents, every
byte hashed) against one contiguous `dst.copy_(src)` of the same bytes, a per-tensor copy of
the same layout without hashing, `torch.load(weights_only=True)` (and `mmap=True`) +
`load_state_dict`, and `dcp.load`, all from /dev/shm. Before every timed call a byte of every
tensor is changed and afterwards every restored tensor is hashed against the slot, untimed.
M2: a new process per trial (its interpreter start, `import torch` and `import tolaria` are
reported apart) times `ControlBlock.attach` + `Slot.attach` + restore into a fresh model and an
optimizer without state, against a raw `mmap` of the slot file plus one copy into a
pre-faulted buffer; then once more into the now-existing optimizer state.
M3 (i): per snapshot, the time the loop is blocked (`capture` + the `fence` after a real
forward/backward), against a synchronous memcpy, `torch.save` to /dev/shm with and without
CRC32, and the blocking part of `dcp.async_save`; the forward/backward is also timed with and
without a copy in flight, as the copy's cost moves there. (ii): steady-state overhead over
interleaved A/B/B/A segments of `--every` steps, with and without one snapshot per segment.

Candidates and baselines alternate (the first of each round rotates). The 1 GB memcpy rate is
measured at the start and the end so machines and runs can be compared, and each section
reports the share of CPU other processes used meanwhile (a shared 2-core VM is noisy).

    python bench/snapshot_restore.py                        # 100M params + AdamW, 9 rounds
    python bench/snapshot_restore.py --sizes 25,100 --json  # ~10 min on 2 cores
    python bench/snapshot_restore.py --sections overhead    # M3 (ii) alone
    python bench/snapshot_restore.py --params 0.2 --overhead-params 0.2 --steps 4 --every 2 \\
        --trials 2 --reattach-trials 1 --batch 8 --memcpy-mb 8   # seconds: the test's size
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash

from leyline import SnapshotManifest, StateComponent
from leyline.shm import ControlBlock, Slot, SlotHeader, control_name, shm_dir, slot_name
from leyline.spec import BudgetsSpec, RollbackSpec, SnapshotSpec
from tolaria_trainer.latency import percentile
from tolaria_trainer.recovery.restore import Restorer
from tolaria_trainer.recovery.slotio import as_bytes, region_tensor
from tolaria_trainer.recovery.snapshots import SnapshotWriter
from tolaria_trainer.state import TrainingState

Stats = dict[str, float]
SLOTS = 2
"""The sidecar's minimum (SnapshotSpec.slots ge=2): the writer alternates, one stays restorable."""
MANIFEST_BYTES = 64 * 1024
"""What the trainer asks the sidecar for (resilience.attach)."""
LAYERS = 6
CHILD_TIMEOUT_S = 600.0

TARGETS = {"m1_restore_vs_memcpy": 1.3, "m2_restore_vs_raw_remap": 1.2, "m3_overhead": 0.035}
"""performance-anchors §5: M1 <= 1.3x memcpy, M2 <= 1.2x raw re-map, M3 (ii) <= 3.5%."""

_CHILD = (
    "import time\n"
    "started_ns = time.monotonic_ns()\n"
    "import importlib.util, sys\n"
    "t = time.perf_counter_ns()\n"
    "import torch\n"
    "torch_ns = time.perf_counter_ns() - t\n"
    "t = time.perf_counter_ns()\n"
    "spec = importlib.util.spec_from_file_location('snapshot_restore_bench', sys.argv[1])\n"
    "bench = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(bench)\n"
    "rest_ns = time.perf_counter_ns() - t\n"
    "bench.reattach_child(sys.argv[2], started_ns=started_ns, import_torch_ns=torch_ns,\n"
    "                     import_rest_ns=rest_ns)\n"
)
"""M2's child: times `import torch` before anything else imports it, then runs this module."""


# -- statistics and timing ----------------------------------------------------------------------


def summary(samples_ns: list[int]) -> Stats:
    """Median, p95 (nearest rank), min and max in milliseconds, and the count."""
    ordered = sorted(samples_ns)
    return {
        "median_ms": statistics.median(ordered) / 1e6,
        "p95_ms": percentile(ordered, 95) / 1e6,
        "min_ms": ordered[0] / 1e6,
        "max_ms": ordered[-1] / 1e6,
        "n": float(len(ordered)),
    }


def paired_ratio(candidate_ns: list[int], baseline_ns: list[int]) -> float:
    """Median of per-round ratios: robust to the ±20% bandwidth drift between rounds."""
    return statistics.median(c / b for c, b in zip(candidate_ns, baseline_ns, strict=True))


def _order(run: int, kinds: int) -> list[int]:
    """0..kinds-1 starting at `run % kinds`: which kind goes first changes every round."""
    return [(run + i) % kinds for i in range(kinds)]


def _timed(fn: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def prefaulted(nbytes: int) -> torch.Tensor:
    """A byte buffer with every page touched, so no first-touch fault lands in a timed copy."""
    buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    buffer.fill_(1)
    return buffer


def measure_memcpy(nbytes: int, reps: int = 5) -> Stats:
    """One contiguous copy of `nbytes` between pre-faulted buffers; the run's bandwidth ruler."""
    src = prefaulted(nbytes)
    dst = prefaulted(nbytes)
    samples = [_timed(lambda: dst.copy_(src)) for _ in range(reps)]
    stats = summary(samples)
    stats["gb_per_s"] = nbytes / (stats["median_ms"] * 1e6)
    stats["bytes"] = float(nbytes)
    return stats


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call; the warnings are not the measurement."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class CpuWitness:
    """CPU time other processes used while a section ran, as a share of the machine.

    This VM is shared (other test runs, kernel threads): a section that ran beside a foreign
    load is not comparable with one that did not, so each section reports the share it saw.
    Reads /proc/stat; 0 where it does not exist.
    """

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._busy = self._busy_s()
        self._own = self._own_s()

    @staticmethod
    def _busy_s() -> float:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def foreign_share(self) -> float:
        wall = time.perf_counter() - self._wall
        foreign = (self._busy_s() - self._busy) - (self._own_s() - self._own)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if self._busy else 0.0


# -- the model and the state under test ---------------------------------------------------------


def width_for(params_m: float) -> int:
    """Square layer width for ~`params_m` million parameters in `LAYERS` layers, a multiple of
    64 (100M -> 4096, 25M -> 2048: the anchors' 403 MB and 101 MB models)."""
    width = math.sqrt(params_m * 1e6 / LAYERS)
    return max(64, round(width / 64) * 64)


def build_model(width: int, *, initialise: bool) -> torch.nn.Sequential:
    """The MLP. Without `initialise`, parameters are allocated and zeroed (pre-faulted, as a
    real init would leave them) but not drawn: a crash-resumed trainer overwrites them anyway."""
    device = None if initialise else torch.device("meta")
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(width, width, device=device))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    if not initialise:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


class Counter:
    """A JSON document source standing in for the loop position (restored with the tensors)."""

    def __init__(self) -> None:
        self.value = 0

    def save(self) -> dict[str, Any]:
        return {"value": self.value}

    def load(self, doc: Mapping[str, Any]) -> None:
        self.value = int(doc["value"])


def build_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, counter: Counter
) -> TrainingState:
    names = dict(model.named_parameters())
    return TrainingState(
        model=model,
        optimizer=lambda: optimizer,
        parameter_names=lambda: names,
        documents={"loop": (StateComponent.STATE_COMPONENT_DATA, (counter.save, counter.load))},
    )


def forward_backward(model: torch.nn.Module, batch: torch.Tensor) -> None:
    model(batch).pow(2).mean().backward()


def _hash(tensor: torch.Tensor) -> int:
    return int(xxhash.xxh3_64_intdigest(as_bytes(tensor.detach()).numpy().data))


def snapshot_hashes(slot: Slot, header: SlotHeader) -> dict[str, int]:
    """xxh3 of every model and optimizer tensor as the slot holds it (the expected state)."""
    manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
    data = slot.data
    return {
        e.name: int(xxhash.xxh3_64_intdigest(data[e.offset : e.offset + e.nbytes]))
        for e in manifest.tensors
        if not e.name.startswith("rng/")
    }


def check_restored(state: TrainingState, expected: Mapping[str, int], what: str) -> None:
    """Raises unless every live model and optimizer tensor hashes as in the snapshot."""
    live = {
        name: _hash(t)
        for name, component, t in state.live_tensors()
        if component != StateComponent.STATE_COMPONENT_RNG
    }
    if live.keys() != expected.keys():
        raise RuntimeError(f"{what}: restored tensors {sorted(live.keys() ^ expected.keys())}")
    wrong = [name for name, value in live.items() if value != expected[name]]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} tensors differ from the snapshot: {wrong[:3]}")


def perturb(state: TrainingState, counter: Counter) -> None:
    """Changes one element of every tensor and the document, so a restore that did nothing
    fails the check that follows it."""
    with torch.no_grad():
        for _, component, t in state.live_tensors():
            if component != StateComponent.STATE_COMPONENT_RNG:
                t.reshape(-1)[:1].add_(1)
    counter.value = -1


def _budgets() -> tuple[float, float, float]:
    spec = RollbackSpec()
    return spec.prepare_ms, spec.commit_ms, spec.confirm_ms


# -- the rig: live state, slots and writer ------------------------------------------------------


class Rig:
    """One model size: live state, the run's control block and slots, and one committed
    snapshot whose hashes every restore is checked against.

    A plain class, not a dataclass: the bench is loaded by path without a `sys.modules` entry
    (tests, M2's child), where dataclasses cannot resolve string annotations.
    """

    def __init__(self, params_m: float, batch_size: int, run_id: str) -> None:
        torch.manual_seed(0)
        self.params_m = params_m
        self.width = width_for(params_m)
        self.run_id = run_id
        self.model = build_model(self.width, initialise=True)
        self.optimizer = make_optimizer(self.model)
        self.counter = Counter()
        self.state = build_state(self.model, self.optimizer, self.counter)
        self.batch = torch.randn(batch_size, self.width)
        forward_backward(self.model, self.batch)  # one real step: AdamW state exists
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        layout = self.state.layout()
        base = shm_dir()
        self.control = ControlBlock.create(base / control_name(run_id), SLOTS, instance_id=run_id)
        self.slots = [
            Slot.create(
                base / slot_name(run_id, i),
                i,
                layout.data_bytes,
                MANIFEST_BYTES,
                prefault=True,
                instance_id=run_id,
            )
            for i in range(SLOTS)
        ]
        self.writer = SnapshotWriter(
            state=self.state,
            slots=self.slots,
            control=self.control,
            spec=SnapshotSpec(),
            commit=lambda slot, generation: "",
            run_id=run_id,
            window=1000,
        )
        self.expected: dict[str, int] = {}
        self.rng = torch.empty(0)
        self.counter_value = 0
        self.data_bytes = 0
        self.snapshot()

    def snapshot(self) -> None:
        """Captures the state now and records what a restore must bring back."""
        self.counter.value += 1
        self.writer.capture(global_step=self.counter.value, epoch=0, batch_index=0, epoch_end=False)
        self.writer.fence()
        result = self.writer.results[-1]
        if result.error:
            raise RuntimeError(f"snapshot failed: {result.error}")
        slot, header = self.newest()
        self.expected = snapshot_hashes(slot, header)
        self.rng = torch.get_rng_state()
        self.counter_value = self.counter.value
        self.data_bytes = header.data_length

    def newest(self) -> tuple[Slot, SlotHeader]:
        visible = [(s, s.header()) for s in self.slots]
        return max(((s, h) for s, h in visible if h.visible), key=lambda sh: sh[1].generation)

    def payload(self) -> dict[str, Any]:
        """What `torch.save` and DCP save and load: model and optimizer state dicts."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def optimizer_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return dict(self.optimizer.state)

    def reset_optimizer(self, saved: Mapping[torch.Tensor, dict[str, Any]]) -> None:
        """`Optimizer.load_state_dict` replaces the state tensors with the loaded ones; put the
        originals back so the next restore copies into the same memory as the others did."""
        self.optimizer.state.clear()
        self.optimizer.state.update(saved)

    def check(self, what: str, *, documents: bool) -> None:
        check_restored(self.state, self.expected, what)
        if documents and self.counter.value != self.counter_value:
            raise RuntimeError(f"{what}: document not restored ({self.counter.value})")
        if documents and not torch.equal(torch.get_rng_state(), self.rng):
            raise RuntimeError(f"{what}: torch RNG state not restored")

    def close(self) -> None:
        self.writer.fence()
        segments: list[Slot | ControlBlock] = [*self.slots, self.control]
        for segment in segments:
            segment.close()
            segment.seg.unlink()


# -- M1 -----------------------------------------------------------------------------------------


def bench_restore(rig: Rig, directory: Path, trials: int) -> dict[str, Any]:
    """M1: restore from a committed slot vs memcpy, arena copy, torch.load and dcp.load."""
    nbytes = rig.data_bytes
    src, dst = prefaulted(nbytes), prefaulted(nbytes)
    saved = directory / "m1-torch-save.pt"
    torch.save(rig.payload(), saved)
    skipped: dict[str, str] = {}
    dcp_dir = directory / "m1-dcp"
    dcp_state = rig.payload()
    try:
        # DCP is imported where it is used: at module level it would add its imports to the
        # "import tolaria" time that M2's child reports.
        from torch.distributed.checkpoint.state_dict_saver import save

        with _quiet():
            save(dcp_state, checkpoint_id=dcp_dir)
    except Exception as err:  # boundary: a baseline that cannot run is reported, not fatal
        skipped["dcp_load"] = f"dcp.save failed: {type(err).__name__}: {err}"
    originals = rig.optimizer_state()
    slot, header = rig.newest()
    manifest = SnapshotManifest.FromString(slot.manifest_bytes(header))
    region = region_tensor(slot)
    arena_pairs = [
        (e.offset, e.nbytes, as_bytes(t)) for e, t in rig.state.restore_targets(manifest.tensors)
    ]
    phases: dict[str, list[int]] = {"prepare": [], "commit": [], "confirm": []}
    budgets = _budgets()

    def restore() -> None:
        restored = Restorer(state=rig.state, control=rig.control).restore(
            rig.slots, max_step=None, budgets_ms=budgets
        )
        for name, timing in zip(phases, restored.phases, strict=True):
            phases[name].append(timing.elapsed_ns)

    def memcpy() -> None:
        dst.copy_(src)

    def arena_copy() -> None:
        for offset, length, live in arena_pairs:
            live.copy_(region[offset : offset + length])

    def torch_load(*, use_mmap: bool) -> None:
        loaded = torch.load(saved, weights_only=True, mmap=use_mmap)
        rig.model.load_state_dict(loaded["model"])
        rig.optimizer.load_state_dict(loaded["optim"])

    def dcp_load() -> None:
        from torch.distributed.checkpoint.state_dict_loader import load

        with _quiet():
            load(dcp_state, checkpoint_id=dcp_dir)
        rig.model.load_state_dict(dcp_state["model"])
        rig.optimizer.load_state_dict(dcp_state["optim"])

    calls: dict[str, Callable[[], None]] = {
        "restore": restore,
        "memcpy": memcpy,
        "arena_copy": arena_copy,
        "torch_load": lambda: torch_load(use_mmap=False),
        "torch_load_mmap": lambda: torch_load(use_mmap=True),
        "dcp_load": dcp_load,
    }
    for name in skipped:
        calls.pop(name)
    samples: dict[str, list[int]] = {name: [] for name in calls}
    names = list(calls)
    try:
        for run in range(trials):
            for i in _order(run, len(names)):
                name = names[i]
                perturb(rig.state, rig.counter)
                with torch.no_grad():
                    samples[name].append(_timed(calls[name]))
                if name != "memcpy":
                    rig.check(name, documents=name == "restore")
                rig.reset_optimizer(originals)
                gc.collect()
        # Leave the live state equal to the snapshot for the sections that follow (untimed).
        Restorer(state=rig.state, control=rig.control).restore(
            rig.slots, max_step=None, budgets_ms=budgets
        )
        rig.check("restore", documents=True)
    finally:
        saved.unlink(missing_ok=True)
        shutil.rmtree(dcp_dir, ignore_errors=True)
    memcpy_ns = samples["memcpy"]
    base = statistics.median(memcpy_ns)
    return {
        "bytes": nbytes,
        "stats": {name: summary(ns) for name, ns in samples.items()},
        "phases": {name: summary(ns) for name, ns in phases.items()},
        "ratios": {
            f"{name}_vs_memcpy": statistics.median(ns) / base for name, ns in samples.items()
        }
        | {"restore_vs_memcpy_paired": paired_ratio(samples["restore"], memcpy_ns)},
        "skipped": skipped,
    }


# -- M2 -----------------------------------------------------------------------------------------


def raw_remap_copy(path: Path, offset: int, length: int, into: torch.Tensor) -> int:
    """The floor for a re-attach: a new mapping of the slot file and one copy out of it."""
    start = time.perf_counter_ns()
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    source = torch.frombuffer(mapped, dtype=torch.uint8, count=length, offset=offset)
    into[:length].copy_(source)
    elapsed_ns = time.perf_counter_ns() - start
    del source
    with contextlib.suppress(BufferError):
        mapped.close()
    return elapsed_ns


def reattach_child(
    config_path: str, *, started_ns: int, import_torch_ns: int, import_rest_ns: int
) -> None:
    """M2, in the new process: build a fresh trainer state, then time attach + restore and the
    raw re-map in the order given, then attach + restore into the now-existing optimizer state.
    Prints one JSON line."""
    config = json.loads(Path(config_path).read_text())
    torch.set_num_threads(config["threads"])
    start = time.perf_counter_ns()
    model = build_model(config["width"], initialise=False)
    optimizer = make_optimizer(model)
    counter = Counter()
    state = build_state(model, optimizer, counter)
    into = prefaulted(config["data_bytes"])
    build_ns = time.perf_counter_ns() - start
    base = Path(config["dir"])
    run_id = config["run_id"]
    budgets = _budgets()
    expected = {k: int(v) for k, v in config["expected"].items()}

    def attach_restore() -> int:
        begin = time.perf_counter_ns()
        control = ControlBlock.attach(base / control_name(run_id), instance_id=run_id)
        slots = [
            Slot.attach(base / slot_name(run_id, i), instance_id=run_id)
            for i in range(config["slots"])
        ]
        with torch.no_grad():
            Restorer(state=state, control=control).restore(slots, max_step=None, budgets_ms=budgets)
        elapsed_ns = time.perf_counter_ns() - begin
        check_restored(state, expected, "re-attach restore")
        if counter.value != config["counter"]:
            raise RuntimeError(f"re-attach restore: document not restored ({counter.value})")
        segments: list[Slot | ControlBlock] = [*slots, control]
        for segment in segments:
            segment.close()
        return elapsed_ns

    out: dict[str, int] = {}
    for kind in config["order"]:
        if kind == "restore_fresh":
            if optimizer.state:
                raise RuntimeError("the fresh optimizer already has state")
            out[kind] = attach_restore()
        else:
            slot_path = base / slot_name(run_id, config["slot"])
            out[kind] = raw_remap_copy(slot_path, config["offset"], config["data_bytes"], into)
    perturb(state, counter)
    out["restore_existing"] = attach_restore()
    result = {
        "started_ns": started_ns,
        "import_torch_ns": import_torch_ns,
        "import_rest_ns": import_rest_ns,
        "build_ns": build_ns,
        **out,
    }
    print(json.dumps(result))


def bench_reattach(rig: Rig, directory: Path, trials: int, threads: int) -> dict[str, Any]:
    """M2: one new process per trial re-attaches to the slots this process keeps alive."""
    slot, header = rig.newest()
    config: dict[str, Any] = {
        "dir": str(shm_dir()),
        "run_id": rig.run_id,
        "slots": len(rig.slots),
        "slot": slot.index,
        "offset": slot.data_offset,
        "data_bytes": header.data_length,
        "width": rig.width,
        "threads": threads,
        "expected": rig.expected,
        "counter": rig.counter_value,
    }
    config_path = directory / "m2-child.json"
    samples: dict[str, list[int]] = {
        k: []
        for k in (
            "restore_fresh",
            "raw_remap",
            "restore_existing",
            "interpreter_start",
            "import_torch",
            "import_tolaria",
            "build",
        )
    }
    try:
        for trial in range(trials):
            order = ["restore_fresh", "raw_remap"]
            config["order"] = order if trial % 2 == 0 else order[::-1]
            config_path.write_text(json.dumps(config))
            spawned_ns = time.monotonic_ns()
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(Path(__file__).resolve()), str(config_path)],
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"M2 child failed ({proc.returncode}): {proc.stderr[-2000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            for key in ("restore_fresh", "raw_remap", "restore_existing"):
                samples[key].append(child[key])
            samples["interpreter_start"].append(child["started_ns"] - spawned_ns)
            samples["import_torch"].append(child["import_torch_ns"])
            samples["import_tolaria"].append(child["import_rest_ns"])
            samples["build"].append(child["build_ns"])
    finally:
        config_path.unlink(missing_ok=True)
    raw = samples["raw_remap"]
    base = statistics.median(raw)
    return {
        "bytes": header.data_length,
        "stats": {name: summary(ns) for name, ns in samples.items()},
        "ratios": {
            "restore_fresh_vs_raw_remap": statistics.median(samples["restore_fresh"]) / base,
            "restore_fresh_vs_raw_remap_paired": paired_ratio(samples["restore_fresh"], raw),
            "restore_existing_vs_raw_remap": statistics.median(samples["restore_existing"]) / base,
            "restore_existing_vs_raw_remap_paired": paired_ratio(samples["restore_existing"], raw),
        },
    }


# -- M3 -----------------------------------------------------------------------------------------


def bench_stall(rig: Rig, directory: Path, trials: int) -> dict[str, Any]:
    """M3 (i): blocking time per snapshot vs synchronous memcpy, torch.save and dcp.async_save.

    The optimizer step that follows the fence is not run: it does not change what is blocked
    (the copy has finished by then), and at 100M it would double the section's time.
    """
    nbytes = rig.data_bytes
    src, dst = prefaulted(nbytes), prefaulted(nbytes)
    saved = directory / "m3-torch-save.pt"
    model, writer = rig.model, rig.writer
    extra: dict[str, list[int]] = {
        "capture_call": [],
        "fence_wait": [],
        "background_copy": [],
        "forward_backward_with_copy": [],
        "forward_backward_alone": [],
        "dcp_async_total": [],
    }
    skipped: dict[str, str] = {}
    step = [rig.counter_value]

    def snapshot() -> int:
        step[0] += 1
        start = time.perf_counter_ns()
        writer.capture(global_step=step[0], epoch=0, batch_index=0, epoch_end=False)
        captured = time.perf_counter_ns()
        forward_backward(model, rig.batch)
        computed = time.perf_counter_ns()
        writer.fence()
        fenced = time.perf_counter_ns()
        result = writer.results[-1]
        if result.error or not result.committed:
            raise RuntimeError(f"snapshot at step {step[0]} failed: {result.error}")
        extra["capture_call"].append(captured - start)
        extra["forward_backward_with_copy"].append(computed - captured)
        extra["fence_wait"].append(fenced - computed)
        extra["background_copy"].append(result.copy_ns)
        rig.optimizer.zero_grad(set_to_none=True)
        return (captured - start) + (fenced - computed)

    def alone() -> int:
        elapsed_ns = _timed(lambda: forward_backward(model, rig.batch))
        extra["forward_backward_alone"].append(elapsed_ns)
        rig.optimizer.zero_grad(set_to_none=True)
        return elapsed_ns

    def torch_save(*, crc: bool) -> int:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            return _timed(lambda: torch.save(rig.payload(), saved))
        finally:
            torch.serialization.set_crc32_options(previous)

    def dcp_async() -> int:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        target = directory / "m3-dcp-async"
        with _quiet():
            start = time.perf_counter_ns()
            future = async_save(rig.payload(), checkpoint_id=target)
            blocked_ns = time.perf_counter_ns() - start
            if hasattr(future, "upload_completion"):  # AsyncSaveResponse (with a stager)
                future = future.upload_completion
            future.result()  # untimed wait: the next measurement must not share the CPU with it
        extra["dcp_async_total"].append(time.perf_counter_ns() - start)
        shutil.rmtree(target, ignore_errors=True)
        return blocked_ns

    calls: dict[str, Callable[[], int]] = {
        "snapshot_blocked": snapshot,
        "forward_backward": alone,
        "memcpy": lambda: _timed(lambda: dst.copy_(src)),
        "torch_save_crc": lambda: torch_save(crc=True),
        "torch_save_no_crc": lambda: torch_save(crc=False),
        "dcp_async_save_blocking": dcp_async,
    }
    first_call_ms = float("nan")
    try:  # the first call sets up threads and staging once: reported apart, not in the rounds
        first_call_ms = calls["dcp_async_save_blocking"]() / 1e6
    except Exception as err:  # boundary: a baseline that cannot run is reported, not fatal
        skipped["dcp_async_save_blocking"] = f"{type(err).__name__}: {err}"
        calls.pop("dcp_async_save_blocking")
    extra["dcp_async_total"].clear()
    samples: dict[str, list[int]] = {name: [] for name in calls}
    names = list(calls)
    try:
        for run in range(trials):
            for i in _order(run, len(names)):
                samples[names[i]].append(calls[names[i]]())
            gc.collect()
    finally:
        saved.unlink(missing_ok=True)
    base = statistics.median(samples["memcpy"])
    stats = {name: summary(ns) for name, ns in samples.items()}
    stats |= {name: summary(ns) for name, ns in extra.items() if ns}
    with_copy = statistics.median(extra["forward_backward_with_copy"])
    without = statistics.median(extra["forward_backward_alone"])
    return {
        "bytes": nbytes,
        "stats": stats,
        "ratios": {
            f"{name}_vs_memcpy": statistics.median(ns) / base for name, ns in samples.items()
        }
        | {"background_copy_vs_memcpy": statistics.median(extra["background_copy"]) / base},
        "forward_backward_slowdown_with_copy": with_copy / without - 1,
        "dcp_async_first_call_ms": first_call_ms,
        "skipped": skipped,
    }


def bench_overhead(rig: Rig, steps: int, every: int) -> dict[str, Any]:
    """M3 (ii): training-step time with one snapshot per `every` steps vs without.

    Segments of `every` full steps (forward/backward, fence, AdamW step) alternate A B B A, so
    linear drift cancels; a snapshot segment captures after its first step, as
    `Resilience.after_step` does when one is due, and fences before the next optimizer step.
    """
    model, optimizer, writer = rig.model, rig.optimizer, rig.writer
    position = [rig.counter_value]

    step_ns: dict[bool, list[int]] = {True: [], False: []}

    def run_steps(count: int, *, snapshot: bool) -> int:
        start = time.perf_counter_ns()
        for i in range(count):
            step_start = time.perf_counter_ns()
            forward_backward(model, rig.batch)
            writer.fence()  # before anything mutates the captured tensors
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position[0] += 1
            if snapshot and i == 0:
                writer.capture(global_step=position[0], epoch=0, batch_index=0, epoch_end=False)
            step_ns[snapshot].append(time.perf_counter_ns() - step_start)
        writer.fence()
        return time.perf_counter_ns() - start

    run_steps(2, snapshot=True)  # warm-up: allocator, thread pools, both slots written once
    step_ns[True].clear()
    segments = max(1, math.ceil(steps / every))
    with_ns: list[int] = []
    without_ns: list[int] = []
    stall_from = len(writer.results)
    for pair in range(segments):
        kinds = (True, False) if pair % 2 == 0 else (False, True)
        for snapshot in kinds:
            elapsed_ns = run_steps(every, snapshot=snapshot)
            (with_ns if snapshot else without_ns).append(elapsed_ns)
    failed = [r.error for r in writer.results[stall_from:] if r.error]
    if failed:
        raise RuntimeError(f"snapshots failed during the overhead run: {failed[:3]}")
    with_step_ms = sum(with_ns) / (len(with_ns) * every) / 1e6
    without_step_ms = sum(without_ns) / (len(without_ns) * every) / 1e6
    per_pair = [w / o - 1 for w, o in zip(with_ns, without_ns, strict=True)]
    return {
        "bytes": rig.data_bytes,
        "params_m": rig.params_m,
        "every": every,
        "steps_each": segments * every,
        "step_ms_with_snapshots": with_step_ms,
        "step_ms_without": without_step_ms,
        "overhead": with_step_ms / without_step_ms - 1,
        "overhead_per_pair": per_pair,
        "overhead_per_pair_median": statistics.median(per_pair),
        "snapshots": float(len(with_ns)),
        "step_with_snapshots": summary(step_ns[True]),
        "step_without": summary(step_ns[False]),
    }


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _verdict(value: float, target: float) -> str:
    return "meets" if value <= target else "MISSES"


def _row(name: str, s: Stats, base_ms: float | None) -> str:
    ratio = f"{s['median_ms'] / base_ms:8.2f}" if base_ms else f"{'':8}"
    return (
        f"  {name:34} {s['median_ms']:9.1f} {s['p95_ms']:9.1f} {s['max_ms']:9.1f} {ratio}"
        f"   n={int(s['n'])}"
    )


def _foreign(section: dict[str, Any]) -> str:
    share = section.get("foreign_cpu_share", 0.0)
    note = " (noisy: compare with a quiet run)" if share > 0.05 else ""
    return f"  other processes used {share:.0%} of the CPU during this section{note}"


def _header() -> str:
    return f"  {'':34} {'median ms':>9} {'p95 ms':>9} {'max ms':>9} {'x base':>8}"


def print_m1(label: str, m1: dict[str, Any]) -> None:
    stats = m1["stats"]
    base = stats["memcpy"]["median_ms"]
    print(f"\nM1 fast restore, {label} ({m1['bytes'] / 1e6:.0f} MB), base = memcpy")
    print(_header())
    for name in stats:
        print(_row(name, stats[name], base))
    p = m1["phases"]
    print(
        f"  restore phases (median ms): prepare {p['prepare']['median_ms']:.1f}, "
        f"commit {p['commit']['median_ms']:.1f}, confirm {p['confirm']['median_ms']:.1f}"
    )
    for name, reason in m1["skipped"].items():
        print(f"  {name} skipped: {reason}")
    ratio = m1["ratios"]["restore_vs_memcpy"]
    target = TARGETS["m1_restore_vs_memcpy"]
    paired = m1["ratios"]["restore_vs_memcpy_paired"]
    print(
        f"  restore / memcpy = {ratio:.2f}x (paired {paired:.2f}x);"
        f" target <= {target}x: {_verdict(ratio, target)}"
    )
    print(_foreign(m1))


def print_m2(label: str, m2: dict[str, Any]) -> None:
    stats = m2["stats"]
    base = stats["raw_remap"]["median_ms"]
    print(f"\nM2 crash re-attach restore in a new process, {label}, base = raw re-map + copy")
    print(_header())
    for name in ("restore_fresh", "restore_existing", "raw_remap"):
        print(_row(name, stats[name], base))
    for name in ("interpreter_start", "import_torch", "import_tolaria", "build"):
        print(_row(f"({name}, not in the restore)", stats[name], None))
    ratio = m2["ratios"]["restore_fresh_vs_raw_remap"]
    target = TARGETS["m2_restore_vs_raw_remap"]
    print(
        f"  attach+restore (fresh optimizer) / raw re-map = {ratio:.2f}x "
        f"(paired {m2['ratios']['restore_fresh_vs_raw_remap_paired']:.2f}x); "
        f"target <= {target}x: {_verdict(ratio, target)}"
    )
    existing = m2["ratios"]["restore_existing_vs_raw_remap"]
    print(f"  attach+restore into existing optimizer state / raw re-map = {existing:.2f}x")
    print(_foreign(m2))


def print_m3(label: str, m3: dict[str, Any]) -> None:
    stats = m3["stats"]
    base = stats["memcpy"]["median_ms"]
    print(f"\nM3 (i) snapshot stall, {label} ({m3['bytes'] / 1e6:.0f} MB), base = memcpy")
    print(_header())
    for name in stats:
        print(_row(name, stats[name], base))
    for name, reason in m3["skipped"].items():
        print(f"  {name} skipped: {reason}")
    blocked = stats["snapshot_blocked"]
    hook_ms = BudgetsSpec().hook_ms
    print(
        f"  blocked p95 {blocked['p95_ms']:.2f} ms, max {blocked['max_ms']:.2f} ms; async target "
        f"<= {hook_ms:g} ms: {_verdict(blocked['max_ms'], hook_ms)}; forward/backward "
        f"{m3['forward_backward_slowdown_with_copy']:+.1%} with the copy in flight"
    )
    print(_foreign(m3))


def print_overhead(o: dict[str, Any]) -> None:
    target = TARGETS["m3_overhead"]
    print(
        f"\nM3 (ii) steady-state overhead, {o['params_m']:g}M params + AdamW "
        f"({o['bytes'] / 1e6:.0f} MB), one snapshot every {o['every']} steps, "
        f"{o['steps_each']} steps each way"
    )
    print(_header())
    print(_row("step with snapshots", o["step_with_snapshots"], None))
    print(_row("step without", o["step_without"], None))
    pairs = ", ".join(f"{v:+.1%}" for v in o["overhead_per_pair"])
    print(
        f"  mean step {o['step_ms_with_snapshots']:.1f} ms with snapshots, "
        f"{o['step_ms_without']:.1f} ms without: overhead {o['overhead']:+.2%}; "
        f"target <= {target:.1%}: {_verdict(o['overhead'], target)}"
    )
    print(
        f"  per A/B pair: {pairs}; median of pairs {o['overhead_per_pair_median']:+.2%} "
        "(robust to a foreign load landing in one segment)"
    )
    print(_foreign(o))


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--params", type=float, default=100.0, help="model size, M params")
    parser.add_argument("--sizes", type=str, default="", help="comma list of M params (25,100)")
    parser.add_argument("--trials", type=int, default=9, help="interleaved rounds per metric")
    parser.add_argument(
        "--reattach-trials", type=int, default=0, help="M2 processes (default: --trials)"
    )
    parser.add_argument("--batch", type=int, default=64, help="rows per forward/backward")
    parser.add_argument("--overhead-params", type=float, default=25.0, help="M3 (ii) model size")
    parser.add_argument("--steps", type=int, default=200, help="M3 (ii) steps each way, at least")
    parser.add_argument("--every", type=int, default=SnapshotSpec().every_steps, help="M3 (ii) k")
    parser.add_argument("--memcpy-mb", type=int, default=1000, help="size of the ruler memcpy")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="tmpfs for segments")
    parser.add_argument(
        "--sections", type=str, default="m1,m2,m3,overhead", help="which of m1,m2,m3,overhead"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()] or [args.params]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"m1", "m2", "m3", "overhead"}:
        parser.error(f"--sections: choose from m1,m2,m3,overhead, got {args.sections!r}")
    if args.every < 1 or args.trials < 1 or args.steps < 1:
        parser.error("--every, --trials and --steps must be at least 1")

    torch.set_num_threads(args.threads)
    directory = Path(tempfile.mkdtemp(prefix="tolaria-bench-", dir=args.dir))
    previous_dir = os.environ.get("TOLARIA_SHM_DIR")
    os.environ["TOLARIA_SHM_DIR"] = str(directory)
    results: dict[str, Any] = {"machine": machine()}
    say = (lambda *_: None) if args.json else print
    try:
        results["memcpy_1gb"] = measure_memcpy(args.memcpy_mb * 1_000_000)
        info = results["machine"]
        say(
            f"snapshot/restore bench, {info['date']}: {info['cpu']}, {info['cores']} cores, "
            f"{info['memory']}, torch {info['torch']} ({info['torch_threads']} threads), "
            f"GPU {info['gpu']}, segments in {directory}"
        )
        say(
            f"same-run memcpy {args.memcpy_mb / 1000:g} GB: {results['memcpy_1gb']['gb_per_s']:.2f}"
            f" GB/s (median of 5, {results['memcpy_1gb']['median_ms']:.0f} ms)"
        )
        results["sizes"] = {}
        for params_m in sizes if sections - {"overhead"} else []:
            label = f"{params_m:g}M params + AdamW"
            rig = Rig(params_m, args.batch, f"bench-{os.getpid()}")
            out: dict[str, Any] = {"width": rig.width}
            try:
                if "m1" in sections:
                    witness = CpuWitness()
                    out["m1"] = bench_restore(rig, directory, args.trials)
                    out["m1"]["foreign_cpu_share"] = witness.foreign_share()
                    gc.collect()  # the M1 baseline buffers go before M2's children need memory
                    if not args.json:
                        print_m1(label, out["m1"])
                if "m2" in sections:
                    witness = CpuWitness()
                    trials = args.reattach_trials or args.trials
                    out["m2"] = bench_reattach(rig, directory, trials, args.threads)
                    out["m2"]["foreign_cpu_share"] = witness.foreign_share()
                    if not args.json:
                        print_m2(label, out["m2"])
                if "m3" in sections:
                    witness = CpuWitness()
                    out["m3"] = bench_stall(rig, directory, args.trials)
                    out["m3"]["foreign_cpu_share"] = witness.foreign_share()
                    if not args.json:
                        print_m3(f"{label}, batch {args.batch}", out["m3"])
            finally:
                rig.close()
                del rig
                gc.collect()
            results["sizes"][f"{params_m:g}"] = out
        if "overhead" in sections:
            rig = Rig(args.overhead_params, args.batch, f"bench-{os.getpid()}-overhead")
            try:
                witness = CpuWitness()
                results["m3_overhead"] = bench_overhead(rig, args.steps, args.every)
                results["m3_overhead"]["foreign_cpu_share"] = witness.foreign_share()
            finally:
                rig.close()
                del rig
                gc.collect()
            if not args.json:
                print_overhead(results["m3_overhead"])
        results["memcpy_1gb_end"] = measure_memcpy(args.memcpy_mb * 1_000_000)
        say(
            f"\nsame-run memcpy at the end: {results['memcpy_1gb_end']['gb_per_s']:.2f} GB/s "
            "(compare with the start: bandwidth drifts)"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if previous_dir is None:
            os.environ.pop("TOLARIA_SHM_DIR", None)
        else:
            os.environ["TOLARIA_SHM_DIR"] = previous_dir
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
