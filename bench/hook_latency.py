"""Bench: end-of-epoch hook latency on the quickstart model vs an empty hook, same run.

Builds the quickstart run's real components (model, optimizer, LR controller,
heuristic Tamiyo on its deadline worker, Kasmina, guards, telemetry) and, for
each simulated epoch, trains a few steps, then times the real hook and an
empty hook (the same timing code around nothing) back to back, alternating
which goes first. Prints p50/p95/p99/max of both and their ratio.

    python bench/hook_latency.py                 # 200 epochs
    python bench/hook_latency.py --epochs 20 --steps 2
    python bench/hook_latency.py --hidden 4096 --layers 6 --snapshot --epochs 30 --steps 2

With `--snapshot` (M4 in docs/performance.md) each epoch end also takes the
epoch snapshot into a real shared-memory slot, as the loop does right after the
hook: the table then adds the main-thread cost of starting the capture and the
wait at the next optimizer step's fence (the copy itself runs in the
background). `--hidden 4096 --layers 6` is ~100M parameters (1.2 GB with AdamW).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from leyline.shm import ControlBlock, Slot
from leyline.spec import TolariaRun, TolariaRunSpec, load_manifest, validate_manifest
from tolaria_trainer.clock import MonotonicClock
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.device import plan_execution, seed_everything
from tolaria_trainer.guards import Guards
from tolaria_trainer.hardware import HardwareProbe
from tolaria_trainer.hook import EndOfEpochHook, EpochResult, gc_paused
from tolaria_trainer.kasmina import NullSeedManager
from tolaria_trainer.latency import percentile
from tolaria_trainer.lr_controller import LRController
from tolaria_trainer.optimizer_manager import OptimizerManager
from tolaria_trainer.recovery.snapshots import SnapshotWriter
from tolaria_trainer.runtime import param_groups
from tolaria_trainer.state import TrainingState
from tolaria_trainer.steps import StepRunner
from tolaria_trainer.tamiyo import HeuristicTamiyo
from tolaria_trainer.tasks import load_task
from tolaria_trainer.telemetry import TelemetryHub

ROOT = Path(__file__).resolve().parents[1]


def _stats(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {q: percentile(ordered, p) / 1e6 for q, p in (("p50", 50), ("p95", 95), ("p99", 99))} | {
        "max": ordered[-1] / 1e6
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=200, help="hook calls of each kind")
    parser.add_argument("--steps", type=int, default=5, help="training steps between hooks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--hidden", type=int, default=None, help="override model.hiddenSize")
    parser.add_argument("--layers", type=int, default=None, help="override model.layers")
    parser.add_argument("--batch", type=int, default=None, help="override batchSize")
    parser.add_argument("--snapshot", action="store_true", help="snapshot at every epoch end")
    args = parser.parse_args(argv)

    run = _sized(load_manifest(args.manifest), args.hidden, args.layers, args.batch)
    spec = run.spec
    t = spec.training
    seed_everything(t.seed, deterministic=False)
    plan = plan_execution(t)
    task = load_task(t)
    task.model.to(plan.device)
    clock = MonotonicClock()
    hub = TelemetryHub(spec.telemetry, spec.conservative, run.name, [])
    guards = Guards(spec.breakers, spec.conservative, clock, hub)
    lr = LRController(
        t.schedule,
        spec.budgets,
        guards,
        clock,
        steps_per_epoch=args.steps,
        total_epochs=args.epochs,
    )
    optim = OptimizerManager(t.optimizer, spec.optimizer_rebuild, guards, clock, hub)
    lr.register_optimizer("host", optim.build(param_groups(task)))
    steps = StepRunner(task.model, task.loss_fn, lambda: optim.optimizer, plan, 1, lambda _: None)
    train = BatchPlan(task.train_set, t.batch_size, seed=t.seed, shuffle=True, device=plan.device)
    hook = EndOfEpochHook(
        budgets=spec.budgets,
        tamiyo_spec=spec.tamiyo,
        run_id=run.name,
        experiment=run.name,
        tamiyo=HeuristicTamiyo(spec.tamiyo),
        kasmina=NullSeedManager(),
        scale_lr=lambda f, m, e, s: lr.scale(f, min_scale=m, epoch=e, step=s),
        guards=guards,
        hardware=HardwareProbe(plan.device),
        clock=clock,
        events=hub,
    )

    def empty_hook() -> int:
        start = clock.now_ns()
        with gc_paused():  # the real hook pauses the GC too: time the same wrapper
            pass
        return clock.now_ns() - start

    snap = _Snapshotter(task.model, optim, spec) if args.snapshot else None
    real: list[int] = []
    empty: list[int] = []
    capture: list[int] = []
    fence: list[int] = []
    step = 0
    batches = train.batches(0)
    for epoch in range(args.epochs):
        for _ in range(args.steps):
            batch = next(batches, None)
            if batch is None:
                batches = train.batches(epoch)
                batch = next(batches)
            steps.forward_backward(batch)
            if snap is not None:
                fence.append(snap.writer.fence())
            steps.optimizer_step()
            step += 1
            lr.step(epoch, step)
        result = EpochResult(epoch, step, steps.losses.mean(), 1.0 / (epoch + 1), 0.5)
        hub.flush()
        order = ("real", "empty") if epoch % 2 == 0 else ("empty", "real")
        for kind in order:
            if kind == "real":
                real.append(hook.end_of_epoch(result).total_ns)
                if snap is not None:
                    start = clock.now_ns()
                    snap.writer.capture(
                        global_step=step, epoch=epoch + 1, batch_index=0, epoch_end=True
                    )
                    capture.append(clock.now_ns() - start)
            else:
                empty.append(empty_hook())
    hook.close()
    hub.close()
    results = {"hook": _stats(real), "empty hook": _stats(empty)}
    if snap is not None:
        snap.writer.fence()
        results["snapshot start"] = _stats(capture)
        results["fence wait"] = _stats([f for f in fence if f] or [0])
        results["state MB"] = {"p50": snap.state_bytes / 1e6, "p95": 0.0, "p99": 0.0, "max": 0.0}
        snap.close()
    if args.json:
        print(json.dumps(results))
    else:
        budget = spec.budgets.hook_ms
        print(f"hook latency, {args.epochs} epochs, {plan.describe()}, torch {torch.__version__}")
        print(f"{'':12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, s in results.items():
            print(f"{name:12} {s['p50']:8.3f} {s['p95']:8.3f} {s['p99']:8.3f} {s['max']:8.3f}")
        base = max(results["empty hook"]["p99"], 1e-6)
        p99 = results["hook"]["p99"]
        print(f"hook p99 = {p99:.3f} ms ({p99 / budget:.1%} of the {budget:g} ms budget)")
        print(f"hook p99 / empty-hook p99 = {p99 / base:.0f}x")
        threads = torch.get_num_threads()
        print(f"host: {sys.platform}, {threads} torch threads, {time.strftime('%Y-%m-%d')}")
    return results


def _sized(
    run: TolariaRun, hidden: int | None, layers: int | None, batch: int | None
) -> TolariaRun:
    doc = run.model_dump(mode="json", by_alias=True)
    training = doc["spec"]["training"]
    if hidden is not None:
        training["model"]["hiddenSize"] = hidden
    if layers is not None:
        training["model"]["layers"] = layers
    if batch is not None:
        training["batchSize"] = batch
    return validate_manifest(doc)


class _Snapshotter:
    """A real snapshot writer over pre-faulted slots in a private shm directory (no sidecar)."""

    def __init__(
        self, model: torch.nn.Module, optim: OptimizerManager, spec: TolariaRunSpec
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="tolaria-bench-", dir="/dev/shm"))
        state = TrainingState(
            model=model,
            optimizer=lambda: optim.optimizer,
            parameter_names=lambda: optim.parameters,
            documents={},
        )
        self.state_bytes = state.estimated_bytes()
        capacity = int(self.state_bytes * 1.1) + (1 << 20)
        self.control = ControlBlock.create(
            self._dir / "tolaria-bench-ctl", 2, instance_id="bench-hook-latency"
        )
        self.slots = [
            Slot.create(
                self._dir / f"tolaria-bench-slot-{i}",
                i,
                capacity,
                1 << 20,
                prefault=True,
                instance_id="bench-hook-latency",
            )
            for i in range(2)
        ]
        self.writer = SnapshotWriter(
            state=state,
            slots=self.slots,
            control=self.control,
            spec=spec.snapshots,
            commit=lambda slot, gen: "",
            run_id="bench",
            window=100,
        )

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
        self.control.close()
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    main()
