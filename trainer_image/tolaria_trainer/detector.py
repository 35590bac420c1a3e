"""Anomaly detection (R7.2): which training signals become which emergency level.

Per step, before the optimizer step (so a bad step is never applied): a
non-finite loss or gradient, or a loss above `lossExplosionFactor` x the
running median of recent losses, is SEVERE (fast rollback). The median is
judged from `warmupSteps` losses on (4 by default), so an explosion in the
first steps of a run is caught too (R13.4): the median of the first losses of
a run is high, if anything, so it does not raise false alarms. Per epoch: a
validation accuracy below `accuracyCollapseRatio` x the best so far is MAJOR
(full rollback); hook budget breaches in `sustainedBreachEpochs` consecutive
epochs are MINOR; `breakerStormTrips` breaker trips in one epoch is CRITICAL.

The running median keeps a small sorted window (bisect), so a step costs
O(window) with no allocation beyond the window. State is a JSON document in
every snapshot, so a rollback restores the detector too.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leyline import AnomalyKind, EmergencyLevel
from leyline.spec import DetectionSpec
from tolaria_trainer.protocols import JsonDict


@dataclass(frozen=True)
class Anomaly:
    """One judged anomaly: where it happened and what a rollback may restore."""

    level: EmergencyLevel.ValueType
    kind: AnomalyKind.ValueType
    detail: str
    global_step: int
    """The step the anomaly belongs to (a step-level anomaly: the step not applied)."""
    epoch: int
    batch_index: int
    restore_at_or_before: int | None = None
    """The newest step a rollback may restore: the step before a bad step (default), or the
    start of the epoch whose validation collapsed (an epoch-level anomaly)."""
    epoch_level: bool = False
    """Blamed on the whole epoch's data (accuracy collapse), not on one batch."""
    external: bool = False
    """Raised outside this trainer (operator, cluster incident): no data window to blame."""
    samples: frozenset[int] = frozenset()
    """Dataset indexes of the step's samples (a step-level anomaly): the data it is blamed on."""

    @property
    def max_target_step(self) -> int:
        if self.restore_at_or_before is not None:
            return self.restore_at_or_before
        return max(0, self.global_step - 1)

    @property
    def data_dependent(self) -> bool:
        """A bad batch rather than a bad state: its window is skipped on rollback (R6.1a)."""
        return self.kind in (
            AnomalyKind.ANOMALY_KIND_LOSS_EXPLOSION,
            AnomalyKind.ANOMALY_KIND_NON_FINITE_LOSS,
            AnomalyKind.ANOMALY_KIND_NON_FINITE_GRADIENT,
        )


class AnomalyDetector:
    """Judges losses and epoch outcomes; see the module docstring."""

    def __init__(self, spec: DetectionSpec) -> None:
        self._spec = spec
        self._window: deque[float] = deque(maxlen=spec.median_window)
        self._sorted: list[float] = []
        self._seen = 0
        self._best_accuracy = -math.inf
        self._breach_streak = 0

    def median(self) -> float:
        n = len(self._sorted)
        if n == 0:
            return math.nan
        mid = n // 2
        return self._sorted[mid] if n % 2 else 0.5 * (self._sorted[mid - 1] + self._sorted[mid])

    def inspect_step(
        self,
        loss: float,
        *,
        grads_finite: bool,
        global_step: int,
        epoch: int,
        batch_index: int,
    ) -> Anomaly | None:
        """Judges one step's loss; a normal loss joins the running median."""

        def anomaly(kind: AnomalyKind.ValueType, detail: str) -> Anomaly:
            return Anomaly(
                EmergencyLevel.EMERGENCY_LEVEL_SEVERE,
                kind,
                detail,
                global_step,
                epoch,
                batch_index,
            )

        if not math.isfinite(loss):
            return anomaly(AnomalyKind.ANOMALY_KIND_NON_FINITE_LOSS, f"loss is {loss}")
        if not grads_finite:
            return anomaly(AnomalyKind.ANOMALY_KIND_NON_FINITE_GRADIENT, "a gradient is not finite")
        median = self.median()
        factor = self._spec.loss_explosion_factor
        if (
            self._seen >= self._spec.warmup_steps
            and math.isfinite(median)
            and loss > factor * median
        ):
            return anomaly(
                AnomalyKind.ANOMALY_KIND_LOSS_EXPLOSION,
                f"loss {loss:.4g} > {factor:g} x running median {median:.4g}",
            )
        self._add(loss)
        return None

    def _add(self, loss: float) -> None:
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._window.append(loss)
        bisect.insort(self._sorted, loss)
        self._seen += 1

    def inspect_epoch(
        self,
        *,
        accuracy: float,
        hook_breached: bool,
        breaker_trips: int,
        global_step: int,
        epoch: int,
        epoch_start_step: int,
    ) -> Anomaly | None:
        """Judges an epoch's outcome (after its hook). `epoch_start_step` is where the epoch
        began: a collapse is rolled back to a state no newer than that."""
        self._breach_streak = self._breach_streak + 1 if hook_breached else 0
        if breaker_trips >= self._spec.breaker_storm_trips:
            return Anomaly(
                EmergencyLevel.EMERGENCY_LEVEL_CRITICAL,
                AnomalyKind.ANOMALY_KIND_BREAKER_STORM,
                f"{breaker_trips} breaker trips in epoch {epoch}",
                global_step,
                epoch,
                0,
            )
        if math.isfinite(accuracy):
            best = self._best_accuracy
            if math.isfinite(best) and accuracy < self._spec.accuracy_collapse_ratio * best:
                return Anomaly(
                    EmergencyLevel.EMERGENCY_LEVEL_MAJOR,
                    AnomalyKind.ANOMALY_KIND_ACCURACY_COLLAPSE,
                    f"validation accuracy {accuracy:.4f} < "
                    f"{self._spec.accuracy_collapse_ratio:g} x best {best:.4f}",
                    global_step,
                    epoch,
                    0,
                    restore_at_or_before=epoch_start_step,
                    epoch_level=True,
                )
            self._best_accuracy = max(best, accuracy)
        if self._breach_streak >= self._spec.sustained_breach_epochs:
            self._breach_streak = 0
            return Anomaly(
                EmergencyLevel.EMERGENCY_LEVEL_MINOR,
                AnomalyKind.ANOMALY_KIND_BUDGET_BREACHES,
                f"hook over budget {self._spec.sustained_breach_epochs} epochs in a row",
                global_step,
                epoch,
                0,
            )
        return None

    def state_dict(self) -> JsonDict:
        """Checkpoint behavior: the loss window, samples seen, best accuracy, breach streak."""
        best = self._best_accuracy if math.isfinite(self._best_accuracy) else None
        return {
            "window": list(self._window),
            "seen": self._seen,
            "best": best,
            "streak": self._breach_streak,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._window.clear()
        self._sorted = []
        for value in state["window"]:
            self._window.append(float(value))
            bisect.insort(self._sorted, float(value))
        self._seen = int(state["seen"])
        best = state["best"]
        self._best_accuracy = -math.inf if best is None else float(best)
        self._breach_streak = int(state["streak"])
