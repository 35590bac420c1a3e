"""The end-of-epoch hook (R1): assemble state, ask Tamiyo, apply, schedule, time.

Called once per epoch by the loop, after validation (validation time is
reported separately, outside the budget). The hook is held to
`spec.budgets.hookMs` (18 ms) split 3.5 assembly / 12 Tamiyo / 1.5 command /
1 guard. Tamiyo runs on a `DeadlineCaller` worker with a hard deadline of
min(remaining budget less the command and guard shares, 2 s ceiling); a late
Tamiyo is abandoned and replaced by the fallback command (R1.3). A breach
never raises: it is a breaker failure and conservative mode (R1.4).

The hook never performs slow work (checkpoints): it hands it to a scheduler.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch.profiler import record_function

from leyline import (
    SCHEMA_VERSION,
    AdaptationCommand,
    BreakerId,
    CommandType,
    HookPhase,
    MessagePriority,
    SystemStatePacket,
    TelemetryLevel,
)
from leyline.spec import BudgetsSpec, TamiyoSpec
from tolaria_trainer.clock import ms_to_ns, ns_to_ms
from tolaria_trainer.deadline import CallStatus, DeadlineCaller
from tolaria_trainer.guards import Guards
from tolaria_trainer.hardware import HardwareProbe
from tolaria_trainer.latency import LatencyStats
from tolaria_trainer.protocols import Clock, EventSink, SeedManager, TamiyoPolicy
from tolaria_trainer.tamiyo import HYPER_LR_SCALE, fallback_command

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


EVENT_TAMIYO_FALLBACK = "tolaria.tamiyo_fallback"
EVENT_HOOK_BREACH = "tolaria.hook_budget_exceeded"
EVENT_COMMAND = "tolaria.command_applied"
EVENT_COMMAND_REFUSED = "tolaria.command_refused"
SOURCE = "tolaria"


@dataclass(frozen=True)
class EpochResult:
    """What the loop hands the hook about the epoch that just ended."""

    epoch: int
    global_step: int
    training_loss: float
    validation_loss: float
    validation_accuracy: float
    training_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class HookOutcome:
    command: AdaptationCommand
    fallback_reason: str
    applied: str
    total_ns: int
    phases_ns: dict[HookPhase.ValueType, int]
    breached: bool
    state_bytes: int

    @property
    def used_fallback(self) -> bool:
        return bool(self.fallback_reason)


class EndOfEpochHook:
    """Runs the epoch boundary within its budget; see the module docstring."""

    def __init__(
        self,
        *,
        budgets: BudgetsSpec,
        tamiyo_spec: TamiyoSpec,
        run_id: str,
        experiment: str,
        tamiyo: TamiyoPolicy,
        kasmina: SeedManager,
        scale_lr: Callable[[float, float, int, int], object],
        guards: Guards,
        hardware: HardwareProbe,
        clock: Clock,
        events: EventSink,
        caller: DeadlineCaller | None = None,
        schedule_slow_work: Callable[[int, int], None] | None = None,
    ) -> None:
        self._budgets = budgets
        self._tamiyo_spec = tamiyo_spec
        self._run_id = run_id
        self._experiment = experiment
        self._tamiyo = tamiyo
        self._kasmina = kasmina
        self._scale_lr = scale_lr
        self._guards = guards
        self._hardware = hardware
        self._clock = clock
        self._events = events
        self._caller = caller or DeadlineCaller("tamiyo")
        self._schedule_slow_work = schedule_slow_work
        self.latency = LatencyStats(budgets.hook_ms, budgets.latency_window)
        self.tamiyo_latency = LatencyStats(budgets.tamiyo_ms, budgets.latency_window)
        self.fallbacks = 0

    def end_of_epoch(self, result: EpochResult) -> HookOutcome:
        """Runs the hook for `result.epoch`; never raises for budget or policy trouble.

        The cyclic garbage collector is paused for the hook's few milliseconds:
        a generation-2 pass over a large model's objects can cost more than the
        whole budget, and nothing the hook allocates is cyclic garbage.
        """
        with gc_paused():
            return self._run(result)

    def _run(self, result: EpochResult) -> HookOutcome:
        start = self._clock.now_ns()
        phases: dict[HookPhase.ValueType, int] = {}

        state = self._assemble(result)
        state_bytes = self._serialize(state)
        t_assembled = self._clock.now_ns()
        phases[HookPhase.HOOK_PHASE_ASSEMBLY] = t_assembled - start

        with record_function("tolaria/tamiyo_eval"):
            command, fallback_reason = self._consult_tamiyo(state, start)
        t_decided = self._clock.now_ns()
        phases[HookPhase.HOOK_PHASE_TAMIYO] = t_decided - t_assembled

        with record_function("tolaria/kasmina_apply"):
            applied = self._apply(command, result)
        t_applied = self._clock.now_ns()
        phases[HookPhase.HOOK_PHASE_COMMAND] = t_applied - t_decided

        if self._schedule_slow_work is not None:
            self._schedule_slow_work(result.epoch, result.global_step)
        total = self._clock.now_ns() - start
        breached = self.latency.add(total)
        if breached:
            reason = f"hook took {ns_to_ms(total):.2f} ms > budget {self._budgets.hook_ms:g} ms"
            self._guards.failure(BreakerId.BREAKER_HOOK_TIMING, reason)
            self._events.event(
                EVENT_HOOK_BREACH,
                TelemetryLevel.TELEMETRY_LEVEL_WARNING,
                MessagePriority.MESSAGE_PRIORITY_HIGH,
                elapsed_ms=f"{ns_to_ms(total):.3f}",
                budget_ms=f"{self._budgets.hook_ms:g}",
                epoch=str(result.epoch),
            )
        else:
            self._guards.success(BreakerId.BREAKER_HOOK_TIMING)
        phases[HookPhase.HOOK_PHASE_GUARD] = self._clock.now_ns() - t_applied
        if fallback_reason:
            self.fallbacks += 1
        return HookOutcome(command, fallback_reason, applied, total, phases, breached, state_bytes)

    # -- assembly ---------------------------------------------------------------------------
    def _assemble(self, r: EpochResult) -> SystemStatePacket:
        state = SystemStatePacket(
            version=SCHEMA_VERSION,
            current_epoch=r.epoch,
            validation_accuracy=r.validation_accuracy,
            validation_loss=r.validation_loss,
            timestamp_ns=self._clock.now_ns(),
            training_metrics=r.training_metrics,
            packet_id=f"{self._run_id}-state-{r.epoch}",
            global_step=r.global_step,
            training_loss=r.training_loss,
            source_subsystem=SOURCE,
            training_run_id=self._run_id,
            experiment_name=self._experiment,
        )
        state.hardware_context.CopyFrom(self._hardware.context())
        state.seed_states.extend(self._kasmina.export_seed_states())
        return state

    def _serialize(self, state: SystemStatePacket) -> int:
        try:
            size = len(state.SerializeToString())
        except Exception as err:  # boundary: a bad field must not crash the hook
            self._guards.failure(BreakerId.BREAKER_SERIALIZATION, f"state packet: {err}")
            return 0
        self._guards.success(BreakerId.BREAKER_SERIALIZATION)
        return size

    # -- Tamiyo -----------------------------------------------------------------------------
    def _deadline_ns(self, start: int) -> int:
        reserve_ms = self._budgets.command_ms + self._budgets.guard_ms
        remaining = start + ms_to_ns(self._budgets.hook_ms - reserve_ms) - self._clock.now_ns()
        ceiling = int(self._budgets.tamiyo_ceiling_seconds * 1e9)
        return self._clock.now_ns() + max(0, min(remaining, ceiling))

    def _fallback(self, state: SystemStatePacket, reason: str) -> tuple[AdaptationCommand, str]:
        self._events.event(
            EVENT_TAMIYO_FALLBACK,
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_HIGH,
            reason=reason,
            epoch=str(state.current_epoch),
        )
        cmd = fallback_command(
            self._run_id, state.current_epoch, reason, int(self._budgets.command_ms)
        )
        return cmd, reason

    def _consult_tamiyo(
        self, state: SystemStatePacket, start: int
    ) -> tuple[AdaptationCommand, str]:
        if not self._guards.allow(BreakerId.BREAKER_TAMIYO):
            return self._fallback(state, "tamiyo breaker open: not consulted")
        deadline = self._deadline_ns(start)
        if deadline <= self._clock.now_ns():
            self._guards.failure(BreakerId.BREAKER_TAMIYO, "no hook budget left for Tamiyo")
            return self._fallback(state, "no budget left")
        budget_ms = ns_to_ms(deadline - self._clock.now_ns())
        outcome = self._caller.call(
            lambda: self._tamiyo.decide(state, deadline_ns=deadline), deadline_ns=deadline
        )
        self.tamiyo_latency.add(outcome.elapsed_ns)
        if outcome.status is CallStatus.TIMED_OUT:
            reason = f"deadline {budget_ms:.1f} ms missed"
        elif outcome.status is CallStatus.REFUSED:
            reason = "too many abandoned calls still running"
        elif outcome.status is CallStatus.FAILED:
            reason = f"raised {type(outcome.error).__name__}: {outcome.error}"
        elif not isinstance(outcome.value, AdaptationCommand):
            reason = f"returned {type(outcome.value).__name__}, not an AdaptationCommand"
        elif outcome.value.version != SCHEMA_VERSION:
            reason = f"command version {outcome.value.version} != {SCHEMA_VERSION}"
        else:
            self._guards.success(BreakerId.BREAKER_TAMIYO)
            return outcome.value, ""
        self._guards.failure(BreakerId.BREAKER_TAMIYO, reason)
        return self._fallback(state, reason)

    # -- command handling --------------------------------------------------------------------
    def _apply(self, command: AdaptationCommand, r: EpochResult) -> str:
        kind = command.command_type
        if kind == CommandType.COMMAND_UNKNOWN:
            return "hold"
        if kind == CommandType.COMMAND_OPTIMIZER:
            return self._apply_optimizer(command, r)
        if kind == CommandType.COMMAND_SEED and self._guards.conservative.active:
            return self._refuse(command, "seed operations are refused in conservative mode")
        if kind in (
            CommandType.COMMAND_SEED,
            CommandType.COMMAND_PAUSE,
            CommandType.COMMAND_EMERGENCY,
        ):
            return self._apply_kasmina(command)
        return self._refuse(command, f"{CommandType.Name(kind)} is not supported by this runtime")

    def _apply_optimizer(self, command: AdaptationCommand, r: EpochResult) -> str:
        hyper = dict(command.optimizer_adjustment.hyperparameters)
        factor = hyper.pop(HYPER_LR_SCALE, None)
        if hyper:
            return self._refuse(command, f"unsupported hyperparameters {sorted(hyper)}")
        if factor is None or not 0.0 < factor <= 1.0:
            return self._refuse(command, f"{HYPER_LR_SCALE} must be in (0, 1], got {factor}")
        self._scale_lr(factor, self._tamiyo_spec.min_lr_scale, r.epoch, r.global_step)
        return f"lr scaled by {factor:g}"

    def _apply_kasmina(self, command: AdaptationCommand) -> str:
        if not self._guards.allow(BreakerId.BREAKER_KASMINA):
            return self._refuse(command, "kasmina breaker open")
        deadline = self._clock.now_ns() + ms_to_ns(self._budgets.command_ms)
        try:
            done = self._kasmina.apply_command(command, deadline_ns=deadline)
        except Exception as err:  # boundary: Kasmina refusing or failing is reported, not raised
            self._guards.failure(BreakerId.BREAKER_KASMINA, f"{type(err).__name__}: {err}")
            return self._refuse(command, str(err))
        self._guards.success(BreakerId.BREAKER_KASMINA)
        return done

    def _refuse(self, command: AdaptationCommand, why: str) -> str:
        self._events.event(
            EVENT_COMMAND_REFUSED,
            TelemetryLevel.TELEMETRY_LEVEL_WARNING,
            MessagePriority.MESSAGE_PRIORITY_NORMAL,
            command_type=CommandType.Name(command.command_type),
            command_id=command.command_id,
            reason=why,
        )
        return f"refused: {why}"

    def close(self) -> None:
        self._caller.close()
