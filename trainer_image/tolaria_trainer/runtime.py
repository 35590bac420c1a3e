"""Builds a run's components from its manifest, runs it, and assembles the report.

This is the composition root: the only place that knows every concrete class.
Everything else receives its collaborators. `run_training` never raises for a
failed run (the report says why); it raises `TaskInvalid`, `DrillInvalid` or
`DeviceUnavailable` for input refused before training starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from leyline import (
    HealthStatus,
    MessagePriority,
    RunPhase,
    RunReport,
    TelemetryLevel,
)
from leyline.spec import TolariaRun
from tolaria_trainer.clock import MonotonicClock
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.device import (
    apply_process_settings,
    maybe_compile,
    plan_execution,
    seed_everything,
)
from tolaria_trainer.drills import Drills, DrillSpec, check_reachable
from tolaria_trainer.errors import TaskInvalid
from tolaria_trainer.guards import Guards
from tolaria_trainer.hardware import HardwareProbe
from tolaria_trainer.hook import EndOfEpochHook
from tolaria_trainer.kasmina import NullSeedManager
from tolaria_trainer.loop import EpochLoop, LoopState, Validator
from tolaria_trainer.lr_controller import LRController
from tolaria_trainer.metrics import TrainerMetrics, serve
from tolaria_trainer.optimizer_manager import OptimizerManager, ParamGroup
from tolaria_trainer.profiler import EpochProfiler
from tolaria_trainer.progress import ProgressView
from tolaria_trainer.report import accuracy_summary, loss_summary
from tolaria_trainer.steps import StepRunner
from tolaria_trainer.tamiyo import HeuristicTamiyo
from tolaria_trainer.tasks import Task, load_task
from tolaria_trainer.telemetry import JsonLinesSink, TelemetryHub

logger = logging.getLogger(__name__)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_HALTED = 3

EXIT_CODES = {
    RunPhase.Succeeded: EXIT_SUCCEEDED,
    RunPhase.Failed: EXIT_FAILED,
    RunPhase.Halted: EXIT_HALTED,
}


@dataclass(frozen=True)
class RunOptions:
    """What the CLI adds to the manifest."""

    workdir: Path
    view: ProgressView
    drills: Sequence[DrillSpec] = ()
    metrics_port: int | None = None
    profile_epochs: frozenset[int] | None = None
    stop: threading.Event = field(default_factory=threading.Event)


def param_groups(task: Task) -> list[ParamGroup]:
    """The task's groups with stable parameter names (the optimizer manager maps state by name)."""
    names = {id(p): n for n, p in task.model.named_parameters()}
    groups = task.param_groups or [
        ("host", [p for p in task.model.parameters() if p.requires_grad])
    ]
    return [ParamGroup(gid, tuple((names[id(p)], p) for p in params)) for gid, params in groups]


def steps_per_epoch(run: TolariaRun, batches: int) -> int:
    """Optimizer steps per epoch; refuses an accumulation that never completes a step."""
    t = run.spec.training
    if batches < t.gradient_accumulation_steps:
        raise TaskInvalid(
            "spec.training.gradientAccumulationSteps",
            f"must be <= the {batches} batches per epoch of this task and batch size",
        )
    steps = batches // t.gradient_accumulation_steps
    return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps


def run_training(run: TolariaRun, options: RunOptions) -> RunReport:
    """Runs the manifest to completion in this process and returns its report."""
    spec = run.spec
    t = spec.training
    run_dir = options.workdir / run.name
    started = time.time()

    seed_everything(t.seed, deterministic=t.deterministic)
    plan = plan_execution(t)
    apply_process_settings(plan)
    task = load_task(t)
    task.model.to(plan.device)
    train = BatchPlan(
        task.train_set, t.batch_size, seed=t.seed, shuffle=t.data.shuffle, device=plan.device
    )
    validation = BatchPlan(
        task.validation_set, t.batch_size, seed=t.seed, shuffle=False, device=plan.device
    )
    per_epoch = steps_per_epoch(run, train.num_batches())
    check_reachable(options.drills, epochs=t.epochs, total_steps=per_epoch * t.epochs)
    drills = Drills(options.drills)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: refused input leaves nothing behind

    clock = MonotonicClock()
    sink = JsonLinesSink(run_dir / "telemetry.jsonl")
    guards_ref: list[Guards] = []
    hub = TelemetryHub(
        spec.telemetry,
        spec.conservative,
        run.name,
        [sink],
        is_conservative=lambda: bool(guards_ref) and guards_ref[0].conservative.active,
    )
    guards = Guards(spec.breakers, spec.conservative, clock, hub)
    guards_ref.append(guards)
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    port = options.metrics_port if options.metrics_port is not None else spec.telemetry.metrics_port
    server = None
    if port:
        server, bound = serve(registry, port, spec.telemetry.metrics_address)
        options.view.notice(
            "metrics served", url=f"http://{spec.telemetry.metrics_address}:{bound}/metrics"
        )

    def compile_fallback(why: str) -> None:
        hub.event(
            "tolaria.compile_fallback",
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            error=why,
        )

    model = maybe_compile(task.model, plan, compile_fallback)
    lr = LRController(
        spec.training.schedule,
        spec.budgets,
        guards,
        clock,
        steps_per_epoch=per_epoch,
        total_epochs=t.epochs,
    )
    optim = OptimizerManager(t.optimizer, spec.optimizer_rebuild, guards, clock, hub)
    optimizer = optim.build(param_groups(task))
    lr.register_optimizer("host", optimizer)
    steps = StepRunner(
        model,
        task.loss_fn,
        lambda: optim.optimizer,
        plan,
        t.gradient_accumulation_steps,
        compile_fallback,
    )
    hook = EndOfEpochHook(
        budgets=spec.budgets,
        tamiyo_spec=spec.tamiyo,
        run_id=run.name,
        experiment=run.metadata.labels.get("experiment", run.name),
        tamiyo=drills.wrap_policy(HeuristicTamiyo(spec.tamiyo)),
        kasmina=NullSeedManager(),
        scale_lr=lambda f, m, e, s: lr.scale(f, min_scale=m, epoch=e, step=s),
        guards=guards,
        hardware=HardwareProbe(plan.device),
        clock=clock,
        events=hub,
    )
    profile_epochs = (
        options.profile_epochs
        if options.profile_epochs is not None
        else frozenset(spec.profiler.epochs)
    )
    profiler = EpochProfiler(spec.profiler, profile_epochs, run_dir / "traces")
    loop = EpochLoop(
        epochs=t.epochs,
        max_steps_per_epoch=t.max_steps_per_epoch,
        train=train,
        steps=steps,
        validator=Validator(steps, validation, task, clock),
        optim=optim,
        lr=lr,
        hook=hook,
        guards=guards,
        telemetry=hub,
        metrics=metrics,
        profiler=profiler,
        drills=drills,
        view=options.view,
        clock=clock,
        step_packet_every=spec.telemetry.step_packet_every,
        stop=options.stop,
    )
    options.view.start(run.name, t.epochs, per_epoch, plan.describe())
    try:
        state = loop.run()
    except Exception as err:  # boundary: a crashing model or task fails the run, with the reason
        logger.exception("run %s failed", run.name)
        state = loop.state
        state.phase = RunPhase.Failed
        state.reason = f"{type(err).__name__}: {err}"
    finally:
        hook.close()
        hub.flush()
    report = build_report(run, state, loop, profiler, drills, hub, started, plan.describe())
    hub.event(
        "tolaria.run_finished",
        TelemetryLevel.TELEMETRY_LEVEL_INFO
        if report.exit_code == 0
        else TelemetryLevel.TELEMETRY_LEVEL_ERROR,
        MessagePriority.MESSAGE_PRIORITY_HIGH,
        status=RunPhase.Name(report.status),
        reason=report.reason,
    )
    hub.close()
    sink.close()
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]
    return report


def build_report(
    run: TolariaRun,
    state: LoopState,
    loop: EpochLoop,
    profiler: EpochProfiler,
    drills: Drills,
    hub: TelemetryHub,
    started: float,
    device: str,
) -> RunReport:
    """Turns the loop's state and the components' records into a `RunReport`."""
    records = state.records
    guards = loop.guards
    report = RunReport(
        version=1,
        run_id=run.name,
        status=state.phase,
        reason=state.reason,
        exit_code=EXIT_CODES.get(state.phase, EXIT_FAILED),
        wall_seconds=time.time() - started,
        epochs_planned=run.spec.training.epochs,
        epochs_completed=state.epochs_completed,
        global_step=state.global_step,
        training_loss=loss_summary([r.training_loss for r in records]),
        validation_loss=loss_summary([r.validation_loss for r in records]),
        validation_accuracy=accuracy_summary([r.validation_accuracy for r in records]),
        hook_latency=loop.hook.latency.summary(),
        validation_time=loop.validator.latency.summary(),
        tamiyo_latency=loop.hook.tamiyo_latency.summary(),
        lr_step_latency=loop.lr.step_latency.summary(),
        breaker_trips=guards.trips(),
        breakers=[b.summary() for b in guards.breakers.values()],
        conservative_intervals=guards.conservative.intervals,
        lr_changes=loop.lr.changes,
        lr_integrity_breaches=loop.lr.integrity_breaches,
        optimizer_rebuilds=loop.optim.rebuilds,
        telemetry=hub.counts(),
        trace_paths=[str(p) for p in profiler.traces],
        fallback_commands=loop.hook.fallbacks,
        epochs=records,
        final_health=records[-1].health if records else HealthStatus.HEALTH_STATUS_UNKNOWN,
        drills=drills.records,
        task=run.spec.training.task,
        device=device,
        experiment_name=run.metadata.labels.get("experiment", ""),
    )
    report.started_at.FromSeconds(int(started))
    report.finished_at.GetCurrentTime()
    _describe_drills(report)
    return report


def _describe_drills(report: RunReport) -> None:
    """Fills each drill's `observed` with what the runtime did about it."""
    for drill in report.drills:
        if not drill.fired:
            drill.observed = "did not fire"
            continue
        notes = []
        if drill.spec.startswith("slow-tamiyo"):
            fallback = [e for e in report.epochs if e.epoch == drill.epoch and e.fallback_command]
            if fallback:
                notes.append(
                    f"fallback command at epoch {drill.epoch} ({fallback[0].fallback_reason})"
                )
            for interval in report.conservative_intervals:
                if interval.entered_epoch == drill.epoch:
                    left = (
                        f"left at epoch {interval.exited_epoch}"
                        if interval.exited
                        else "still active"
                    )
                    notes.append(f"conservative mode entered at epoch {drill.epoch}, {left}")
        if drill.spec.startswith("lr-tamper"):
            notes.append(
                f"{report.lr_integrity_breaches} LR integrity breach(es) detected, LR restored"
            )
        drill.observed = "; ".join(notes) or "fired; no reaction recorded"
