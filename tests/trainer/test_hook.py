"""The end-of-epoch hook (R1): deadline, fallback, dispatch, budget accounting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from leyline import (
    SCHEMA_VERSION,
    AdaptationCommand,
    BreakerId,
    CommandOptimizerAdjustment,
    CommandSeedOperation,
    CommandType,
    HookPhase,
    SeedOperation,
    SystemStatePacket,
)
from leyline.spec import BudgetsSpec, TamiyoSpec
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.clock import MonotonicClock
from tolaria_trainer.deadline import CallOutcome, CallStatus
from tolaria_trainer.guards import Guards
from tolaria_trainer.hardware import HardwareProbe
from tolaria_trainer.hook import EVENT_TAMIYO_FALLBACK, EndOfEpochHook, EpochResult
from tolaria_trainer.kasmina import NullSeedManager
from tolaria_trainer.tamiyo import ACTION_FALLBACK, ANNOTATION_ACTION


@dataclass
class ScriptedTamiyo:
    """Answers with `command` after running `delay` (real time)."""

    command: AdaptationCommand = field(
        default_factory=lambda: AdaptationCommand(
            version=SCHEMA_VERSION, command_type=CommandType.COMMAND_UNKNOWN
        )
    )
    delay: Callable[[], object] = lambda: None
    seen: list[SystemStatePacket] = field(default_factory=list)

    def decide(self, state: SystemStatePacket, *, deadline_ns: int) -> AdaptationCommand:
        self.seen.append(state)
        self.delay()
        return self.command

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class ScaleCalls:
    calls: list[tuple[float, float, int, int]] = field(default_factory=list)

    def __call__(self, factor: float, min_scale: float, epoch: int, step: int) -> None:
        self.calls.append((factor, min_scale, epoch, step))


def make_hook(
    tamiyo: Any, guards: Guards, events: RecordingEvents, clock: Any = None, **kw: Any
) -> tuple[EndOfEpochHook, ScaleCalls]:
    scale = ScaleCalls()
    hook = EndOfEpochHook(
        budgets=kw.pop("budgets", BudgetsSpec()),
        tamiyo_spec=TamiyoSpec(),
        run_id="unit",
        experiment="unit",
        tamiyo=tamiyo,
        kasmina=kw.pop("kasmina", NullSeedManager()),
        scale_lr=scale,
        guards=guards,
        hardware=HardwareProbe(torch.device("cpu")),
        clock=clock or MonotonicClock(),
        events=events,
        **kw,
    )
    return hook, scale


RESULT = EpochResult(
    epoch=3, global_step=300, training_loss=0.5, validation_loss=0.6, validation_accuracy=0.7
)


@pytest.mark.req("R1.3")
def test_a_policy_that_sleeps_one_second_does_not_delay_the_hook(
    guards: Guards, events: RecordingEvents
) -> None:
    release = threading.Event()
    hook, _ = make_hook(ScriptedTamiyo(delay=lambda: release.wait(1.0)), guards, events)
    start = time.perf_counter()
    outcome = hook.end_of_epoch(RESULT)
    elapsed = time.perf_counter() - start
    release.set()
    hook.close()
    assert elapsed < 0.5  # deadline ~13.5 ms; the policy needed 1 s
    assert outcome.used_fallback and "deadline" in outcome.fallback_reason
    assert outcome.command.annotations[ANNOTATION_ACTION] == ACTION_FALLBACK
    assert outcome.command.command_type == CommandType.COMMAND_PAUSE


@pytest.mark.req("R1.4")
def test_a_late_policy_is_a_breaker_failure_and_enters_conservative_mode(
    guards: Guards, events: RecordingEvents
) -> None:
    release = threading.Event()
    hook, _ = make_hook(ScriptedTamiyo(delay=lambda: release.wait(1.0)), guards, events)
    hook.end_of_epoch(RESULT)
    release.set()
    hook.close()
    assert guards.breakers[BreakerId.BREAKER_TAMIYO].failures == 1
    assert guards.conservative.active
    assert events.named(EVENT_TAMIYO_FALLBACK)


@pytest.mark.req("R1.1")
def test_the_state_packet_carries_epoch_step_losses_and_run(
    guards: Guards, events: RecordingEvents
) -> None:
    tamiyo = ScriptedTamiyo()
    hook, _ = make_hook(tamiyo, guards, events)
    hook.end_of_epoch(RESULT)
    hook.close()
    state = tamiyo.seen[0]
    assert (state.current_epoch, state.global_step, state.training_run_id) == (3, 300, "unit")
    assert state.validation_loss == pytest.approx(0.6) and state.training_loss == pytest.approx(0.5)
    assert state.hardware_context.device_type == "cpu" and state.version == SCHEMA_VERSION


@pytest.mark.req("R1.3")
def test_a_policy_that_raises_gets_the_fallback(guards: Guards, events: RecordingEvents) -> None:
    def boom() -> None:
        raise RuntimeError("policy bug")

    hook, _ = make_hook(ScriptedTamiyo(delay=boom), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert "RuntimeError: policy bug" in outcome.fallback_reason


def test_a_command_with_an_unknown_version_is_refused(
    guards: Guards, events: RecordingEvents
) -> None:
    hook, _ = make_hook(ScriptedTamiyo(command=AdaptationCommand(version=2)), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert "version 2" in outcome.fallback_reason


@pytest.mark.req("R2.2")
def test_tamiyo_is_not_consulted_while_its_breaker_is_open(
    guards: Guards, events: RecordingEvents
) -> None:
    for _ in range(3):
        guards.failure(BreakerId.BREAKER_TAMIYO, "late")
    tamiyo = ScriptedTamiyo()
    hook, _ = make_hook(tamiyo, guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert tamiyo.seen == [] and "breaker open" in outcome.fallback_reason


def test_an_lr_cut_command_goes_to_the_lr_controller(
    guards: Guards, events: RecordingEvents
) -> None:
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_type=CommandType.COMMAND_OPTIMIZER,
        optimizer_adjustment=CommandOptimizerAdjustment(
            optimizer_id="host", hyperparameters={"lr_scale": 0.5}
        ),
    )
    hook, scale = make_hook(ScriptedTamiyo(command=cmd), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert scale.calls == [(0.5, TamiyoSpec().min_lr_scale, 3, 300)]
    assert outcome.applied == "lr scaled by 0.5"


def test_an_unsupported_hyperparameter_is_refused(guards: Guards, events: RecordingEvents) -> None:
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_type=CommandType.COMMAND_OPTIMIZER,
        optimizer_adjustment=CommandOptimizerAdjustment(hyperparameters={"momentum": 0.1}),
    )
    hook, scale = make_hook(ScriptedTamiyo(command=cmd), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert scale.calls == [] and outcome.applied.startswith("refused")


@pytest.mark.req("R2.2")
def test_seed_operations_are_refused_in_conservative_mode(
    guards: Guards, events: RecordingEvents
) -> None:
    guards.enter_conservative("test")
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_type=CommandType.COMMAND_SEED,
        seed_operation=CommandSeedOperation(operation=SeedOperation.SEED_OP_GERMINATE),
    )
    hook, _ = make_hook(ScriptedTamiyo(command=cmd), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert outcome.applied == "refused: seed operations are refused in conservative mode"


def test_kasmina_refusing_a_seed_operation_is_a_kasmina_breaker_failure(
    guards: Guards, events: RecordingEvents
) -> None:
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_type=CommandType.COMMAND_SEED,
        seed_operation=CommandSeedOperation(operation=SeedOperation.SEED_OP_GERMINATE),
    )
    hook, _ = make_hook(ScriptedTamiyo(command=cmd), guards, events)
    outcome = hook.end_of_epoch(RESULT)
    hook.close()
    assert guards.breakers[BreakerId.BREAKER_KASMINA].failures == 1
    assert "SEED_OP_GERMINATE" in outcome.applied


@dataclass
class SlowFakeCaller:
    """A DeadlineCaller stand-in that answers at once but makes the fake clock say `ms` passed."""

    clock: FakeClock
    ms: float

    def call(self, fn: Callable[[], Any], *, deadline_ns: int) -> CallOutcome[Any]:
        value = fn()
        self.clock.advance_ms(self.ms)
        return CallOutcome(CallStatus.OK, value, None, int(self.ms * 1e6))

    def close(self) -> None:
        pass


@pytest.mark.req("R1.2")
def test_a_hook_over_budget_is_a_hook_timing_failure(
    guards: Guards, events: RecordingEvents, clock: FakeClock
) -> None:
    hook, _ = make_hook(
        ScriptedTamiyo(), guards, events, clock=clock, caller=SlowFakeCaller(clock, 20.0)
    )
    outcome = hook.end_of_epoch(RESULT)
    assert outcome.breached and outcome.total_ns >= 20_000_000
    assert guards.breakers[BreakerId.BREAKER_HOOK_TIMING].failures == 1
    assert hook.latency.summary().breaches == 1


@pytest.mark.req("R1.2")
def test_a_hook_within_budget_records_every_phase(
    guards: Guards, events: RecordingEvents, clock: FakeClock
) -> None:
    hook, _ = make_hook(
        ScriptedTamiyo(), guards, events, clock=clock, caller=SlowFakeCaller(clock, 5.0)
    )
    outcome = hook.end_of_epoch(RESULT)
    assert not outcome.breached and not guards.conservative.active
    assert set(outcome.phases_ns) == {
        HookPhase.HOOK_PHASE_ASSEMBLY,
        HookPhase.HOOK_PHASE_TAMIYO,
        HookPhase.HOOK_PHASE_COMMAND,
        HookPhase.HOOK_PHASE_GUARD,
    }
    assert outcome.phases_ns[HookPhase.HOOK_PHASE_TAMIYO] == 5_000_000


@pytest.mark.req("R1.3")
def test_tamiyo_deadline_is_capped_by_the_two_second_ceiling(
    guards: Guards, events: RecordingEvents, clock: FakeClock
) -> None:
    seen: list[int] = []

    @dataclass
    class Recorder:
        def call(self, fn: Callable[[], Any], *, deadline_ns: int) -> CallOutcome[Any]:
            seen.append(deadline_ns - clock.now_ns())
            return CallOutcome(CallStatus.OK, fn(), None, 0)

        def close(self) -> None:
            pass

    budgets = BudgetsSpec(hook_ms=60_000.0, tamiyo_ms=50_000.0)
    hook, _ = make_hook(
        ScriptedTamiyo(), guards, events, clock=clock, caller=Recorder(), budgets=budgets
    )
    hook.end_of_epoch(RESULT)
    assert seen == [2_000_000_000]


def test_slow_work_is_scheduled_not_performed(guards: Guards, events: RecordingEvents) -> None:
    scheduled: list[tuple[int, int]] = []
    hook, _ = make_hook(
        ScriptedTamiyo(), guards, events, schedule_slow_work=lambda e, s: scheduled.append((e, s))
    )
    hook.end_of_epoch(RESULT)
    hook.close()
    assert scheduled == [(3, 300)]
