"""The one circuit-breaker utility for every guarded operation (R2.1).

States are Leyline's `CircuitBreakerState`. CLOSED counts consecutive
failures and opens at `failureThreshold`. OPEN refuses (`allow()` is False)
until `cooldownSeconds` have passed, then becomes HALF_OPEN and admits
`halfOpenTrials` trials: all succeed -> CLOSED, any failure -> OPEN again at
once. Operations that always run (hook timing) still report outcomes; after
the cool-down such an outcome counts as the half-open trial, so a breaker
never stays open just because nobody asked `allow()`.

Called on hot paths (every optimizer step): no allocation on success, no
logging, no I/O. Time comes from an injected `Clock`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from leyline import BreakerId, BreakerSummary, CircuitBreakerState
from leyline.spec import BreakerSpec
from tolaria_trainer.protocols import Clock

CLOSED = CircuitBreakerState.CIRCUIT_STATE_CLOSED
OPEN = CircuitBreakerState.CIRCUIT_STATE_OPEN
HALF_OPEN = CircuitBreakerState.CIRCUIT_STATE_HALF_OPEN


@dataclass(frozen=True)
class BreakerTransition:
    """A state change, for events and the `tolaria_breaker_state` gauge."""

    breaker: BreakerId.ValueType
    old: CircuitBreakerState.ValueType
    new: CircuitBreakerState.ValueType
    reason: str


TransitionListener = Callable[[BreakerTransition], None]


class CircuitBreaker:
    """Tracks one guarded operation's health; see the module docstring for the rules."""

    def __init__(
        self,
        breaker: BreakerId.ValueType,
        spec: BreakerSpec,
        clock: Clock,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.breaker = breaker
        self._spec = spec
        self._clock = clock
        self._on_transition = on_transition
        self._state: CircuitBreakerState.ValueType = CLOSED
        self._consecutive_failures = 0
        self._opened_at_ns = 0
        self._trials_admitted = 0
        self._trial_successes = 0
        self.failures = 0
        self.successes = 0
        self.trips = 0
        self.last_failure = ""

    @property
    def state(self) -> CircuitBreakerState.ValueType:
        """Current state, moving OPEN -> HALF_OPEN once the cool-down has passed."""
        self._refresh()
        return self._state

    @property
    def is_closed(self) -> bool:
        return self.state == CLOSED

    def allow(self) -> bool:
        """Whether the operation may run now; HALF_OPEN admits a bounded number of trials."""
        self._refresh()
        if self._state == CLOSED:
            return True
        if self._state == OPEN:
            return False
        if self._trials_admitted < self._spec.half_open_trials:
            self._trials_admitted += 1
            return True
        return False

    def record_success(self) -> None:
        """The operation succeeded; ignored while OPEN (the cool-down still runs)."""
        self._refresh()
        self.successes += 1
        if self._state == CLOSED:
            self._consecutive_failures = 0
        elif self._state == HALF_OPEN:
            self._trial_successes += 1
            if self._trial_successes >= self._spec.half_open_trials:
                self._transition(CLOSED, "half-open trials succeeded")

    def record_failure(self, reason: str) -> None:
        """The operation failed: count it, open at the threshold, reopen at once from HALF_OPEN."""
        self._refresh()
        self.failures += 1
        self.last_failure = reason
        if self._state == CLOSED:
            self._consecutive_failures += 1
            if self._consecutive_failures >= self._spec.failure_threshold:
                self._open(reason)
        elif self._state == HALF_OPEN:
            self._open(reason)

    def summary(self) -> BreakerSummary:
        """Counters for the run report."""
        return BreakerSummary(
            breaker=self.breaker,
            state=self.state,
            failures=self.failures,
            successes=self.successes,
            trips=self.trips,
            last_failure=self.last_failure,
        )

    def _open(self, reason: str) -> None:
        self.trips += 1
        self._opened_at_ns = self._clock.now_ns()
        self._transition(OPEN, reason)

    def _refresh(self) -> None:
        if self._state != OPEN:
            return
        elapsed_s = (self._clock.now_ns() - self._opened_at_ns) / 1e9
        if elapsed_s >= self._spec.cooldown_seconds:
            self._transition(HALF_OPEN, f"cool-down of {self._spec.cooldown_seconds:g} s elapsed")

    def _transition(self, new: CircuitBreakerState.ValueType, reason: str) -> None:
        old = self._state
        self._state = new
        self._consecutive_failures = 0
        self._trials_admitted = 0
        self._trial_successes = 0
        if self._on_transition is not None:
            self._on_transition(BreakerTransition(self.breaker, old, new, reason))
