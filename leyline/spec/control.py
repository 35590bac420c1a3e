"""`spec.tamiyo` and `spec.optimizerRebuild`: the policy and the optimizer manager (R1.3, R4)."""

from __future__ import annotations

from pydantic import Field

from leyline.spec.base import SpecModel


class TamiyoSpec(SpecModel):
    """`spec.tamiyo`: the built-in heuristic policy consulted at every epoch end."""

    plateau_epochs: int = Field(default=3, ge=1, le=1000)
    """Epochs without a validation-loss improvement before the policy asks for an LR cut."""
    plateau_tolerance: float = Field(default=1e-3, ge=0.0, le=1.0)
    """Relative improvement below which an epoch counts as no improvement."""
    lr_cut_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Factor of the LR cut the policy asks for on a plateau."""
    min_lr_scale: float = Field(default=0.01, gt=0.0, le=1.0)
    """The policy never cuts the LR scale below this fraction of the schedule."""
    divergence_ratio: float = Field(default=1.5, gt=1.0, le=1000.0)
    """Validation loss above this multiple of the best so far makes the policy pause adaptation."""


class RebuildSpec(SpecModel):
    """`spec.optimizerRebuild`: rebuilding the optimizer when parameters change (R4.2)."""

    min_steps_between: int = Field(default=50, ge=0, le=10_000_000)
    """Storm guard: optimizer steps required between two rebuilds."""
    budget_ms: float = Field(default=100.0, gt=0.0, le=600_000.0)
    """A rebuild slower than this is a breaker failure (state preservation is off the hot path)."""
    momentum_fill_scale: float = Field(default=0.1, ge=0.0, le=1.0)
    """Plain momentum of new slices = this x the per-dim mean of the old buffer (R4.1)."""
