"""Errors of the training runtime, named for what the caller does next.

`TrainerError` is the base. Hot-path components usually record a breaker
failure and return an outcome instead of raising; these types are for the
edges (CLI, task loading) and for two-phase operations that must undo work.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the training runtime raises on purpose."""


class TaskInvalid(TrainerError):
    """`spec.training.task` cannot be loaded or returned something unusable: refuse at the edge."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class DrillInvalid(TrainerError):
    """An `--inject` value names no drill or has a bad trigger: refuse at the edge."""


class FlagInvalid(TrainerError):
    """A flag contradicts the manifest (`--profile` past the last epoch): refuse at the edge."""

    def __init__(self, flag: str, rule: str) -> None:
        super().__init__(f"{flag}: {rule}")
        self.flag = flag
        self.rule = rule


class DeviceUnavailable(TrainerError):
    """`spec.training.device: cuda` on a machine where torch sees no GPU: refuse at the edge.

    Never moved to the CPU silently: a run sized for a GPU would crawl, or not fit.
    """


class MetricsPortUnavailable(TrainerError):
    """The metrics endpoint cannot be bound (port in use, address not local): refuse at the edge.

    `field` is what the user wrote it with (`--metrics-port`, `spec.telemetry.metricsPort` or
    `spec.telemetry.metricsAddress`), so the message says what to change.
    """

    def __init__(self, field: str, address: str, port: int, reason: str) -> None:
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        super().__init__(f"{field}: cannot serve metrics on {where}: {reason}")
        self.field = field
        self.address = address
        self.port = port
        self.reason = reason


REFUSED_INPUT: tuple[type[TrainerError], ...] = (
    TaskInvalid,
    DrillInvalid,
    DeviceUnavailable,
    MetricsPortUnavailable,
)
"""What the runtime refuses before it writes anything: the CLI and the worker exit 2 on these."""


class BudgetBreached(TrainerError):
    """A budgeted operation overran: record a breaker failure (R1.4), never crash."""

    def __init__(self, what: str, elapsed_ms: float, budget_ms: float) -> None:
        super().__init__(f"{what}: {elapsed_ms:.2f} ms > budget {budget_ms:.2f} ms")
        self.what = what
        self.elapsed_ms = elapsed_ms
        self.budget_ms = budget_ms


class LRIntegrityError(TrainerError):
    """A learning rate changed behind the LR controller's back (R3.2): breaker failure."""

    def __init__(self, group_id: str, expected: float, found: float) -> None:
        super().__init__(f"group {group_id}: LR {found!r} != last set {expected!r}")
        self.group_id = group_id
        self.expected = expected
        self.found = found


class RebuildFailed(TrainerError):
    """An optimizer rebuild failed validation; the old optimizer was restored intact (R4.2)."""


class StateMismatch(TrainerError):
    """Saved state does not fit the live objects (names, shapes, groups): refuse to restore it."""


class OptimizerInvalid(TrainerError):
    """The optimizer cannot be built from what it was given: fix the caller (R4).

    Unknown kind, clashing group ids or parameter names, a parameter whose rank
    changed. A rebuild reports it as FAILED_RESTORED and keeps the old optimizer.
    """


class SidecarDidNotStart(TrainerError):
    """`tolaria run` could not start the sidecar (no READY line): the run fails with this
    message, which quotes the end of `sidecar.log`."""
