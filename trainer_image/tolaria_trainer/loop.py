"""The plan of a run: train an epoch, validate, run the hook, repeat.

`EpochLoop.run_epoch` reads top to bottom, one component call per line; the
components own timing, breakers and profiler ranges (STYLE "the loop reads top
to bottom"). The loop owns the order and the step counter, nothing else.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.profiler import record_function

from leyline import (
    EpochRecord,
    HealthStatus,
    MessagePriority,
    RunPhase,
)
from tolaria_trainer.clock import ns_to_ms
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.drills import Drills
from tolaria_trainer.guards import Guards
from tolaria_trainer.hook import EndOfEpochHook, EpochResult, HookOutcome
from tolaria_trainer.latency import LatencyStats
from tolaria_trainer.lr_controller import LRController
from tolaria_trainer.metrics import TrainerMetrics
from tolaria_trainer.optimizer_manager import OptimizerManager
from tolaria_trainer.profiler import EpochProfiler
from tolaria_trainer.progress import ProgressView
from tolaria_trainer.protocols import Clock
from tolaria_trainer.steps import StepRunner
from tolaria_trainer.tasks import Task
from tolaria_trainer.telemetry import TelemetryHub

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the run is; everything the report needs about progress."""

    epoch: int = 0
    global_step: int = 0
    epochs_completed: int = 0
    records: list[EpochRecord] = field(default_factory=list)
    phase: RunPhase.ValueType = RunPhase.Pending
    reason: str = ""


class Validator:
    """Runs validation after training, timed outside the hook budget (R1.1)."""

    def __init__(self, steps: StepRunner, plan: BatchPlan, task: Task, clock: Clock) -> None:
        self._steps = steps
        self._plan = plan
        self._task = task
        self._clock = clock
        self.latency = LatencyStats(budget_ms=None, window=1)

    def run(self, epoch: int) -> tuple[float, float, int]:
        start = self._clock.now_ns()
        loss, accuracy = self._steps.evaluate(
            lambda: self._plan.batches(epoch), self._task.accuracy_fn
        )
        elapsed = self._clock.now_ns() - start
        self.latency.add(elapsed)
        return loss, accuracy, elapsed


class EpochLoop:
    """Drives the epochs of one run."""

    def __init__(
        self,
        *,
        epochs: int,
        max_steps_per_epoch: int | None,
        train: BatchPlan,
        steps: StepRunner,
        validator: Validator,
        optim: OptimizerManager,
        lr: LRController,
        hook: EndOfEpochHook,
        guards: Guards,
        telemetry: TelemetryHub,
        metrics: TrainerMetrics,
        profiler: EpochProfiler,
        drills: Drills,
        view: ProgressView,
        clock: Clock,
        step_packet_every: int,
        stop: threading.Event | None = None,
    ) -> None:
        self.epochs = epochs
        self._max_steps = max_steps_per_epoch
        self._train = train
        self.steps = steps
        self.validator = validator
        self.optim = optim
        self.lr = lr
        self.hook = hook
        self.guards = guards
        self.telemetry = telemetry
        self.metrics = metrics
        self.profiler = profiler
        self.drills = drills
        self.view = view
        self._clock = clock
        self._packet_every = step_packet_every
        self.stop = stop or threading.Event()
        self.state = LoopState()
        self._epoch_start_step = 0
        self._on_epoch: list[Callable[[EpochRecord], None]] = []

    def run(self) -> LoopState:
        """Runs every epoch unless stopped; the caller turns the state into the report."""
        self.state.phase = RunPhase.Running
        for epoch in range(self.state.epoch, self.epochs):
            if self.stop.is_set():
                self.state.phase = RunPhase.Failed
                self.state.reason = self.state.reason or "stopped before the last epoch"
                return self.state
            with self.profiler.epoch(epoch, conservative=self.guards.conservative.active):
                record = self.run_epoch(epoch)
            self.state.records.append(record)
            self.state.epochs_completed = epoch + 1
            self.state.epoch = epoch + 1
        self.state.phase = RunPhase.Succeeded
        return self.state

    def run_epoch(self, epoch: int) -> EpochRecord:
        """One epoch: training steps, validation, then the end-of-epoch hook."""
        self.guards.at(epoch, self.state.global_step)
        self._epoch_start_step = self.state.global_step
        started = self._clock.now_ns()
        self.steps.new_epoch()
        for batch in self._train.batches(epoch):
            self.steps.forward_backward(batch)  # host loss; seeds join in R5
            if self.steps.step_ready and self._optimizer_step(epoch) and self._epoch_full():
                break
            self.view.step(epoch, batch.index + 1)
            if self.stop.is_set():
                break
        self.steps.discard_gradients()  # a partial accumulation never leaks into the next epoch
        train_ns = self._clock.now_ns() - started
        val_loss, val_acc, val_ns = self.validator.run(epoch)  # timed outside the hook budget
        result = EpochResult(
            epoch,
            self.state.global_step,
            self.steps.losses.mean(),
            val_loss,
            val_acc,
            {"train_seconds": train_ns / 1e9, "steps": float(self.state.global_step)},
        )
        self.telemetry.flush()  # the drain thread must not hold the GIL during the hook
        outcome = self.hook.end_of_epoch(result)  # Tamiyo, Kasmina, breakers (R1, R2)
        return self._close_epoch(result, outcome, train_ns, val_ns)

    def _optimizer_step(self, epoch: int) -> bool:
        self.steps.optimizer_step()
        self.state.global_step += 1
        self.drills.before_lr_step(epoch, self.state.global_step, self.optim.optimizer)
        with record_function("tolaria/lr_update"):
            self.lr.step(epoch, self.state.global_step)  # integrity guard, then schedule (R3)
        self.metrics.steps.inc()
        if self.state.global_step % self._packet_every == 0:
            self._step_packet(epoch)
        return True

    def _epoch_full(self) -> bool:
        if self._max_steps is None:
            return False
        return self.state.global_step - self._epoch_start_step >= self._max_steps

    def _step_packet(self, epoch: int) -> None:
        loss = self.steps.losses.mean()
        self.metrics.last_progress.set(time.time())
        self.telemetry.metrics(
            {
                "tolaria.training.loss": loss,
                "tolaria.step": float(self.state.global_step),
                "tolaria.epoch": float(epoch),
            },
            MessagePriority.MESSAGE_PRIORITY_LOW,
        )

    def _close_epoch(
        self, r: EpochResult, outcome: HookOutcome, train_ns: int, val_ns: int
    ) -> EpochRecord:
        self.guards.end_epoch(r.epoch, r.global_step)
        self.lr.epoch_end(r.epoch, r.global_step)
        inputs = self.telemetry.health_inputs
        inputs.conservative = self.guards.conservative.active
        inputs.open_breakers = self.guards.open_breakers()
        inputs.budget_breaches_this_epoch = int(outcome.breached)
        health = self.telemetry.health()
        lrs = self.lr.current_lrs()
        record = EpochRecord(
            epoch=r.epoch,
            global_step=r.global_step,
            training_loss=r.training_loss,
            validation_loss=r.validation_loss,
            validation_accuracy=r.validation_accuracy,
            hook_ms=ns_to_ms(outcome.total_ns),
            validation_ms=ns_to_ms(val_ns),
            train_seconds=train_ns / 1e9,
            learning_rates=lrs,
            health=health.status,
            conservative=self.guards.conservative.active,
            command_type=outcome.command.command_type,
            fallback_command=outcome.used_fallback,
            fallback_reason=outcome.fallback_reason,
        )
        self._publish(record, outcome)
        if outcome.used_fallback:
            self.view.notice(f"epoch {r.epoch}: fallback command", reason=outcome.fallback_reason)
        self.view.epoch(record, self.hook.latency.window_percentile_ms(95))
        for listener in self._on_epoch:
            listener(record)
        return record

    def on_epoch(self, listener: Callable[[EpochRecord], None]) -> None:
        self._on_epoch.append(listener)

    def _publish(self, record: EpochRecord, outcome: HookOutcome) -> None:
        m = self.metrics
        m.observe_hook(outcome.total_ns, outcome.phases_ns, breached=outcome.breached)
        m.validation_seconds.observe(record.validation_ms / 1e3)
        m.training_loss.set(record.training_loss)
        m.validation_loss.set(record.validation_loss)
        if math.isfinite(record.validation_accuracy):
            m.validation_accuracy.set(record.validation_accuracy)
        m.epoch.set(record.epoch + 1)
        m.health.set(record.health)
        m.conservative.set(int(record.conservative))
        m.last_progress.set(time.time())
        if outcome.used_fallback:
            m.tamiyo_fallbacks.inc()
        for group, value in record.learning_rates.items():
            m.learning_rate.labels(group).set(value)
        m.sync_breakers(self.guards.breakers.values())
        m.sync_telemetry(self.telemetry.counts())
        priority = (
            MessagePriority.MESSAGE_PRIORITY_NORMAL
            if record.health == HealthStatus.HEALTH_STATUS_HEALTHY
            else MessagePriority.MESSAGE_PRIORITY_HIGH
        )
        self.telemetry.metrics(
            {
                "tolaria.training.loss": record.training_loss,
                "tolaria.validation.loss": record.validation_loss,
                "tolaria.validation.accuracy": record.validation_accuracy,
                "tolaria.epoch_hook.latency_ms": record.hook_ms,
                "tolaria.validation.latency_ms": record.validation_ms,
                "tolaria.mode.conservative": float(record.conservative),
                "tolaria.seeds.active": 0.0,
                "tolaria.command.fallback": float(record.fallback_command),
                "tolaria.command.type": float(record.command_type),
                "tolaria.state_packet.bytes": float(outcome.state_bytes),
            },
            priority,
        )
