"""Fire drills for `tolaria run --inject NAME@TRIGGER=N[,KEY=VALUE...]`.

Each drill injects one fault at a named point and is recorded in the run
report with what the runtime did about it. Parsing refuses an unknown drill,
a wrong trigger or a point the run never reaches, before training starts.

Drills (more arrive with the sidecar):
  slow-tamiyo@epoch=N   the policy overruns its deadline at epoch N (seconds=1.0)
  lr-tamper@step=N      an LR is written behind the controller's back after step N
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from leyline import AdaptationCommand, DrillRecord, SystemStatePacket
from tolaria_trainer.errors import DrillInvalid
from tolaria_trainer.protocols import JsonDict, TamiyoPolicy

SLOW_TAMIYO = "slow-tamiyo"
LR_TAMPER = "lr-tamper"


@dataclass(frozen=True)
class DrillKind:
    name: str
    trigger: str
    params: Mapping[str, float]
    summary: str


KINDS: dict[str, DrillKind] = {
    k.name: k
    for k in (
        DrillKind(SLOW_TAMIYO, "epoch", {"seconds": 1.0}, "Tamiyo overruns its deadline"),
        DrillKind(LR_TAMPER, "step", {"factor": 10.0}, "an LR is changed behind the controller"),
    )
}


@dataclass(frozen=True)
class DrillSpec:
    """One parsed `--inject` value."""

    raw: str
    kind: DrillKind
    at: int
    params: Mapping[str, float]


def parse_drill(raw: str) -> DrillSpec:
    """Parses `NAME@TRIGGER=N[,KEY=VALUE...]`; raises `DrillInvalid` naming what is wrong."""
    name, sep, rest = raw.partition("@")
    kind = KINDS.get(name)
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise DrillInvalid(f"--inject {raw!r}: unknown drill {name!r} (known: {known})")
    if not sep:
        raise DrillInvalid(f"--inject {raw!r}: expected {name}@{kind.trigger}=N")
    first, *extra = rest.split(",")
    trigger, eq, value = first.partition("=")
    if trigger != kind.trigger or not eq:
        raise DrillInvalid(f"--inject {raw!r}: {name} takes {kind.trigger}=N")
    try:
        at = int(value)
    except ValueError as err:
        raise DrillInvalid(f"--inject {raw!r}: {kind.trigger} must be an integer") from err
    if at < 0 or (kind.trigger == "step" and at < 1):
        low = 1 if kind.trigger == "step" else 0
        raise DrillInvalid(f"--inject {raw!r}: {kind.trigger} must be >= {low}")
    params = dict(kind.params)
    for item in extra:
        key, eq, text = item.partition("=")
        if key not in params or not eq:
            allowed = ", ".join(sorted(kind.params)) or "none"
            raise DrillInvalid(f"--inject {raw!r}: unknown option {key!r} (allowed: {allowed})")
        try:
            params[key] = float(text)
        except ValueError as err:
            raise DrillInvalid(f"--inject {raw!r}: {key} must be a number") from err
        if params[key] < 0:
            raise DrillInvalid(f"--inject {raw!r}: {key} must be >= 0")
    return DrillSpec(raw, kind, at, params)


def check_reachable(drills: Sequence[DrillSpec], *, epochs: int, total_steps: int) -> None:
    """Refuses drills whose trigger the run never reaches (they would silently not fire)."""
    for d in drills:
        limit = epochs - 1 if d.kind.trigger == "epoch" else total_steps
        if d.at > limit:
            raise DrillInvalid(
                f"--inject {d.raw!r}: {d.kind.trigger} {d.at} is never reached "
                f"(this run's last {d.kind.trigger} is {limit})"
            )


@dataclass
class _SlowPolicy:
    """Wraps a policy so that one epoch's decision comes back late."""

    inner: TamiyoPolicy
    drill: DrillSpec
    record: DrillRecord

    def decide(self, state: SystemStatePacket, *, deadline_ns: int) -> AdaptationCommand:
        command = self.inner.decide(state, deadline_ns=deadline_ns)
        if state.current_epoch == self.drill.at:
            self.record.fired = True
            self.record.epoch = state.current_epoch
            self.record.step = state.global_step
            time.sleep(self.drill.params["seconds"])
        return command

    def state_dict(self) -> JsonDict:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


@dataclass
class Drills:
    """The run's drills and their records; a no-op when empty."""

    specs: Sequence[DrillSpec] = ()
    records: list[DrillRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.records = [DrillRecord(spec=d.raw) for d in self.specs]
        self._tamper = [
            (d, r)
            for d, r in zip(self.specs, self.records, strict=True)
            if d.kind.name == LR_TAMPER
        ]

    def record_for(self, name: str) -> list[DrillRecord]:
        return [r for d, r in zip(self.specs, self.records, strict=True) if d.kind.name == name]

    def wrap_policy(self, policy: TamiyoPolicy) -> TamiyoPolicy:
        for d, r in zip(self.specs, self.records, strict=True):
            if d.kind.name == SLOW_TAMIYO:
                policy = _SlowPolicy(policy, d, r)
        return policy

    def before_lr_step(
        self, epoch: int, global_step: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """The lr-tamper point: after `optimizer.step()`, before the LR controller's step."""
        for d, r in self._tamper:
            if global_step == d.at and not r.fired:
                group = optimizer.param_groups[0]
                group["lr"] = group["lr"] * d.params["factor"]
                r.fired = True
                r.epoch = epoch
                r.step = global_step
