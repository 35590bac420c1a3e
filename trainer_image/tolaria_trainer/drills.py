"""Fire drills for `tolaria run --inject NAME@TRIGGER=N[,KEY=VALUE...]`.

Each drill injects one fault at a named point and is recorded in the run
report with what the runtime did about it. Parsing refuses an unknown drill,
a wrong trigger or a point the run never reaches, before training starts.

Trainer drills fire in the training process; sidecar drills are handed to the
sidecar process by `tolaria run`. Every drill fires once: a rollback that
passes its trigger again does not re-fire it, and a restarted trainer gets no
drills (a crash drill must not crash every attempt).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leyline import AdaptationCommand, DrillRecord, SystemStatePacket
from tolaria_trainer.errors import DrillInvalid
from tolaria_trainer.protocols import JsonDict, TamiyoPolicy

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SLOW_TAMIYO = "slow-tamiyo"
LR_TAMPER = "lr-tamper"
LOSS_SPIKE = "loss-spike"
NAN = "nan"
CRASH = "crash"
HANG = "hang"
CORRUPT_SNAPSHOT = "corrupt-snapshot"
SIDECAR_CRASH = "sidecar-crash"
CHECKPOINT_IO_ERROR = "checkpoint-io-error"
SLOW_CHECKPOINT = "slow-checkpoint"
CORRUPT_CHECKPOINT = "corrupt-checkpoint"

TRAINER = "trainer"
SIDECAR = "sidecar"
SIDECAR_PID_ENV = "TOLARIA_SIDECAR_PID"


@dataclass(frozen=True)
class DrillKind:
    name: str
    trigger: str
    params: Mapping[str, float]
    summary: str
    side: str = TRAINER


KINDS: dict[str, DrillKind] = {
    k.name: k
    for k in (
        DrillKind(
            SLOW_TAMIYO, "epoch", {"seconds": 1.0}, "Tamiyo overruns its deadline at epoch N"
        ),
        DrillKind(
            LR_TAMPER,
            "step",
            {"factor": 10.0},
            "an LR is changed behind the controller after step N",
        ),
        DrillKind(
            LOSS_SPIKE,
            "step",
            {"factor": 1000.0},
            "step N's loss explodes (x factor): fast rollback",
        ),
        DrillKind(NAN, "step", {}, "step N's loss is NaN: fast rollback"),
        DrillKind(
            CRASH,
            "step",
            {"settle": 1.0},
            "the trainer dies by SIGKILL after step N: restart, resume from shared memory "
            "(settle=1: once the durable checkpoint in flight is on disk; 0: at once)",
        ),
        DrillKind(
            HANG, "step", {}, "the trainer hangs after step N: CRITICAL freeze, then halt (exit 3)"
        ),
        DrillKind(
            CORRUPT_SNAPSHOT,
            "step",
            {"spike": 1.0, "all": 0.0, "settle": 1.0},
            "after step N the newest snapshot (all=1: every snapshot) is corrupted "
            "(spike=1: step N+1's loss explodes; settle=1: once the durable checkpoint "
            "in flight is on disk, 0: at once)",
        ),
        DrillKind(
            SIDECAR_CRASH,
            "step",
            {},
            "the sidecar dies by SIGKILL after step N: DEGRADED, then re-attached",
        ),
        DrillKind(
            CHECKPOINT_IO_ERROR,
            "epoch",
            {},
            "the durable checkpoint of epoch N fails with ENOSPC",
            SIDECAR,
        ),
        DrillKind(
            CORRUPT_CHECKPOINT,
            "epoch",
            {},
            "the file of epoch N's durable checkpoint is damaged after its commit: "
            "a full rollback rejects it and loads the one before",
            SIDECAR,
        ),
        DrillKind(
            SLOW_CHECKPOINT,
            "epoch",
            {"seconds": 3.0},
            "the durable checkpoint of epoch N starts late (a slow disk; the last one "
            "races the run's end)",
            SIDECAR,
        ),
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


def split(drills: Sequence[DrillSpec]) -> tuple[list[DrillSpec], list[DrillSpec]]:
    """(trainer drills, sidecar drills)."""
    return [d for d in drills if d.kind.side == TRAINER], [
        d for d in drills if d.kind.side == SIDECAR
    ]


def check_reachable(drills: Sequence[DrillSpec], *, epochs: int, total_steps: int) -> None:
    """Refuses drills whose trigger the run never reaches (they would silently not fire)."""
    for d in drills:
        limit = epochs - 1 if d.kind.trigger == "epoch" else total_steps
        if d.kind.side == SIDECAR:  # checkpoints count completed epochs: the last is `epochs`
            limit = epochs
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
    corrupt_newest: Callable[[bool], str] | None = None
    """Set by the runtime: corrupts the newest committed slot (every one when asked), returns
    what it did."""
    settle: Callable[[], str] | None = None
    """Set by the runtime: waits (bounded) until the durable checkpoint already requested is on
    disk, returns what it found. Without it a drill's outcome would depend on how fast the disk
    is: a crash or corruption striking while the sidecar still copies the slot leaves no
    checkpoint to fall back to, which is a different drill."""

    def __post_init__(self) -> None:
        self.records = [DrillRecord(spec=d.raw) for d in self.specs]
        self._pending_spike: int | None = None

    def record_for(self, name: str) -> list[DrillRecord]:
        return [r for d, r in zip(self.specs, self.records, strict=True) if d.kind.name == name]

    def wrap_policy(self, policy: TamiyoPolicy) -> TamiyoPolicy:
        for d, r in zip(self.specs, self.records, strict=True):
            if d.kind.name == SLOW_TAMIYO:
                policy = _SlowPolicy(policy, d, r)
        return policy

    def _armed(self, name: str, at: int) -> list[tuple[DrillSpec, DrillRecord]]:
        return [
            (d, r)
            for d, r in zip(self.specs, self.records, strict=True)
            if d.kind.name == name and d.at == at and not r.fired
        ]

    @staticmethod
    def _fire(record: DrillRecord, epoch: int, step: int, observed: str = "") -> None:
        record.fired = True
        record.epoch = epoch
        record.step = step
        if observed:
            record.observed = observed

    def loss_hook(
        self, epoch: int, upcoming_step: int
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The loss change for the micro-batches of step `upcoming_step`, if a drill wants one."""
        if self._pending_spike == upcoming_step:
            self._pending_spike = None
            return lambda loss: loss * 1000.0
        for d, r in self._armed(LOSS_SPIKE, upcoming_step):
            self._fire(r, epoch, upcoming_step)
            factor = d.params["factor"]
            return lambda loss: loss * factor
        for _, r in self._armed(NAN, upcoming_step):
            self._fire(r, epoch, upcoming_step)
            return lambda loss: loss * float("nan")
        return None

    def after_step(self, epoch: int, global_step: int) -> None:
        """Post-step drills: corrupt-snapshot, sidecar-crash, crash, hang."""
        for d, r in self._armed(CORRUPT_SNAPSHOT, global_step):
            every = bool(d.params["all"])
            settled = self._settle(d)
            what = self.corrupt_newest(every) if self.corrupt_newest is not None else "no slots"
            self._fire(r, epoch, global_step, settled + what)
            if d.params["spike"]:
                self._pending_spike = global_step + 1
        for _, r in self._armed(SIDECAR_CRASH, global_step):
            pid = int(os.environ.get(SIDECAR_PID_ENV, "0"))
            self._fire(r, epoch, global_step, f"SIGKILL to sidecar pid {pid}")
            if pid > 0:
                os.kill(pid, signal.SIGKILL)
        for d, r in self._armed(CRASH, global_step):
            self._fire(r, epoch, global_step, self._settle(d).removesuffix("; "))
            logger.critical("drill: SIGKILL to this trainer after step %d", global_step)
            os.kill(os.getpid(), signal.SIGKILL)
        for _, r in self._armed(HANG, global_step):
            self._fire(r, epoch, global_step)
            logger.critical("drill: the training thread hangs after step %d", global_step)
            threading.Event().wait()  # forever; the emergency watcher halts the process

    def _settle(self, drill: DrillSpec) -> str:
        if not drill.params.get("settle") or self.settle is None:
            return ""
        return self.settle() + "; "

    def before_lr_step(
        self, epoch: int, global_step: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """The lr-tamper point: after `optimizer.step()`, before the LR controller's step."""
        for d, r in self._armed(LR_TAMPER, global_step):
            group = optimizer.param_groups[0]
            group["lr"] = group["lr"] * d.params["factor"]
            self._fire(r, epoch, global_step)
