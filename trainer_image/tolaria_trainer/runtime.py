"""Builds a run's components from its manifest, runs it, and assembles the report.

This is the composition root: the only place that knows every concrete class.
Everything else receives its collaborators. `run_training` never raises for a
failed run (the report says why); it raises one of `errors.REFUSED_INPUT`
(`TaskInvalid`, `DrillInvalid`, `DeviceUnavailable`, `MetricsPortUnavailable`)
for input refused before training starts, and writes nothing to disk before
that point.

With a sidecar socket (local mode under `tolaria run`, or a pod) the run gets
the recovery layer: snapshots in shared memory, rollbacks, crash resume and
the emergency protocol. Without one it trains with the guards of R1-R4 only.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from leyline import (
    HealthStatus,
    LatencySummary,
    MessagePriority,
    ResumeSource,
    RunPhase,
    RunReport,
    StateComponent,
    TelemetryLevel,
)
from leyline.spec import TolariaRun
from leyline.v1 import sidecar_pb2 as pb
from tolaria_trainer.clock import MonotonicClock
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.detector import AnomalyDetector
from tolaria_trainer.device import (
    apply_process_settings,
    maybe_compile,
    plan_execution,
    seed_everything,
)
from tolaria_trainer.drills import Drills, DrillSpec, check_reachable
from tolaria_trainer.endpoint import metrics_url, open_metrics_socket
from tolaria_trainer.errors import TaskInvalid
from tolaria_trainer.guards import Guards
from tolaria_trainer.hardware import HardwareProbe
from tolaria_trainer.history import HISTORY_DOCUMENT, RunHistory
from tolaria_trainer.hook import EndOfEpochHook
from tolaria_trainer.kasmina import NullSeedManager
from tolaria_trainer.latency import percentile
from tolaria_trainer.loop import EpochLoop, Outcome, Validator
from tolaria_trainer.lr_controller import LRController
from tolaria_trainer.metrics import MetricsServer, TrainerMetrics
from tolaria_trainer.optimizer_manager import OptimizerManager, ParamGroup
from tolaria_trainer.position import Position
from tolaria_trainer.profiler import EpochProfiler
from tolaria_trainer.progress import ProgressView
from tolaria_trainer.recovery import (
    LEDGER_DOCUMENT,
    Recovery,
    RecoveryLedger,
    ResumeImpossible,
    SidecarLink,
)
from tolaria_trainer.recovery.link import LinkHealth, SidecarRefused
from tolaria_trainer.report import accuracy_summary, loss_summary, write_report
from tolaria_trainer.report_file import ReportNotWritten, placeholder, reserve, reserve_bytes
from tolaria_trainer.state import DocumentSource, TrainingState
from tolaria_trainer.steps import StepRunner
from tolaria_trainer.stopping import Interrupted, StopRequest
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
    RunPhase.Suspended: EXIT_SUCCEEDED,
    RunPhase.Failed: EXIT_FAILED,
    RunPhase.Halted: EXIT_HALTED,
}
ATTACH_TIMEOUT_S = 120.0
"""Slots are created and pre-faulted during Attach: seconds per GB on a cold machine."""


@dataclass(frozen=True)
class RunOptions:
    """What the CLI (or the supervisor) adds to the manifest."""

    workdir: Path
    view: ProgressView
    drills: Sequence[DrillSpec] = ()
    metrics_port: int | None = None
    """`--metrics-port` (0: a free port); None: `spec.telemetry.metricsPort` (0: off)."""
    metrics_socket: socket.socket | None = None
    """A bound, listening socket from `tolaria run` (`--metrics-fd`); wins over both ports."""
    profile_epochs: frozenset[int] | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    """Set by the first SIGINT/SIGTERM (`stopping.py`): the run ends `Stopped` after the step."""
    sidecar_socket: str | None = None
    attempt: int = 1
    instance_id: str | None = None
    """This run instance (R13.1); None: the sidecar's."""
    resume_required: bool = False
    """`--resume`: the run must start from a checkpoint of its lineage, never from nothing."""


def param_groups(task: Task) -> list[ParamGroup]:
    """The task's groups with stable parameter names (the optimizer manager maps state by name)."""
    names = {id(p): n for n, p in task.model.named_parameters()}
    return [
        ParamGroup(gid, tuple((names[id(p)], p) for p in params))
        for gid, params in task.resolved_param_groups()
    ]


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


@dataclass
class Components:
    """Everything `build` made, for the loop, the report and the halt path."""

    run: TolariaRun
    run_dir: Path
    loop: EpochLoop
    hub: TelemetryHub
    sink: JsonLinesSink
    recovery: Recovery | None
    profiler: EpochProfiler
    drills: Drills
    history: RunHistory
    device: str
    started: float
    steps_per_epoch: int
    server: MetricsServer | None = None
    warnings: list[str] = field(default_factory=list)
    """What the run could not do but survived (no report reservation, ...), for the report."""


def run_training(run: TolariaRun, options: RunOptions) -> RunReport:
    """Runs the manifest in this process and returns its report (also written to disk).

    However it ends — finished, failed, halted, stopped by a signal (twice: `Interrupted`),
    refused by the sidecar — the report is written; a disk too full for it is logged
    (`ReportNotWritten`), and the returned report's exit code still says what happened.
    """
    c = build(run, options)
    report_path = c.run_dir / "report.json"
    outcome = Outcome(RunPhase.Failed, "")
    options.stop.interruptible = True
    try:
        if c.recovery is not None:
            restored = c.recovery.attach(timeout_s=ATTACH_TIMEOUT_S)
            if restored is not None and c.history.resumes:
                origin = c.history.resumes[-1]
                options.view.notice(
                    f"resumed from {_origin(origin.origin, origin.checkpoint_id)} at step "
                    f"{restored.global_step}",
                    epoch=str(restored.epoch),
                    attempt=str(options.attempt),
                )
        options.view.start(run.name, run.spec.training.epochs, c.steps_per_epoch, c.device)
        outcome = c.loop.run()
    except ResumeImpossible as err:
        logger.error("run %s cannot start: %s", run.name, err)
        outcome = Outcome(RunPhase.Failed, str(err))
    except SidecarRefused as err:  # e.g. a full /dev/shm: the sidecar's message says it all
        logger.error("run %s cannot start: %s", run.name, err)
        outcome = Outcome(RunPhase.Failed, str(err))
    except Interrupted:  # a second signal: the step in progress is abandoned, the report stays
        outcome = Outcome(RunPhase.Stopped, "")
    except Exception as err:  # boundary: a crashing model or task fails the run, with the reason
        logger.exception("run %s failed", run.name)
        outcome = Outcome(RunPhase.Failed, f"{type(err).__name__}: {err}")
    finally:
        options.stop.interruptible = False  # from here on the run writes its report
        c.loop.hook.close()
        c.hub.flush()
    if outcome.phase == RunPhase.Stopped:
        outcome = Outcome(RunPhase.Stopped, _stop_reason(c, options.stop))
    sidecar = None
    if c.recovery is not None:
        c.recovery.close(phase=outcome.phase, reason=outcome.reason)
        sidecar = c.recovery.status()
    report = build_report(c, outcome, sidecar)
    if outcome.phase == RunPhase.Stopped:
        report.exit_code = options.stop.exit_code
    try:
        write_report(report, report_path)
    except ReportNotWritten as err:
        logger.error("%s", err)
    c.hub.event(
        "tolaria.run_finished",
        TelemetryLevel.TELEMETRY_LEVEL_INFO
        if report.exit_code == 0
        else TelemetryLevel.TELEMETRY_LEVEL_CRITICAL,
        MessagePriority.MESSAGE_PRIORITY_CRITICAL
        if report.exit_code
        else MessagePriority.MESSAGE_PRIORITY_HIGH,
        status=RunPhase.Name(report.status),
        reason=report.reason,
    )
    c.hub.close()
    c.sink.close()
    if c.server is not None:
        c.server.close()
    return report


def build(run: TolariaRun, options: RunOptions) -> Components:
    """Builds every component; refuses bad input before anything is written to disk."""
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
    metrics_socket = options.metrics_socket or open_metrics_socket(
        spec.telemetry, options.metrics_port
    )
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: refused input leaves nothing behind
    warnings = []
    if no_room := reserve(  # the final report must fit even if the run fills the disk (R13.5)
        run_dir / "report.json",
        placeholder(run.name, options.instance_id or ""),
        reserve_bytes(t.epochs),
    ):
        warnings.append(no_room)

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
    metrics = TrainerMetrics(CollectorRegistry())
    server = None
    if metrics_socket is not None:
        server = MetricsServer(metrics.registry, metrics_socket)
        options.view.notice("metrics served", url=metrics_url(metrics_socket))

    def compile_fallback(why: str) -> None:
        hub.event(
            "tolaria.compile_fallback",
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            error=why,
        )

    model = maybe_compile(task.model, plan, compile_fallback)
    lr = LRController(
        t.schedule, spec.budgets, guards, clock, steps_per_epoch=per_epoch, total_epochs=t.epochs
    )
    optim = OptimizerManager(t.optimizer, spec.optimizer_rebuild, guards, clock, hub)
    lr.register_optimizer("host", optim.build(param_groups(task)))
    steps = StepRunner(
        model,
        task.loss_fn,
        lambda: optim.optimizer,
        plan,
        t.gradient_accumulation_steps,
        compile_fallback,
    )
    tamiyo = drills.wrap_policy(HeuristicTamiyo(spec.tamiyo))
    kasmina = NullSeedManager()
    position = Position()
    history = RunHistory()
    ledger = RecoveryLedger()
    detector = AnomalyDetector(spec.detection)
    documents: dict[str, tuple[StateComponent.ValueType, DocumentSource]] = {
        "position": (
            StateComponent.STATE_COMPONENT_DATA,
            (position.state_dict, position.load_state_dict),
        ),
        "data": (StateComponent.STATE_COMPONENT_DATA, (train.state_dict, train.load_state_dict)),
        "lr_controller": (
            StateComponent.STATE_COMPONENT_LR_CONTROLLER,
            (lr.state_dict, lr.load_state_dict),
        ),
        "tamiyo": (
            StateComponent.STATE_COMPONENT_POLICY,
            (tamiyo.state_dict, tamiyo.load_state_dict),
        ),
        "kasmina": (
            StateComponent.STATE_COMPONENT_SEEDS,
            (kasmina.state_dict, kasmina.load_state_dict),
        ),
        "detector": (
            StateComponent.STATE_COMPONENT_POLICY,
            (detector.state_dict, detector.load_state_dict),
        ),
        HISTORY_DOCUMENT: (
            StateComponent.STATE_COMPONENT_DATA,
            (history.state_dict, history.load_state_dict),
        ),
        LEDGER_DOCUMENT: (
            StateComponent.STATE_COMPONENT_DATA,
            (ledger.state_dict, ledger.load_state_dict),
        ),
    }
    if steps.scaler is not None:
        scaler = steps.scaler
        documents["grad_scaler"] = (
            StateComponent.STATE_COMPONENT_AMP,
            (scaler.state_dict, lambda doc: scaler.load_state_dict(dict(doc))),
        )
    state = TrainingState(
        model=task.model,
        optimizer=lambda: optim.optimizer,
        parameter_names=lambda: optim.parameters,
        documents=documents,
    )
    profile_epochs = (
        options.profile_epochs
        if options.profile_epochs is not None
        else frozenset(spec.profiler.epochs)
    )
    profiler = EpochProfiler(spec.profiler, profile_epochs, run_dir / "traces")

    recovery = None
    components_ref: list[Components] = []
    if options.sidecar_socket is not None:

        def write_halt_report(reason: str) -> None:
            comps = components_ref[0]
            sidecar = comps.recovery.status() if comps.recovery is not None else None
            report = build_report(comps, Outcome(RunPhase.Halted, reason), sidecar)
            write_report(report, comps.run_dir / "report.json")

        def set_rollback(active: bool) -> None:
            hub.health_inputs.rollback_in_progress = active

        def on_link_health(health: LinkHealth) -> None:
            hub.health_inputs.sidecar_unreachable = "" if health.reachable else health.last_error

        link = SidecarLink(options.sidecar_socket, on_health=on_link_health)
        recovery = Recovery(
            run_id=run.name,
            instance_id=options.instance_id,
            spec=spec,
            link=link,
            state=state,
            position=position,
            history=history,
            ledger=ledger,
            events=hub,
            clock=clock,
            resume_required=options.resume_required,
            attempt=options.attempt,
            batches_per_epoch=train.num_batches,
            write_halt_report=write_halt_report,
            set_rollback_in_progress=set_rollback,
        )
    hook = EndOfEpochHook(
        budgets=spec.budgets,
        tamiyo_spec=spec.tamiyo,
        run_id=run.name,
        experiment=run.metadata.labels.get("experiment", run.name),
        tamiyo=tamiyo,
        kasmina=kasmina,
        scale_lr=lambda f, m, e, s: lr.scale(f, min_scale=m, epoch=e, step=s),
        guards=guards,
        hardware=HardwareProbe(plan.device),
        clock=clock,
        events=hub,
        schedule_slow_work=recovery.schedule_checkpoint if recovery is not None else None,
    )
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
        detector=detector,
        recovery=recovery,
        position=position,
        history=history,
        telemetry=hub,
        metrics=metrics,
        profiler=profiler,
        drills=drills,
        view=options.view,
        clock=clock,
        step_packet_every=spec.telemetry.step_packet_every,
        check_gradients=spec.detection.check_gradients,
        stop=options.stop,
    )
    components = Components(
        run=run,
        run_dir=run_dir,
        loop=loop,
        hub=hub,
        sink=sink,
        recovery=recovery,
        profiler=profiler,
        drills=drills,
        history=history,
        device=plan.describe(),
        started=started,
        steps_per_epoch=per_epoch,
        server=server,
        warnings=warnings,
    )
    components_ref.append(components)
    if recovery is not None:
        drills.corrupt_newest = lambda every: _corrupt_newest(recovery, every)
        drills.settle = recovery.settle_durable
    return components


def _origin(origin: int, checkpoint_id: str) -> str:
    if origin == ResumeSource.RESUME_SOURCE_CHECKPOINT:
        return f"checkpoint {checkpoint_id}"
    return "shared memory"


def _stop_reason(c: Components, stop: StopRequest) -> str:
    pos = c.loop.pos
    return stop.reason(
        global_step=pos.global_step,
        epochs_completed=pos.epochs_completed,
        epochs=c.run.spec.training.epochs,
    )


def _corrupt_newest(recovery: Recovery, every: bool) -> str:
    """The corrupt-snapshot drill: flips bytes in the middle of the newest committed slot, or
    of every committed slot."""
    recovery.fence()
    committed = []
    for slot in recovery.slots:
        header = slot.header()
        if header.visible:
            committed.append((header.generation, slot, header))
    if not committed:
        return "no committed slot to corrupt"
    committed.sort(key=lambda item: item[0], reverse=True)
    done = []
    for _, slot, header in committed if every else committed[:1]:
        middle = header.data_length // 2
        for offset in (middle, middle + 1, middle + 4097):
            if offset < header.data_length:
                slot.data[offset] ^= 0xFF
        done.append(
            f"slot {slot.index} (generation {header.generation}, step {header.global_step})"
        )
    return "corrupted " + ", ".join(done)


def _summary(samples_ns: list[int], budget_ms: float | None) -> LatencySummary:
    ordered = sorted(samples_ns)
    n = len(ordered)
    breaches = sum(1 for v in ordered if budget_ms is not None and v / 1e6 > budget_ms)
    return LatencySummary(
        count=n,
        p50_ms=percentile(ordered, 50) / 1e6,
        p95_ms=percentile(ordered, 95) / 1e6,
        p99_ms=percentile(ordered, 99) / 1e6,
        max_ms=ordered[-1] / 1e6 if ordered else 0.0,
        mean_ms=sum(ordered) / n / 1e6 if n else 0.0,
        budget_ms=budget_ms or 0.0,
        breaches=breaches,
    )


def build_report(
    c: Components, outcome: Outcome, sidecar: pb.SidecarStatus | None = None
) -> RunReport:
    """Turns the history and the components' records into a `RunReport`."""
    loop = c.loop
    h = c.history
    guards = loop.guards
    spec = c.run.spec
    intervals = list(h.past_intervals) + list(guards.conservative.intervals)
    report = RunReport(
        version=1,
        run_id=c.run.name,
        instance_id=c.recovery.instance_id if c.recovery is not None else "",
        lineage_id=c.recovery.lineage_id if c.recovery is not None else "",
        status=outcome.phase,
        reason=outcome.reason,
        exit_code=EXIT_CODES.get(outcome.phase, EXIT_FAILED),
        wall_seconds=time.time() - c.started,
        epochs_planned=spec.training.epochs,
        epochs_completed=loop.pos.epochs_completed,
        global_step=loop.pos.global_step,
        training_loss=loss_summary([r.training_loss for r in h.epochs]),
        validation_loss=loss_summary([r.validation_loss for r in h.epochs]),
        validation_accuracy=accuracy_summary([r.validation_accuracy for r in h.epochs]),
        hook_latency=_summary(h.hook_ns, spec.budgets.hook_ms),
        validation_time=_summary(h.validation_ns, None),
        tamiyo_latency=loop.hook.tamiyo_latency.summary(),
        lr_step_latency=loop.lr.step_latency.summary(),
        breaker_trips=guards.trips(),
        breakers=[b.summary() for b in guards.breakers.values()],
        conservative_intervals=intervals,
        lr_changes=loop.lr.changes,
        lr_integrity_breaches=loop.lr.integrity_breaches,
        optimizer_rebuilds=loop.optim.rebuilds,
        telemetry=c.hub.counts(),
        trace_paths=[str(p) for p in c.profiler.traces],
        fallback_commands=h.fallbacks,
        epochs=h.epochs,
        final_health=h.epochs[-1].health if h.epochs else HealthStatus.HEALTH_STATUS_UNKNOWN,
        drills=c.drills.records,
        task=spec.training.task,
        device=c.device,
        experiment_name=c.run.metadata.labels.get("experiment", ""),
        rollbacks=h.rollbacks,
        emergencies=h.emergencies,
        resumes=h.resumes,
        skipped_batches=h.skipped,
        snapshot_rejections=h.rejections,
        decisions=h.decisions,
        checkpoint_rejections=h.checkpoint_rejections,
        history_omitted=h.omitted,
    )
    if outcome.phase == RunPhase.Halted:
        report.final_health = HealthStatus.HEALTH_STATUS_CRITICAL
    if sidecar is not None:
        if sidecar.emergencies:  # the sidecar's records carry every participant's ack
            del report.emergencies[:]
            report.emergencies.extend(sidecar.emergencies)
        report.checkpoints.extend(sidecar.checkpoints)
        report.checkpoint_failures.extend(sidecar.checkpoint_failures)
        known = {(r.file_name, r.reason) for r in report.checkpoint_rejections}
        report.checkpoint_rejections.extend(
            r for r in sidecar.checkpoint_rejections if (r.file_name, r.reason) not in known
        )
    r = c.recovery
    if r is not None:
        report.snapshots_committed = r.snapshots_committed
        report.quarantined_samples.extend(r.quarantine)
        if r.writer is not None:
            report.snapshot_stall.CopyFrom(r.writer.stall.summary())
    report.warnings.extend(c.warnings)
    report.telemetry_unwritten = c.sink.unwritten
    if c.sink.failure:
        report.warnings.append(f"telemetry stopped: {c.sink.failure}")
    report.started_at.FromSeconds(int(c.started))
    report.finished_at.GetCurrentTime()
    _describe_drills(report)
    if not math.isfinite(report.wall_seconds):
        report.wall_seconds = 0.0
    return report


def _describe_drills(report: RunReport) -> None:
    """Fills each drill's `observed` with what the runtime did about it."""
    for drill in report.drills:
        if not drill.fired:
            drill.observed = drill.observed or "did not fire"
            continue
        notes = [drill.observed] if drill.observed else []
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
        if drill.spec.startswith(("loss-spike", "nan", "corrupt-snapshot")):
            later = [
                rb
                for rb in report.rollbacks
                if rb.from_step >= drill.step and rb.from_epoch >= drill.epoch
            ]
            if later:
                rb = later[0]
                notes.append(
                    f"rollback {rb.rollback_id} from step {rb.from_step} to step {rb.to_step}"
                    + (f", rejected slots {list(rb.rejected_slots)}" if rb.rejected_slots else "")
                )
        drill.observed = "; ".join(notes) or "fired; no reaction recorded"
