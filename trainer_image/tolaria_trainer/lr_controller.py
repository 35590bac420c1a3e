"""The unified LR controller: the only code that changes a learning rate (R3).

The training loop calls `LRController.step` right after `optimizer.step()`;
the end-of-epoch hook calls `epoch_end` and, for Tamiyo's LR cut, `scale`; the
optimizer manager calls `rebind_optimizer` after a rebuild; snapshots and
checkpoints save and load `state_dict`. Each registered optimizer gets one
`torch.optim.lr_scheduler.LambdaLR` whose per-group multipliers are
`GroupLambda` objects holding plain numbers only.

It must never raise on the hot path (an LR written behind its back is a
breaker failure and a restore, R3.2), never log or emit events for a clean
step, and never let any other code's LR write stand.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from leyline import BreakerId, LrChange, LrChangeSource, LrShape
from leyline.spec import BudgetsSpec, ScheduleSpec
from tolaria_trainer.errors import BudgetBreached, LRIntegrityError, StateMismatch
from tolaria_trainer.guards import Guards
from tolaria_trainer.latency import LatencyStats
from tolaria_trainer.protocols import Clock, JsonDict

logger = logging.getLogger(__name__)

SEED_GROUP_PREFIX = "seed:"
"""Group ids with this prefix join as seed groups (R3.3) unless a group override sets a shape."""
SEED_LR_RATIO = 0.1
"""Seed base LR as a fraction of the host base LR (R3.3)."""
SEED_WARMUP_EPOCHS = 10
"""Length of a seed group's linear warmup, counted from the step it joined (R3.3)."""
SEED_WARMUP_START_RATIO = 0.01
"""Fraction of the seed base LR at the seed's first step (R3.3)."""
HISTORY_LIMIT = 1000
"""Most `LrChange`s kept; older ones are dropped first (R3.3)."""
RELATIVE_TOLERANCE = 1e-6
"""Relative difference beyond which a group's LR counts as changed (R3.2)."""
ABSOLUTE_TOLERANCE = 1e-12
"""Floor of the tolerance, so LRs near 0 are not judged on rounding noise (R3.2)."""
STATE_FORMAT = 1
"""Version of the `state_dict` layout; a different one is refused on load."""

_INTEGRITY = BreakerId.BREAKER_LR_INTEGRITY
_STEP = BreakerId.BREAKER_LR_STEP
_FROZEN = LrShape.frozen
_SEED = LrShape.seed_warmup


def lr_changed(a: float, b: float) -> bool:
    """Whether two LRs differ beyond the R3.2 tolerance; NaN always differs."""
    return not abs(a - b) <= max(ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE * max(abs(a), abs(b)))


@dataclass(frozen=True)
class ScheduleCurve:
    """The run's schedule as plain numbers, in optimizer steps (built once from `ScheduleSpec`)."""

    run_shape: int
    warmup_steps: float
    warmup_start_ratio: float
    decay_steps: float
    min_lr_ratio: float
    step_period_steps: float
    step_gamma: float
    seed_warmup_steps: float

    @classmethod
    def from_spec(
        cls, spec: ScheduleSpec, steps_per_epoch: int, total_epochs: int
    ) -> ScheduleCurve:
        warmup_steps = spec.warmup_epochs * steps_per_epoch
        return cls(
            run_shape=spec.shape,
            warmup_steps=warmup_steps,
            warmup_start_ratio=spec.warmup_start_ratio,
            decay_steps=total_epochs * steps_per_epoch - warmup_steps,
            min_lr_ratio=spec.min_lr_ratio,
            step_period_steps=spec.step_epochs * steps_per_epoch,
            step_gamma=spec.step_gamma,
            seed_warmup_steps=float(SEED_WARMUP_EPOCHS * steps_per_epoch),
        )

    def host_factor(self, shape: int, step: int) -> float:
        """Warmup (when configured), then the shape's decay counted from the warmup's end."""
        if step < self.warmup_steps:
            ratio = self.warmup_start_ratio
            return ratio + (1.0 - ratio) * step / self.warmup_steps
        return self.decay_factor(shape, step)

    def decay_factor(self, shape: int, step: int) -> float:
        """The shape alone: 1 until the run warmup ends, then down to its floor; 1 for constant."""
        since = step - self.warmup_steps
        if since <= 0.0:
            return 1.0
        if shape == LrShape.step:
            return float(self.step_gamma ** math.floor(since / self.step_period_steps))
        if shape not in (LrShape.cosine, LrShape.linear):
            return 1.0
        progress = 1.0 if since >= self.decay_steps else since / self.decay_steps
        floor = self.min_lr_ratio
        if shape == LrShape.cosine:
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)


@dataclass
class GroupLambda:
    """`LambdaLR` multiplier of one param group: base LR x this = the group's LR.

    A seed group ramps from 0.01 to 1 over its own warmup, then follows the
    run shape's decay at the current step (the run warmup is not applied
    twice). Its own state is plain numbers (policy, scale, join step); the curve is
    shared and rebuilt from the spec, so nothing here needs pickling.
    """

    policy: int
    scale: float
    join_step: int
    curve: ScheduleCurve

    def __call__(self, step: int) -> float:
        if self.policy == _FROZEN:
            return 0.0
        if self.policy == _SEED:
            since = max(step - self.join_step, 0)
            warmup = self.curve.seed_warmup_steps
            if since < warmup:
                start = SEED_WARMUP_START_RATIO
                return self.scale * (start + (1.0 - start) * since / warmup)
            # After its own warmup a seed follows the host shape; a frozen host counts as
            # constant here, since freezing the host is how a seed is trained alone.
            return self.scale * self.curve.decay_factor(self.curve.run_shape, step)
        return self.scale * self.curve.host_factor(self.policy, step)


@dataclass
class _Group:
    """What the controller knows about one param group."""

    group_id: str
    base_lr: float
    schedule: GroupLambda
    last_lr: float
    """The value the controller last wrote; the integrity guard compares against it."""
    reported_lr: float
    """The LR at the last recorded change or epoch end; `epoch_end` reports moves from it."""


@dataclass
class _Registered:
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    groups: list[_Group]


def _read_lr(group: Mapping[str, Any]) -> float:
    lr = group["lr"]
    return lr if type(lr) is float else float(lr)


def _write_lr(group: dict[str, Any], value: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class LRController:
    """Registers optimizers by name and their param groups by `group_id`, and owns their LRs.

    LR of a group = base LR x scale x shape factor at the schedule position
    (optimizer steps since the controller started). Host groups use the run
    shape (or their override) after an optional warmup; `seed:` groups start at
    0.01 x (0.1 x host base) and warm up linearly over 10 epochs from the step
    they joined (R3.3); frozen groups stay at 0. Only `scale` changes the scale,
    and only of host groups.

    Checkpoint behavior:
        `state_dict` returns a JSON-serialisable dict: the schedule position,
        per-group base LR, scale, policy, join step, last written LR and last
        reported LR (keyed by optimizer name and group id), the change history
        and the breach count. The run's curve (warmup, total steps, floor) is
        not saved; it comes from the `ScheduleSpec` of the controller that
        loads, so a resumed run with more epochs continues on its longer curve.
        `load_state_dict` needs the same optimizer names and group ids to be
        registered already (else `StateMismatch`), rebuilds each `LambdaLR` at
        the saved position and writes the saved LRs into the optimizers, so
        the next `step` continues exactly where the saved run would have. Each
        group whose LR moved records an `LR_CHANGE_SOURCE_RESTORE` change.
        Call it after loading the optimizers' own state dicts, whose `lr`
        values it overwrites.
    """

    def __init__(
        self,
        schedule: ScheduleSpec,
        budgets: BudgetsSpec,
        guards: Guards,
        clock: Clock,
        *,
        steps_per_epoch: int,
        total_epochs: int,
    ) -> None:
        if steps_per_epoch < 1 or total_epochs < 1:
            raise ValueError(
                f"steps_per_epoch and total_epochs must be >= 1, "
                f"got {steps_per_epoch} and {total_epochs}"
            )
        self._spec = schedule
        self._guards = guards
        self._clock = clock
        self._curve = ScheduleCurve.from_spec(schedule, steps_per_epoch, total_epochs)
        # Budgets are judged on the p95 of a window of steps (R12), not on one
        # step: a single scheduling stall on a loaded host is not a breach.
        self.step_latency = LatencyStats(budgets.lr_step_ms, budgets.latency_window)
        self.guard_latency = LatencyStats(budgets.lr_guard_ms, budgets.latency_window)
        self._window = budgets.latency_window
        self._unjudged = 0
        self._registered: dict[str, _Registered] = {}
        self._position = 0
        self._epoch = 0
        self._step = 0
        self._history: deque[LrChange] = deque(maxlen=HISTORY_LIMIT)
        self._breaches = 0

    @property
    def changes(self) -> list[LrChange]:
        """Recorded LR changes, oldest first, at most `HISTORY_LIMIT` (R3.3)."""
        return list(self._history)

    @property
    def integrity_breaches(self) -> int:
        """Steps on which the integrity guard found an LR it had not written (R3.2)."""
        return self._breaches

    @property
    def position(self) -> int:
        """Schedule position: `step` calls so far (restored by `load_state_dict`)."""
        return self._position

    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Takes ownership of `optimizer`'s LRs and writes its groups' scheduled LRs now.

        Each param group needs a unique string `group_id`; its current `lr`
        (x the override's `lr_scale`) is its base LR. Raises `ValueError`
        naming the optimizer and group for a duplicate name, a missing or
        duplicate group id, a bad LR, or a seed group with no host group.
        """
        if name in self._registered:
            raise ValueError(
                f"optimizer {name!r} is already registered; call rebind_optimizer after a rebuild"
            )
        self._check_groups(name, optimizer)
        groups = self._new_groups(name, optimizer, kept={})
        self._registered[name] = self._attach(optimizer, groups)
        logger.debug("LR controller registered optimizer %s with %d groups", name, len(groups))

    def rebind_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Moves `name` onto a rebuilt optimizer (R4.2) and writes the controller's LRs into it.

        Groups matched by `group_id` keep base LR, scale, join step and last
        written LR; new ids join at the current position and record an
        `LR_CHANGE_SOURCE_GROUP_JOINED` change (labelled with the epoch and
        step of the last `step`/`scale`/`epoch_end` call); missing ids are dropped.
        Raises `ValueError` for an unknown name or bad groups, leaving the
        previous binding intact.
        """
        old = self._registered.get(name)
        if old is None:
            raise ValueError(f"optimizer {name!r} is not registered; call register_optimizer")
        self._check_groups(name, optimizer)
        kept = {g.group_id: g for g in old.groups}
        groups = self._new_groups(name, optimizer, kept=kept)
        self._registered[name] = self._attach(optimizer, groups)
        for group in groups:
            if group.group_id not in kept:
                self._record(
                    group, 0.0, group.last_lr, LrChangeSource.LR_CHANGE_SOURCE_GROUP_JOINED
                )
        dropped = sorted(kept.keys() - {g.group_id for g in groups})
        logger.info(
            "LR controller rebound optimizer %s: %d groups, dropped %s",
            name,
            len(groups),
            dropped,
        )

    def step(self, epoch: int, global_step: int) -> None:
        """Guards, then advances every schedule by one step; call right after `optimizer.step()`.

        Budget `lrStepMs` in all, `lrGuardMs` for the guard (R3.2), judged on
        the p95 of every `latencyWindow` steps; an overrun is a
        `BREAKER_LR_STEP` failure. Never raises for a foreign LR write:
        that is a `BREAKER_LR_INTEGRITY` failure, and the controller's value
        is written back. Allocates nothing on a clean step beyond LambdaLR's work.
        """
        start_ns = self._clock.now_ns()
        if self._guards.allow(_INTEGRITY) and self._verify(epoch, global_step):
            self._guards.success(_INTEGRITY)
        guard_end_ns = self._clock.now_ns()
        self._position += 1
        for registered in self._registered.values():
            self._advance(registered)
        end_ns = self._clock.now_ns()
        self._epoch = epoch
        self._step = global_step
        self.guard_latency.add(guard_end_ns - start_ns)
        self.step_latency.add(end_ns - start_ns)
        self._unjudged += 1
        if self._unjudged >= self._window:
            self._judge_window()

    def scale(self, factor: float, *, min_scale: float, epoch: int, step: int) -> list[LrChange]:
        """Multiplies the scale of every host group by `factor` (Tamiyo's LR cut) and writes it now.

        A cut stops at `min_scale` and never raises a scale already below it.
        Seed and frozen groups are left alone. Returns the changes made, also
        recorded with source `LR_CHANGE_SOURCE_COMMAND`. Raises `ValueError`
        for a factor that is not finite and > 0 or a min_scale < 0.
        """
        if not (math.isfinite(factor) and factor > 0.0):
            raise ValueError(f"LR scale factor must be finite and > 0, got {factor!r}")
        if not (math.isfinite(min_scale) and min_scale >= 0.0):
            raise ValueError(f"LR min_scale must be finite and >= 0, got {min_scale!r}")
        self._epoch = epoch
        self._step = step
        changes: list[LrChange] = []
        for param_group, group in self._aligned_groups():
            schedule = group.schedule
            if schedule.policy in (_FROZEN, _SEED):
                continue
            schedule.scale = max(schedule.scale * factor, min(schedule.scale, min_scale))
            old_lr = group.last_lr
            group.last_lr = group.base_lr * schedule(self._position)
            _write_lr(param_group, group.last_lr)
            if lr_changed(old_lr, group.last_lr):
                changes.append(
                    self._record(
                        group, old_lr, group.last_lr, LrChangeSource.LR_CHANGE_SOURCE_COMMAND
                    )
                )
        return changes

    def current_lrs(self) -> dict[str, float]:
        """Group id -> the LR the controller last wrote (what the optimizer uses)."""
        return {g.group_id: g.last_lr for r in self._registered.values() for g in r.groups}

    def epoch_end(self, epoch: int, step: int) -> list[LrChange]:
        """Records a `LR_CHANGE_SOURCE_SCHEDULE` change per group whose LR moved since the last.

        Per-step moves are summarised here rather than recorded, so the
        history stays small (R3.3).
        """
        self._epoch = epoch
        self._step = step
        changes: list[LrChange] = []
        for registered in self._registered.values():
            for group in registered.groups:
                if lr_changed(group.reported_lr, group.last_lr):
                    changes.append(
                        self._record(
                            group,
                            group.reported_lr,
                            group.last_lr,
                            LrChangeSource.LR_CHANGE_SOURCE_SCHEDULE,
                        )
                    )
        return changes

    def state_dict(self) -> JsonDict:
        """Everything needed to continue exactly, JSON-serialisable (see the class docstring)."""
        return {
            "format": STATE_FORMAT,
            "position": self._position,
            "epoch": self._epoch,
            "step": self._step,
            "integrity_breaches": self._breaches,
            "optimizers": {
                name: [
                    {
                        "group_id": g.group_id,
                        "policy": LrShape.Name(g.schedule.policy),  # type: ignore[arg-type]
                        "base_lr": g.base_lr,
                        "scale": g.schedule.scale,
                        "join_step": g.schedule.join_step,
                        "last_lr": g.last_lr,
                        "reported_lr": g.reported_lr,
                    }
                    for g in registered.groups
                ]
                for name, registered in self._registered.items()
            },
            "history": [
                {
                    "epoch": c.epoch,
                    "step": c.step,
                    "group_id": c.group_id,
                    "old_lr": c.old_lr,
                    "new_lr": c.new_lr,
                    "source": LrChangeSource.Name(c.source),
                }
                for c in self._history
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict` output onto the registered optimizers (see class docstring).

        Raises `StateMismatch` naming the optimizers or group ids that differ,
        or the field that is malformed; nothing changes when it raises.
        """
        try:
            staged = _parse_state(state)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise StateMismatch(f"LR controller state is malformed: {err!r}") from err
        position, epoch, step, breaches, saved_optimizers, history = staged
        self._check_names(saved_optimizers)
        before = self.current_lrs()
        for name, registered in self._registered.items():
            saved = saved_optimizers[name]
            for group in registered.groups:
                fields = saved[group.group_id]
                group.base_lr = fields.base_lr
                group.schedule.policy = fields.policy
                group.schedule.scale = fields.scale
                group.schedule.join_step = fields.join_step
                group.last_lr = fields.last_lr
                group.reported_lr = fields.reported_lr
        self._position = position
        self._epoch = epoch
        self._step = step
        self._breaches = breaches
        self._history.clear()
        self._history.extend(history)
        for name, registered in self._registered.items():
            self._registered[name] = self._attach(registered.optimizer, registered.groups)
            for group in registered.groups:
                if lr_changed(before[group.group_id], group.last_lr):
                    self._record(
                        group,
                        before[group.group_id],
                        group.last_lr,
                        LrChangeSource.LR_CHANGE_SOURCE_RESTORE,
                        update_reported=False,
                    )

    def _check_groups(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        taken = {
            g.group_id: other
            for other, registered in self._registered.items()
            if other != name
            for g in registered.groups
        }
        seen: set[str] = set()
        for index, param_group in enumerate(optimizer.param_groups):
            group_id = param_group.get("group_id")
            where = f"optimizer {name!r} param group {index}"
            if not isinstance(group_id, str) or not group_id:
                raise ValueError(f"{where}: needs a non-empty string 'group_id', got {group_id!r}")
            if group_id in seen:
                raise ValueError(f"{where}: duplicate group_id {group_id!r}")
            if group_id in taken:
                raise ValueError(
                    f"{where}: group_id {group_id!r} already belongs to "
                    f"optimizer {taken[group_id]!r}"
                )
            seen.add(group_id)
            lr = _read_lr(param_group)
            if not (math.isfinite(lr) and lr >= 0.0):
                raise ValueError(f"{where} ({group_id!r}): lr must be finite and >= 0, got {lr!r}")

    def _policy(self, group_id: str) -> int:
        override = self._spec.groups.get(group_id)
        if override is not None and override.shape is not None:
            return override.shape
        if group_id.startswith(SEED_GROUP_PREFIX):
            return _SEED
        return self._spec.shape

    def _new_groups(
        self, name: str, optimizer: torch.optim.Optimizer, kept: Mapping[str, _Group]
    ) -> list[_Group]:
        """Records for `optimizer`'s groups in order: kept ones as they are, new ones join now."""
        host_base: float | None = None
        for param_group in optimizer.param_groups:
            group_id = param_group["group_id"]
            if group_id in kept and kept[group_id].schedule.policy != _SEED:
                host_base = kept[group_id].base_lr
                break
            if group_id not in kept and self._policy(group_id) != _SEED:
                host_base = self._own_base(group_id, param_group)
                break
        groups: list[_Group] = []
        for param_group in optimizer.param_groups:
            group_id = param_group["group_id"]
            if group_id in kept:
                groups.append(kept[group_id])
                continue
            policy = self._policy(group_id)
            if policy != _SEED:
                base_lr = self._own_base(group_id, param_group)
            elif host_base is None:
                raise ValueError(
                    f"optimizer {name!r}: seed group {group_id!r} takes 0.1 x the base LR of a "
                    "non-seed group in the same optimizer, and there is none (R3.3)"
                )
            else:
                base_lr = SEED_LR_RATIO * host_base * self._lr_scale(group_id)
            schedule = GroupLambda(policy, 1.0, self._position, self._curve)
            lr = base_lr * schedule(self._position)
            groups.append(_Group(group_id, base_lr, schedule, lr, lr))
        return groups

    def _lr_scale(self, group_id: str) -> float:
        override = self._spec.groups.get(group_id)
        return 1.0 if override is None else override.lr_scale

    def _own_base(self, group_id: str, param_group: Mapping[str, Any]) -> float:
        return _read_lr(param_group) * self._lr_scale(group_id)

    def _attach(self, optimizer: torch.optim.Optimizer, groups: list[_Group]) -> _Registered:
        """Builds the optimizer's LambdaLR at the current position and writes the LRs into it."""
        for param_group, group in zip(optimizer.param_groups, groups, strict=True):
            param_group["initial_lr"] = group.base_lr
        # LambdaLR's constructor takes one step, so it starts one before the position.
        scheduler = LambdaLR(optimizer, [g.schedule for g in groups], last_epoch=self._position - 1)
        for param_group, group in zip(optimizer.param_groups, groups, strict=True):
            _write_lr(param_group, group.last_lr)
        return _Registered(optimizer, scheduler, groups)

    def _verify(self, epoch: int, global_step: int) -> bool:
        """The R3.2 integrity guard; returns True when every LR is the one the controller wrote."""
        problems: list[str] | None = None
        for name, registered in self._registered.items():
            param_groups = registered.optimizer.param_groups
            if len(param_groups) != len(registered.groups):
                problems = problems or []
                problems.append(
                    f"optimizer {name!r}: {len(param_groups)} param groups, "
                    f"{len(registered.groups)} registered (call rebind_optimizer)"
                )
                continue
            for param_group, group in zip(param_groups, registered.groups, strict=True):
                found = _read_lr(param_group)
                if found == group.last_lr or not lr_changed(found, group.last_lr):
                    continue
                problems = problems or []
                problems.append(
                    f"optimizer {name!r}: {LRIntegrityError(group.group_id, group.last_lr, found)}"
                )
                _write_lr(param_group, group.last_lr)
                change = LrChange(
                    epoch=epoch,
                    step=global_step,
                    group_id=group.group_id,
                    old_lr=found,
                    new_lr=group.last_lr,
                    source=LrChangeSource.LR_CHANGE_SOURCE_INTEGRITY_RESTORE,
                )
                self._history.append(change)
        if problems is None:
            return True
        self._breaches += 1
        self._guards.failure(_INTEGRITY, "; ".join(problems))
        return False

    def _advance(self, registered: _Registered) -> None:
        param_groups = registered.optimizer.param_groups
        if len(param_groups) != len(registered.groups):
            # Stepping would raise inside LambdaLR; the guard reports it until a rebind.
            registered.scheduler.last_epoch = self._position
            return
        registered.scheduler.step()
        for param_group, group in zip(param_groups, registered.groups, strict=True):
            group.last_lr = _read_lr(param_group)

    def _aligned_groups(self) -> Iterator[tuple[dict[str, Any], _Group]]:
        for name, registered in self._registered.items():
            param_groups = registered.optimizer.param_groups
            if len(param_groups) != len(registered.groups):
                logger.warning("optimizer %s changed its param groups without a rebind", name)
                continue
            yield from zip(param_groups, registered.groups, strict=True)

    def _check_names(self, saved: Mapping[str, Mapping[str, _SavedGroup]]) -> None:
        if saved.keys() != self._registered.keys():
            raise StateMismatch(
                f"LR controller state has optimizers {sorted(saved)}, "
                f"registered are {sorted(self._registered)}"
            )
        for name, registered in self._registered.items():
            live = {g.group_id for g in registered.groups}
            if saved[name].keys() != live:
                raise StateMismatch(
                    f"optimizer {name!r}: saved group ids {sorted(saved[name])} != "
                    f"registered {sorted(live)} (missing {sorted(live - saved[name].keys())}, "
                    f"unexpected {sorted(saved[name].keys() - live)})"
                )

    def _record(
        self,
        group: _Group,
        old_lr: float,
        new_lr: float,
        source: LrChangeSource.ValueType,
        *,
        update_reported: bool = True,
    ) -> LrChange:
        change = LrChange(
            epoch=self._epoch,
            step=self._step,
            group_id=group.group_id,
            old_lr=old_lr,
            new_lr=new_lr,
            source=source,
        )
        self._history.append(change)
        if update_reported:
            group.reported_lr = new_lr
        return change

    def _judge_window(self) -> None:
        """One breaker outcome per window: p95 of step and guard times against their budgets."""
        self._unjudged = 0
        reasons = []
        for what, stats in (("LR step", self.step_latency), ("LR guard", self.guard_latency)):
            p95 = stats.window_percentile_ms(95)
            if stats.budget_ms is not None and p95 > stats.budget_ms:
                reasons.append(str(BudgetBreached(f"{what} p95", p95, stats.budget_ms)))
        if reasons:
            self._guards.failure(_STEP, "; ".join(reasons))
        else:
            self._guards.success(_STEP)


@dataclass(frozen=True)
class _SavedGroup:
    policy: int
    base_lr: float
    scale: float
    join_step: int
    last_lr: float
    reported_lr: float


def _number(value: Any, field: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field}: expected a number, got {value!r}")
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{field}: expected a finite number >= {minimum}, got {value!r}")
    return float(value)


def _any_float(value: Any, field: str) -> float:
    # History may hold the foreign value an integrity restore replaced, even NaN or < 0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field}: expected a number, got {value!r}")
    return float(value)


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field}: expected an integer >= 0, got {value!r}")
    return value


def _parse_state(
    state: Mapping[str, Any],
) -> tuple[int, int, int, int, dict[str, dict[str, _SavedGroup]], list[LrChange]]:
    """Validates a saved state completely before anything is applied."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"format: expected {STATE_FORMAT}, got {state.get('format')!r}")
    position = _count(state["position"], "position")
    optimizers: dict[str, dict[str, _SavedGroup]] = {}
    for name, saved_groups in state["optimizers"].items():
        groups: dict[str, _SavedGroup] = {}
        for saved in saved_groups:
            group_id = saved["group_id"]
            where = f"optimizers.{name}.{group_id}"
            if not isinstance(group_id, str) or group_id in groups:
                raise ValueError(f"{where}: group_id must be a string and unique")
            policy = LrShape.Value(saved["policy"])
            if policy == LrShape.LR_SHAPE_UNSPECIFIED:
                raise ValueError(f"{where}.policy: must name a shape")
            join_step = _count(saved["join_step"], f"{where}.join_step")
            if join_step > position:
                raise ValueError(f"{where}.join_step: {join_step} is after position {position}")
            groups[group_id] = _SavedGroup(
                policy=policy,
                base_lr=_number(saved["base_lr"], f"{where}.base_lr"),
                scale=_number(saved["scale"], f"{where}.scale"),
                join_step=join_step,
                last_lr=_number(saved["last_lr"], f"{where}.last_lr"),
                reported_lr=_number(saved["reported_lr"], f"{where}.reported_lr"),
            )
        optimizers[name] = groups
    history = [
        LrChange(
            epoch=_count(c["epoch"], "history.epoch"),
            step=_count(c["step"], "history.step"),
            group_id=str(c["group_id"]),
            old_lr=_any_float(c["old_lr"], "history.old_lr"),
            new_lr=_any_float(c["new_lr"], "history.new_lr"),
            source=LrChangeSource.Value(c["source"]),
        )
        for c in state["history"][-HISTORY_LIMIT:]
    ]
    return (
        position,
        _count(state["epoch"], "epoch"),
        _count(state["step"], "step"),
        _count(state["integrity_breaches"], "integrity_breaches"),
        optimizers,
        history,
    )
