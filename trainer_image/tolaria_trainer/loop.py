"""The plan of a run: train an epoch, validate, run the hook, repeat.

`EpochLoop.run_epoch` reads top to bottom, one component call per line; the
components own timing, breakers, profiler ranges and recovery (STYLE "the
loop reads top to bottom"). The loop owns the order and the position, nothing
else. A rollback moves the position (possibly to an earlier epoch); the loop
then simply carries on from there.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from leyline import EpochRecord, HealthStatus, MessagePriority, RunPhase
from tolaria_trainer.clock import ns_to_ms
from tolaria_trainer.data import BatchPlan
from tolaria_trainer.detector import AnomalyDetector
from tolaria_trainer.drills import Drills
from tolaria_trainer.guards import Guards
from tolaria_trainer.history import RunHistory
from tolaria_trainer.hook import EndOfEpochHook, EpochResult, HookOutcome
from tolaria_trainer.latency import LatencyStats
from tolaria_trainer.lr_controller import LRController
from tolaria_trainer.metrics import TrainerMetrics
from tolaria_trainer.optimizer_manager import OptimizerManager
from tolaria_trainer.position import Position
from tolaria_trainer.profiler import EpochProfiler
from tolaria_trainer.progress import ProgressView
from tolaria_trainer.protocols import Clock
from tolaria_trainer.recovery import Recovery, Response
from tolaria_trainer.steps import StepRunner
from tolaria_trainer.tasks import Task
from tolaria_trainer.telemetry import TelemetryHub

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a run ended, as far as the loop knows."""

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

    def run(self, epoch: int, on_batch: Callable[[], None]) -> tuple[float, float, int]:
        start = self._clock.now_ns()
        loss, accuracy = self._steps.evaluate(
            lambda: self._plan.batches(epoch), self._task.accuracy_fn, on_batch
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
        detector: AnomalyDetector,
        recovery: Recovery | None,
        position: Position,
        history: RunHistory,
        telemetry: TelemetryHub,
        metrics: TrainerMetrics,
        profiler: EpochProfiler,
        drills: Drills,
        view: ProgressView,
        clock: Clock,
        step_packet_every: int,
        check_gradients: bool,
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
        self.detector = detector
        self.recovery = recovery
        self.pos = position
        self.history = history
        self.telemetry = telemetry
        self.metrics = metrics
        self.profiler = profiler
        self.drills = drills
        self.view = view
        self._clock = clock
        self._packet_every = step_packet_every
        self._check_gradients = check_gradients
        self.stop = stop or threading.Event()
        self.outcome = Outcome()

    def run(self) -> Outcome:
        """Runs from the current position to the last epoch, or until halted or stopped."""
        self.outcome.phase = RunPhase.Running
        while self.pos.epoch < self.epochs:
            if self.stop.is_set():  # the run's end names the signal (stopping.py)
                return self._end(RunPhase.Stopped, "stopped before the last epoch")
            epoch = self.pos.epoch
            with self.profiler.epoch(epoch, conservative=self.guards.conservative.active):
                response = self.run_epoch(epoch)
            if response is not None and response.phase is not None:
                return self._end(response.phase, response.reason)  # halted or suspended
            # after a rollback the restored position says where to carry on
        return self._end(RunPhase.Succeeded, "")

    def _end(self, phase: RunPhase.ValueType, reason: str) -> Outcome:
        self.outcome = Outcome(phase, reason)
        return self.outcome

    def run_epoch(self, epoch: int) -> Response | None:
        """One epoch: training steps, validation, the hook; returns a rollback or halt if any."""
        self.guards.at(epoch, self.pos.global_step)
        epoch_start_step = self.pos.global_step
        started = self._clock.now_ns()
        self.steps.new_epoch()
        step_samples: list[torch.Tensor] = []
        for batch in self._train.batches(
            epoch,
            start=self.pos.next_batch,
            skip=self.history.skips_for(epoch),
            reshuffles=self.history.reshuffles_for(epoch),
            exclude=self.quarantined(epoch),
        ):
            if (response := self._boundary()) is not None:
                return response  # freeze, halt or an emergency from outside (R7)
            self.steps.loss_hook = self.drills.loss_hook(epoch, self.pos.global_step + 1)
            self.steps.forward_backward(batch)  # host loss; seeds join in R5
            step_samples.append(batch.samples)
            self.pos.next_batch = batch.index + 1
            if not self.steps.step_ready:
                continue
            if (response := self._inspect(epoch, batch.index, step_samples)) is not None:
                return response  # SEVERE -> fast rollback (R6, R7)
            step_samples.clear()
            self._optimizer_step(epoch)  # snapshot fence, optimizer, LR controller (R3)
            if self.recovery is not None:
                self.recovery.after_step()  # heartbeat, snapshot cadence (R6.1)
            self.drills.after_step(epoch, self.pos.global_step)
            self.view.step(epoch, batch.index + 1)
            if (
                self._max_steps is not None
                and self.pos.global_step - epoch_start_step >= self._max_steps
            ):
                break
            if self.stop.is_set():
                return None
        self.steps.discard_gradients()  # a partial accumulation never leaks into the next epoch
        train_ns = self._clock.now_ns() - started
        return self._close_epoch(epoch, train_ns, epoch_start_step)

    def _boundary(self) -> Response | None:
        if self.recovery is None:
            return None
        return self.recovery.boundary(self.stop)

    def quarantined(self, epoch: int) -> frozenset[int]:
        """Samples recovery took out of training from `epoch` on (a poisoned sample, R13.3)."""
        return self.recovery.quarantined(epoch) if self.recovery is not None else frozenset()

    def _inspect(
        self, epoch: int, batch_index: int, step_samples: list[torch.Tensor]
    ) -> Response | None:
        loss = self.steps.step_loss()
        grads_ok = (
            self.steps.grads_finite() if self._check_gradients and math.isfinite(loss) else True
        )
        anomaly = self.detector.inspect_step(
            loss,
            grads_finite=grads_ok,
            global_step=self.pos.global_step + 1,
            epoch=epoch,
            batch_index=batch_index,
        )
        if anomaly is None:
            return None
        # blamed on these samples (built only now: nothing per step on the hot path)
        anomaly = replace(
            anomaly, samples=frozenset(int(i) for t in step_samples for i in t.tolist())
        )
        self.steps.discard_gradients()  # the bad step is never applied
        logger.error("anomaly at step %d: %s", anomaly.global_step, anomaly.detail)
        if self.recovery is None:
            return None  # no sidecar, no rollback: the step is dropped and training goes on
        return self._after_recovery(self.recovery.respond(anomaly))

    def _after_recovery(self, response: Response | None) -> Response | None:
        if response is None:
            return None
        if response.rolled_back:
            self.view.notice(
                f"rolled back to step {self.pos.global_step}",
                epoch=str(self.pos.epoch),
                batch=str(self.pos.next_batch),
            )
        return response

    def _optimizer_step(self, epoch: int) -> None:
        if self.recovery is not None:
            self.recovery.fence()  # the snapshot copy must finish before anything mutates
        self.steps.optimizer_step()
        self.pos.global_step += 1
        self.drills.before_lr_step(epoch, self.pos.global_step, self.optim.optimizer)
        with record_function("tolaria/lr_update"):
            self.lr.step(epoch, self.pos.global_step)  # integrity guard, then schedule (R3)
        self.metrics.steps.inc()
        if self.pos.global_step % self._packet_every == 0:
            self._step_packet(epoch)

    def _step_packet(self, epoch: int) -> None:
        self.metrics.last_progress.set(time.time())
        self.telemetry.metrics(
            {
                "tolaria.training.loss": self.steps.losses.mean(),
                "tolaria.step": float(self.pos.global_step),
                "tolaria.epoch": float(epoch),
            },
            MessagePriority.MESSAGE_PRIORITY_LOW,
        )

    def _heartbeat(self) -> None:
        if self.recovery is not None:
            self.recovery.heartbeat()

    def _close_epoch(self, epoch: int, train_ns: int, start_step: int) -> Response | None:
        val_loss, val_acc, val_ns = self.validator.run(epoch, self._heartbeat)  # outside the budget
        result = EpochResult(
            epoch,
            self.pos.global_step,
            self.steps.losses.mean(),
            val_loss,
            val_acc,
            {"train_seconds": train_ns / 1e9, "steps": float(self.pos.global_step)},
        )
        self.telemetry.flush()  # the drain thread must not hold the GIL during the hook
        trips_before = self.guards.trips()
        outcome = self.hook.end_of_epoch(result)  # Tamiyo, Kasmina, breakers (R1, R2)
        self.guards.end_epoch(epoch, self.pos.global_step)
        self.lr.epoch_end(epoch, self.pos.global_step)
        self.pos.epoch = epoch + 1
        self.pos.next_batch = 0
        self.pos.epochs_completed = max(self.pos.epochs_completed, epoch + 1)
        self._record(result, outcome, train_ns, val_ns)
        anomaly = self.detector.inspect_epoch(
            accuracy=val_acc,
            hook_breached=outcome.breached,
            breaker_trips=self.guards.trips() - trips_before,
            global_step=self.pos.global_step,
            epoch=epoch,
            epoch_start_step=start_step,
        )
        if anomaly is not None and self.recovery is not None:
            logger.error("epoch %d anomaly: %s", epoch, anomaly.detail)
            response = self._after_recovery(self.recovery.respond(anomaly))
            if response is not None:
                return response
        if self.recovery is not None:  # epoch snapshot (+ durable checkpoint when due)
            stop = self.recovery.epoch_end(
                health=self.history.epochs[-1].health,
                loss=self.history.epochs[-1].training_loss,
                trained_steps=self.pos.global_step - start_step,
            )
            if stop:
                return Response(phase=RunPhase.Suspended, reason=stop)
        return None

    def _record(
        self, r: EpochResult, outcome: HookOutcome, train_ns: int, val_ns: int
    ) -> EpochRecord:
        inputs = self.telemetry.health_inputs
        inputs.conservative = self.guards.conservative.active
        inputs.open_breakers = self.guards.open_breakers()
        inputs.budget_breaches_this_epoch = int(outcome.breached)
        health = self.telemetry.health()
        record = EpochRecord(
            epoch=r.epoch,
            global_step=r.global_step,
            training_loss=r.training_loss,
            validation_loss=r.validation_loss,
            validation_accuracy=r.validation_accuracy,
            hook_ms=ns_to_ms(outcome.total_ns),
            validation_ms=ns_to_ms(val_ns),
            train_seconds=train_ns / 1e9,
            learning_rates=self.lr.current_lrs(),
            health=health.status,
            health_reason=health.summary
            if health.status != HealthStatus.HEALTH_STATUS_HEALTHY
            else "",
            conservative=self.guards.conservative.active,
            command_type=outcome.command.command_type,
            fallback_command=outcome.used_fallback,
            fallback_reason=outcome.fallback_reason,
        )
        self.history.epochs.append(record)
        self.history.hook_ns.append(outcome.total_ns)
        self.history.validation_ns.append(val_ns)
        self.history.fallbacks += int(outcome.used_fallback)
        self._publish(record, outcome)
        if outcome.used_fallback:
            self.view.notice(f"epoch {r.epoch}: fallback command", reason=outcome.fallback_reason)
        self.view.epoch(record, self.hook.latency.window_percentile_ms(95))
        return record

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
