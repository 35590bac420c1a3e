"""`spec.budgets`, `spec.breakers`, `spec.conservative`: the epoch-boundary guards (R1, R2, R12)."""

from __future__ import annotations

from pydantic import Field

from leyline.spec.base import Rule, SpecModel


class BudgetsSpec(SpecModel):
    """`spec.budgets`: time budgets, measured with a monotonic clock (R1.2, R3.2, R12).

    A breach is recorded as a breaker failure and an event; it never crashes
    the run (R1.4).
    """

    hook_ms: float = Field(default=18.0, gt=0.0, le=60_000.0)
    """End-of-epoch hook, from after validation to after command handling (R1.2)."""
    assembly_ms: float = Field(default=3.5, gt=0.0, le=60_000.0)
    """Share of the hook for assembling the SystemStatePacket."""
    tamiyo_ms: float = Field(default=12.0, gt=0.0, le=60_000.0)
    """Share of the hook for the Tamiyo decision; the hard deadline is the remaining hook budget."""
    command_ms: float = Field(default=1.5, gt=0.0, le=60_000.0)
    """Share of the hook for applying the command (Kasmina, LR controller, optimizer)."""
    guard_ms: float = Field(default=1.0, gt=0.0, le=60_000.0)
    """Share of the hook for breaker bookkeeping and scheduling slow work."""
    tamiyo_ceiling_seconds: float = Field(default=2.0, gt=0.0, le=600.0)
    """Absolute cap on a Tamiyo call even when a large hook budget is configured (R1.3)."""
    lr_step_ms: float = Field(default=5.0, gt=0.0, le=60_000.0)
    """One LR controller step, integrity guard included (R3.2)."""
    lr_guard_ms: float = Field(default=2.0, gt=0.0, le=60_000.0)
    """The LR integrity guard alone (R3.2)."""
    latency_window: int = Field(default=100, ge=1, le=100_000)
    """Hook latencies kept for p50/p95/p99; budgets are judged over a window, not one epoch."""

    rules = (
        Rule(
            field="hookMs",
            message="must be >= assemblyMs + tamiyoMs + commandMs + guardMs",
            cel="self.hookMs >= self.assemblyMs + self.tamiyoMs + self.commandMs + self.guardMs",
            holds=lambda s: (
                s.hook_ms + 1e-9 >= s.assembly_ms + s.tamiyo_ms + s.command_ms + s.guard_ms
            ),
        ),
        Rule(
            field="lrGuardMs",
            message="must be <= lrStepMs",
            cel="self.lrGuardMs <= self.lrStepMs",
            holds=lambda s: s.lr_guard_ms <= s.lr_step_ms,
        ),
    )


class BreakerSpec(SpecModel):
    """`spec.breakers`: one policy for every guarded operation (R2.1)."""

    failure_threshold: int = Field(default=3, ge=1, le=1000)
    """Consecutive failures that open a breaker."""
    cooldown_seconds: float = Field(default=30.0, gt=0.0, le=86_400.0)
    """Time OPEN before one HALF_OPEN trial; outlasts a slow checkpoint write, so no flapping."""
    half_open_trials: int = Field(default=1, ge=1, le=100)
    """Trials admitted while HALF_OPEN; all must succeed to close, one failure reopens at once."""


class ConservativeSpec(SpecModel):
    """`spec.conservative`: conservative mode (R2.2, R2.3)."""

    exit_clean_epochs: int = Field(default=3, ge=1, le=1000)
    """Consecutive clean epochs, with every breaker CLOSED, before leaving conservative mode."""
    telemetry_sample_every: int = Field(default=10, ge=1, le=100_000)
    """While conservative, only every Nth LOW/NORMAL packet is emitted (R2.2 sampling drops)."""
