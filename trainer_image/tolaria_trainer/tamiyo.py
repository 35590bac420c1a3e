"""The default Tamiyo: a small heuristic policy, and the fallback command.

`HeuristicTamiyo` watches the validation loss the hook hands it. On a plateau
(no relative improvement above `plateauTolerance` for `plateauEpochs`) it asks
for an LR cut through `COMMAND_OPTIMIZER` (`lr_scale`), never below
`minLrScale`; on divergence (loss non-finite or above `divergenceRatio` x the
best) it asks to pause adaptation (`COMMAND_PAUSE`). Otherwise it holds
(`COMMAND_UNKNOWN` with `policy_action=hold`: nothing to apply).

It runs on the hook's worker thread and may be abandoned mid-call, so it keeps
its own state behind a lock and never touches the model or optimizer.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping
from typing import Any

from leyline import (
    SCHEMA_VERSION,
    AdaptationCommand,
    CommandOptimizerAdjustment,
    CommandType,
    SystemStatePacket,
)
from leyline.spec import TamiyoSpec
from tolaria_trainer.protocols import JsonDict

ISSUER = "tamiyo-heuristic"
ANNOTATION_ACTION = "policy_action"
ANNOTATION_RISK = "risk_reason"
ACTION_HOLD = "hold"
ACTION_LR_CUT = "lr_cut"
ACTION_PAUSE = "pause"
ACTION_FALLBACK = "fallback"
HYPER_LR_SCALE = "lr_scale"
HOST_OPTIMIZER = "host"


def fallback_command(run_id: str, epoch: int, reason: str, deadline_ms: int) -> AdaptationCommand:
    """The conservative command used when Tamiyo is late, failing or not consulted (R1.3).

    PAUSE with a risk reason, as Tamiyo's own fallbacks do: no seed changes,
    no LR changes, training continues.
    """
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_id=f"{run_id}-e{epoch}-fallback",
        command_type=CommandType.COMMAND_PAUSE,
        execution_deadline_ms=deadline_ms,
        issued_by="tolaria",
        annotations={ANNOTATION_ACTION: ACTION_FALLBACK, ANNOTATION_RISK: reason},
    )
    cmd.issued_at.GetCurrentTime()
    return cmd


class HeuristicTamiyo:
    """Plateau -> LR cut, divergence -> pause, otherwise hold."""

    def __init__(self, spec: TamiyoSpec) -> None:
        self._spec = spec
        self._lock = threading.Lock()
        self._best = math.inf
        self._stale_epochs = 0
        self._lr_scale = 1.0
        self._ids = itertools.count(1)

    def decide(self, state: SystemStatePacket, *, deadline_ns: int) -> AdaptationCommand:
        del deadline_ns  # the heuristic answers in microseconds
        with self._lock:
            action, payload = self._judge(state.validation_loss)
        cmd = AdaptationCommand(
            version=SCHEMA_VERSION,
            command_id=f"{state.training_run_id}-e{state.current_epoch}-{next(self._ids)}",
            issued_by=ISSUER,
            execution_deadline_ms=18,
        )
        cmd.issued_at.GetCurrentTime()
        cmd.annotations[ANNOTATION_ACTION] = action
        if action == ACTION_LR_CUT:
            cmd.command_type = CommandType.COMMAND_OPTIMIZER
            cmd.optimizer_adjustment.CopyFrom(
                CommandOptimizerAdjustment(optimizer_id=HOST_OPTIMIZER, hyperparameters=payload)
            )
        elif action == ACTION_PAUSE:
            cmd.command_type = CommandType.COMMAND_PAUSE
            cmd.annotations[ANNOTATION_RISK] = "divergence"
        else:
            cmd.command_type = CommandType.COMMAND_UNKNOWN
        return cmd

    def _judge(self, loss: float) -> tuple[str, dict[str, float]]:
        if not math.isfinite(loss) or (
            math.isfinite(self._best) and loss > self._spec.divergence_ratio * self._best
        ):
            self._stale_epochs = 0
            return ACTION_PAUSE, {}
        if loss < self._best * (1.0 - self._spec.plateau_tolerance):
            self._best = loss
            self._stale_epochs = 0
            return ACTION_HOLD, {}
        self._best = min(self._best, loss)
        self._stale_epochs += 1
        next_scale = self._lr_scale * self._spec.lr_cut_factor
        if (
            self._stale_epochs >= self._spec.plateau_epochs
            and next_scale >= self._spec.min_lr_scale
        ):
            self._stale_epochs = 0
            self._lr_scale = next_scale
            return ACTION_LR_CUT, {HYPER_LR_SCALE: self._spec.lr_cut_factor}
        return ACTION_HOLD, {}

    def state_dict(self) -> JsonDict:
        """Checkpoint behavior: best loss, plateau counter and LR scale; JSON only."""
        with self._lock:
            best = self._best if math.isfinite(self._best) else None
            return {"best": best, "stale_epochs": self._stale_epochs, "lr_scale": self._lr_scale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            best = state.get("best")
            self._best = math.inf if best is None else float(best)
            self._stale_epochs = int(state["stale_epochs"])
            self._lr_scale = float(state["lr_scale"])
