"""`spec.telemetry` and `spec.profiler`: what the run reports and traces (R8, R9)."""

from __future__ import annotations

from pydantic import Field

from leyline.spec.base import Rule, SpecModel


class TelemetrySpec(SpecModel):
    """`spec.telemetry`: Leyline telemetry packets and the Prometheus endpoint (R8)."""

    queue_capacity: int = Field(default=10_000, ge=1, le=10_000_000)
    """Packets queued before LOW, then NORMAL, ones are dropped (counted); CRITICAL never waits."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Serve Prometheus metrics on this port (0: off; `tolaria run --metrics-port` overrides)."""
    metrics_address: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    """Bind address of the metrics endpoint; the pod manifest sets 0.0.0.0."""
    step_packet_every: int = Field(default=50, ge=1, le=10_000_000)
    """A LOW-priority step packet every N optimizer steps (the hot path emits nothing else)."""


class ProfilerSpec(SpecModel):
    """`spec.profiler`: torch.profiler around chosen epochs (R9.1), off by default."""

    epochs: list[int] = Field(default_factory=list, max_length=64)
    """Epochs (0-based) to profile; empty: off. `tolaria run --profile 1,3` overrides."""
    record_shapes: bool = False
    """Record input shapes (bigger traces)."""
    profile_memory: bool = False
    """Record allocations (bigger traces)."""

    rules = (
        Rule(
            field="epochs",
            message="must be >= 0",
            cel="self.epochs.all(e, e >= 0)",
            holds=lambda s: all(e >= 0 for e in s.epochs),
        ),
    )
