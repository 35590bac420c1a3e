"""The dynamic optimizer manager: builds the host optimizer, rebuilds it as parameters change (R4).

The training runtime calls `build` once at start-up and `rebuild` off the hot path (between steps
or at an epoch end) whenever Kasmina adds, removes or reshapes parameters. A rebuild is two-phase
(R4.2): the new optimizer is built and its state derived beside the old one, validated, handed to
the LR controller (`LRRebinder`), and only then swapped in. The untouched old optimizer is the
snapshot, so a failure anywhere keeps training exactly where it was.

What it must never do:
- mutate the old optimizer or its state before the swap (a failed rebuild restores nothing
  because nothing was changed);
- map state through `id()` or `state_dict()` indices (digest §6.2 #8): parameters are matched by
  stable name and state is read through `optimizer.state[param]`;
- silently reset the moments of a reshaped parameter (digest §6.3 #6);
- leave the LR controller pointing at a stale optimizer (digest §6.3 #6);
- change a learning rate: groups keep the hyperparameters they had, LRs included (R3.1);
- raise out of `rebuild`: outcomes are recorded and failures go to the breaker (R1.4).

Runs on the training thread only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import torch

from leyline import (
    BreakerId,
    MessagePriority,
    OptimizerKind,
    OptimizerRebuild,
    RebuildKind,
    RebuildOutcome,
    TelemetryLevel,
)
from leyline.spec import OptimizerSpec, RebuildSpec
from tolaria_trainer.clock import ns_to_ms
from tolaria_trainer.errors import BudgetBreached, OptimizerInvalid, RebuildFailed
from tolaria_trainer.guards import Guards
from tolaria_trainer.protocols import Clock, EventSink

logger = logging.getLogger(__name__)

EVENT_OPTIMIZER_REBUILD = "tolaria.optimizer_rebuild"

LR_OPTIMIZER_NAME = "host"
"""Name under which the host optimizer is registered with the LR controller."""

GROUP_ID_KEY = "group_id"
"""Key every `param_group` dict carries, so groups are matched by id and never by position."""

MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg"})
"""First/second-moment state: new slices start at the per-dim mean of the old state (R4.1)."""

MOMENTUM_KEYS = frozenset({"momentum_buffer"})
"""Plain momentum (SGD, RMSprop): new slices start at `momentumFillScale` x the mean (R4.1).

A smaller start than the moments because a momentum buffer is a velocity: the mean direction of
the old rows is a guess for the new ones, and a full-size guess would push them hard at once.
"""

_PER_ELEMENT_KEYS = MOMENT_KEYS | MOMENTUM_KEYS

_PARAMETER_LISTS = frozenset({"params", "param_names"})
"""Group keys that list parameters: rebuilt from the new groups, never carried over."""

_BREAKER = BreakerId.BREAKER_OPTIMIZER_REBUILD


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer param group with a stable id; parameter names are stable across rebuilds."""

    group_id: str
    params: tuple[tuple[str, torch.nn.Parameter], ...]
    """(stable name, parameter): the name, not the object, identifies it across rebuilds."""


class LRRebinder(Protocol):
    """The LR controller's side of a rebuild: it must drive the optimizer that is live (R4.2)."""

    def rebind_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Points the controller's schedules for `name` at `optimizer`; must not step or set LRs
        of groups it already knows (their LRs were carried over), and must not keep the old one."""
        ...


def optimizer_class(kind: int) -> type[torch.optim.Optimizer]:
    """The torch class for an `OptimizerKind` value; `OptimizerInvalid` for an unknown one."""
    classes: dict[int, type[torch.optim.Optimizer]] = {
        OptimizerKind.sgd: torch.optim.SGD,
        OptimizerKind.adam: torch.optim.Adam,
        OptimizerKind.adamw: torch.optim.AdamW,
        OptimizerKind.rmsprop: torch.optim.RMSprop,
    }
    if kind not in classes:
        raise OptimizerInvalid(f"spec.training.optimizer.kind: no optimizer for value {kind}")
    return classes[kind]


def optimizer_defaults(spec: OptimizerSpec) -> dict[str, Any]:
    """Constructor hyperparameters from the spec; groups that already exist override them."""
    if spec.kind == OptimizerKind.sgd:
        return {"lr": spec.lr, "momentum": spec.momentum, "weight_decay": spec.weight_decay}
    if spec.kind in (OptimizerKind.adam, OptimizerKind.adamw):
        return {
            "lr": spec.lr,
            "betas": (spec.beta1, spec.beta2),
            "eps": spec.eps,
            "weight_decay": spec.weight_decay,
        }
    if spec.kind == OptimizerKind.rmsprop:
        return {
            "lr": spec.lr,
            "alpha": spec.beta2,
            "eps": spec.eps,
            "weight_decay": spec.weight_decay,
            "momentum": spec.momentum,
        }
    raise OptimizerInvalid(f"spec.training.optimizer.kind: no optimizer for value {spec.kind}")


def resize_state_tensor(
    old: torch.Tensor, shape: Sequence[int], *, fill_scale: float
) -> torch.Tensor:
    """A new tensor of `shape` derived from per-element optimizer state `old` (R4.1).

    Contracted dims are sliced, so the overlapping leading region is copied exactly. Each expanded
    dim, taken in order, is filled with the mean of the tensor along that dim (the earlier
    expansions included, so a corner grown in two dims gets the mean of both); the filled slices
    are then multiplied by `fill_scale`. `old` is never modified. Raises `OptimizerInvalid` when
    the rank differs: there is no principled mapping, and a silent reset is what R4.1 forbids.
    """
    if old.dim() != len(shape):
        raise OptimizerInvalid(
            f"state of shape {tuple(old.shape)} cannot be mapped to rank-{len(shape)} "
            f"shape {tuple(shape)}; rename the parameter to start it fresh"
        )
    overlap = tuple(slice(0, min(o, n)) for o, n in zip(old.shape, shape, strict=True))
    out = old[overlap].clone()
    is_new = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    for dim, size in enumerate(shape):
        grow = size - out.shape[dim]
        if grow <= 0:
            continue
        fill_shape = (*out.shape[:dim], grow, *out.shape[dim + 1 :])
        if out.shape[dim] == 0:
            fill = out.new_zeros(fill_shape)  # nothing to average: the mean of nothing is NaN
        else:
            fill = out.mean(dim=dim, keepdim=True).expand(fill_shape)
        out = torch.cat([out, fill], dim=dim)
        is_new = torch.cat([is_new, is_new.new_ones(fill_shape)], dim=dim)
    if fill_scale != 1.0:
        out = torch.where(is_new, out * fill_scale, out)
    return out


@dataclass(frozen=True)
class _Move:
    """How one named parameter goes from the old optimizer to the new one."""

    name: str
    old: torch.Tensor | None
    new: torch.nn.Parameter
    kinds: frozenset[RebuildKind.ValueType]


class OptimizerManager:
    """Owns the host optimizer: builds it, rebuilds it two-phase, and records every rebuild (R4).

    Checkpoint behavior: snapshots save the optimizer's own `state_dict()`; the manager saves
    nothing. Its storm-guard step and rebuild records live in memory for the run report (a
    restore that rewinds past the last rebuild lifts the storm guard). After a restore, call
    `build` with the restored groups, then load the optimizer state into the optimizer it
    returns, so the name index matches the live parameters.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        rebuild: RebuildSpec,
        guards: Guards,
        clock: Clock,
        events: EventSink,
    ) -> None:
        self._spec = spec
        self._rebuild_spec = rebuild
        self._guards = guards
        self._clock = clock
        self._events = events
        self._optimizer: torch.optim.Optimizer | None = None
        self._index: dict[str, torch.nn.Parameter] = {}
        self._rebuilds: list[OptimizerRebuild] = []
        self._last_rebuild_step: int | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The live optimizer; raises `OptimizerInvalid` before `build`."""
        if self._optimizer is None:
            raise OptimizerInvalid("optimizer manager: build() must be called first")
        return self._optimizer

    @property
    def parameters(self) -> Mapping[str, torch.nn.Parameter]:
        """Stable name -> parameter of the live optimizer (read-only)."""
        return MappingProxyType(self._index)

    @property
    def rebuilds(self) -> list[OptimizerRebuild]:
        """Every rebuild attempt in order, skipped and failed ones included (the run report's)."""
        return list(self._rebuilds)

    def build(self, groups: Sequence[ParamGroup]) -> torch.optim.Optimizer:
        """Builds a fresh optimizer (no state) of the spec's kind over `groups` and makes it live.

        Every `param_group` dict gets `group_id`. Raises `OptimizerInvalid` for clashing group
        ids or parameter names, or a parameter listed twice. Does not register it with the LR
        controller: the caller does that once, as for any optimizer.
        """
        optimizer, index = self._construct(groups, carried={})
        self._optimizer = optimizer
        self._index = index
        return optimizer

    def rebuild(
        self,
        groups: Sequence[ParamGroup],
        *,
        lr: LRRebinder,
        epoch: int,
        step: int,
        reason: str,
    ) -> OptimizerRebuild:
        """Rebuilds the optimizer over `groups`, carrying state by parameter name (R4.1, R4.2).

        Call off the hot path, after an optimizer step and before the next forward. Skipped (no
        change at all) when fewer than `minStepsBetween` steps passed since the last successful
        rebuild, or while the breaker is open. On success the new optimizer is live and `lr` was
        rebound to it; on failure the old one stays live, `lr` is rebound back to it if it had
        been rebound, and the breaker records a failure. A rebuild slower than `budgetMs` stands
        but counts as a breaker failure. Never raises; returns the record it also keeps.
        """
        record = OptimizerRebuild(epoch=epoch, step=step, reason=reason)
        skipped = self._skip_outcome(step)
        if skipped is not None:
            record.outcome = skipped
            return self._finish(record)

        started_ns = self._clock.now_ns()
        old = self._optimizer
        rebound = False
        try:
            old = self.optimizer
            moves, removed = self._plan(groups)
            self._count(record, moves, removed)
            new, index = self._construct(groups, carried=_carried_hyperparameters(old))
            self._carry_state(old, new, moves)
            self._validate(old, new, moves)
            # Flagged before the call: a rebinder that raises half-way may already hold `new`.
            rebound = True
            lr.rebind_optimizer(LR_OPTIMIZER_NAME, new)
        except Exception as err:  # two-phase boundary: any failure keeps the old optimizer (R4.2)
            record.error = f"{type(err).__name__}: {err}"
            if rebound and old is not None:
                record.error += self._rebind_back(lr, old)
            record.outcome = RebuildOutcome.REBUILD_OUTCOME_FAILED_RESTORED
            record.elapsed_ms = ns_to_ms(self._clock.now_ns() - started_ns)
            self._guards.failure(_BREAKER, f"rebuild failed, old optimizer kept: {record.error}")
            return self._finish(record)

        self._optimizer = new
        self._index = index
        self._last_rebuild_step = step
        record.outcome = RebuildOutcome.REBUILD_OUTCOME_SUCCEEDED
        record.elapsed_ms = ns_to_ms(self._clock.now_ns() - started_ns)
        if record.elapsed_ms > self._rebuild_spec.budget_ms:
            breach = BudgetBreached(
                "optimizer rebuild", record.elapsed_ms, self._rebuild_spec.budget_ms
            )
            record.error = f"{type(breach).__name__}: {breach}"
            self._guards.failure(_BREAKER, str(breach))
        else:
            self._guards.success(_BREAKER)
        return self._finish(record)

    def _skip_outcome(self, step: int) -> RebuildOutcome.ValueType | None:
        # Storm guard first: asking the breaker in HALF_OPEN spends its trial.
        last = self._last_rebuild_step
        # A step before the last rebuild means a rollback rewound past it: nothing to guard.
        if last is not None and 0 <= step - last < self._rebuild_spec.min_steps_between:
            return RebuildOutcome.REBUILD_OUTCOME_SKIPPED_STORM_GUARD
        if not self._guards.allow(_BREAKER):
            return RebuildOutcome.REBUILD_OUTCOME_SKIPPED_BREAKER_OPEN
        return None

    def _plan(self, groups: Sequence[ParamGroup]) -> tuple[list[_Move], int]:
        """Matches new parameters to old ones by name; returns the moves and the removed count."""
        moves: list[_Move] = []
        seen: set[str] = set()
        for group in groups:
            for name, param in group.params:
                seen.add(name)
                old = self._index.get(name)
                if old is None:
                    kinds = frozenset({RebuildKind.REBUILD_KIND_ADD})
                else:
                    kinds = _shape_change(name, tuple(old.shape), tuple(param.shape))
                moves.append(_Move(name, old, param, kinds))
        removed = sum(1 for name in self._index if name not in seen)
        return moves, removed

    @staticmethod
    def _count(record: OptimizerRebuild, moves: Sequence[_Move], removed: int) -> None:
        counts = Counter(kind for move in moves for kind in move.kinds)
        record.parameters_identical = counts[RebuildKind.REBUILD_KIND_IDENTITY]
        record.parameters_expanded = counts[RebuildKind.REBUILD_KIND_EXPAND]
        record.parameters_contracted = counts[RebuildKind.REBUILD_KIND_CONTRACT]
        record.parameters_added = counts[RebuildKind.REBUILD_KIND_ADD]
        record.parameters_removed = removed

    def _construct(
        self, groups: Sequence[ParamGroup], *, carried: Mapping[str, dict[str, Any]]
    ) -> tuple[torch.optim.Optimizer, dict[str, torch.nn.Parameter]]:
        """A stateless optimizer over `groups`; groups in `carried` keep those hyperparameters."""
        index = _index_groups(groups)
        cls = optimizer_class(self._spec.kind)
        dicts: list[dict[str, Any]] = []
        for group in groups:
            entry: dict[str, Any] = dict(carried.get(group.group_id, {}))
            entry["params"] = [param for _, param in group.params]
            entry[GROUP_ID_KEY] = group.group_id
            dicts.append(entry)
        return cls(dicts, **optimizer_defaults(self._spec)), index

    def _carry_state(
        self, old: torch.optim.Optimizer, new: torch.optim.Optimizer, moves: Sequence[_Move]
    ) -> None:
        """Derives each matched parameter's state in `new` from `old`, which it only reads."""
        for move in moves:
            if move.old is None:
                continue
            # `.get`, not `[...]`: `state` is a defaultdict, and a lookup would insert into `old`.
            old_state = old.state.get(move.old)
            if not old_state:
                continue
            new.state[move.new] = {
                key: self._map_entry(move, move.old, key, value) for key, value in old_state.items()
            }

    def _map_entry(self, move: _Move, old_param: torch.Tensor, key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if not _is_per_element(key, value):  # scalars such as Adam's `step` are kept as they are
            return value.clone()
        if value.shape != old_param.shape:
            raise OptimizerInvalid(
                f"parameter {move.name!r}: state {key!r} has shape {tuple(value.shape)}, neither "
                f"the parameter's {tuple(old_param.shape)} nor a scalar"
            )
        if value.shape == move.new.shape:
            mapped = value.clone()
        else:
            mapped = resize_state_tensor(value, move.new.shape, fill_scale=self._fill_scale(key))
        return _to_param(mapped, move.new)

    def _fill_scale(self, key: str) -> float:
        if key in MOMENT_KEYS:
            return 1.0
        if key in MOMENTUM_KEYS:
            return self._rebuild_spec.momentum_fill_scale
        raise OptimizerInvalid(f"state {key!r} has no fill rule for expanded parameters")

    @staticmethod
    def _validate(
        old: torch.optim.Optimizer, new: torch.optim.Optimizer, moves: Sequence[_Move]
    ) -> None:
        """Phase 3: raises `RebuildFailed` unless `new`'s state is usable and identity-exact."""
        for move in moves:
            state = new.state.get(move.new, {})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if _is_per_element(key, value):
                    _check_fits(move, key, value)
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise RebuildFailed(f"parameter {move.name!r}: state {key!r} is not finite")
            if move.old is None or RebuildKind.REBUILD_KIND_IDENTITY not in move.kinds:
                continue
            old_state = old.state.get(move.old, {})
            if set(old_state) != set(state):
                raise RebuildFailed(
                    f"parameter {move.name!r}: state keys {sorted(state)} "
                    f"!= old {sorted(old_state)}"
                )
            for key, old_value in old_state.items():
                if not isinstance(old_value, torch.Tensor):
                    continue
                expected = old_value
                if _is_per_element(key, old_value):
                    expected = _to_param(old_value, move.new)
                if not bitwise_equal(state[key], expected):
                    raise RebuildFailed(
                        f"parameter {move.name!r}: state {key!r} differs from the old state"
                    )

    @staticmethod
    def _rebind_back(lr: LRRebinder, old: torch.optim.Optimizer) -> str:
        """Points the LR controller at the old optimizer again; returns text for the error field."""
        try:
            lr.rebind_optimizer(LR_OPTIMIZER_NAME, old)
        except Exception as err:  # already failing: report both rather than mask the first
            logger.exception("rebinding the LR controller to the old optimizer failed")
            return f"; rebinding the old optimizer also failed: {type(err).__name__}: {err}"
        return ""

    def _finish(self, record: OptimizerRebuild) -> OptimizerRebuild:
        """Keeps the record and reports it as one event (R4.2 telemetry)."""
        self._rebuilds.append(record)
        succeeded = record.outcome == RebuildOutcome.REBUILD_OUTCOME_SUCCEEDED
        failed = record.outcome == RebuildOutcome.REBUILD_OUTCOME_FAILED_RESTORED or (
            succeeded and bool(record.error)
        )
        clean = succeeded and not record.error
        logger.log(
            logging.WARNING if failed else logging.INFO,
            "optimizer rebuild at step %d: %s in %.2f ms (%s) %s",
            record.step,
            RebuildOutcome.Name(record.outcome),
            record.elapsed_ms,
            record.reason,
            record.error,
        )
        level = (
            TelemetryLevel.TELEMETRY_LEVEL_INFO if clean else TelemetryLevel.TELEMETRY_LEVEL_WARNING
        )
        priority = (
            MessagePriority.MESSAGE_PRIORITY_HIGH
            if failed
            else MessagePriority.MESSAGE_PRIORITY_NORMAL
        )
        self._events.event(
            EVENT_OPTIMIZER_REBUILD,
            level,
            priority,
            outcome=RebuildOutcome.Name(record.outcome),
            reason=record.reason,
            error=record.error,
            elapsed_ms=f"{record.elapsed_ms:.3f}",
            epoch=str(record.epoch),
            step=str(record.step),
            identical=str(record.parameters_identical),
            expanded=str(record.parameters_expanded),
            contracted=str(record.parameters_contracted),
            added=str(record.parameters_added),
            removed=str(record.parameters_removed),
        )
        return record


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, device and bytes (unlike `torch.equal`, -0.0 != 0.0 and NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _shape_change(
    name: str, old: tuple[int, ...], new: tuple[int, ...]
) -> frozenset[RebuildKind.ValueType]:
    """IDENTITY, or EXPAND and/or CONTRACT (a tensor grown in one dim and shrunk in another
    counts as both)."""
    if old == new:
        return frozenset({RebuildKind.REBUILD_KIND_IDENTITY})
    if len(old) != len(new):
        raise OptimizerInvalid(
            f"parameter {name!r}: shape {old} -> {new} changes rank; rename it to start it fresh"
        )
    kinds: set[RebuildKind.ValueType] = set()
    if any(n > o for o, n in zip(old, new, strict=True)):
        kinds.add(RebuildKind.REBUILD_KIND_EXPAND)
    if any(n < o for o, n in zip(old, new, strict=True)):
        kinds.add(RebuildKind.REBUILD_KIND_CONTRACT)
    return frozenset(kinds)


def _index_groups(groups: Sequence[ParamGroup]) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter; raises `OptimizerInvalid` for a clashing group id, name or parameter."""
    index: dict[str, torch.nn.Parameter] = {}
    group_ids: set[str] = set()
    seen_params: dict[torch.nn.Parameter, str] = {}
    for group in groups:
        if group.group_id in group_ids:
            raise OptimizerInvalid(f"param group id {group.group_id!r} is used twice")
        group_ids.add(group.group_id)
        for name, param in group.params:
            if name in index:
                raise OptimizerInvalid(f"parameter name {name!r} is used twice")
            if param in seen_params:
                raise OptimizerInvalid(
                    f"parameter {name!r} is the same tensor as {seen_params[param]!r}"
                )
            seen_params[param] = name
            index[name] = param
    return index


def _carried_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Group id -> every hyperparameter of that group as it is now (LRs set by the controller
    included), copied so that the new optimizer shares no tensor with the old."""
    carried: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        group_id = group.get(GROUP_ID_KEY)
        if not isinstance(group_id, str):
            raise OptimizerInvalid(f"live param group has no {GROUP_ID_KEY!r}: {sorted(group)}")
        carried[group_id] = {
            key: _copy_value(value) for key, value in group.items() if key not in _PARAMETER_LISTS
        }
    return carried


def _copy_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_copy_value(v) for v in value)
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    return value


def _to_param(value: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Per-element state on the parameter's device and (floating) dtype, as torch's
    `Optimizer.load_state_dict` places it; returns `value` itself when nothing changes."""
    dtype = param.dtype if value.is_floating_point() else value.dtype
    return value.to(device=param.device, dtype=dtype)


def _is_per_element(key: str, value: torch.Tensor) -> bool:
    """Whether a state entry holds one value per parameter element (vs. a scalar like `step`)."""
    return key in _PER_ELEMENT_KEYS or value.dim() > 0


def _check_fits(move: _Move, key: str, value: torch.Tensor) -> None:
    param = move.new
    if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
        raise RebuildFailed(
            f"parameter {move.name!r}: state {key!r} is {tuple(value.shape)} {value.dtype} on "
            f"{value.device}, parameter is {tuple(param.shape)} {param.dtype} on {param.device}"
        )
