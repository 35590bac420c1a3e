"""Named write points where tests inject crashes; a no-op in production.

Code that writes state another process will restore (the snapshot writer) calls
`faults.hit(point)` at each of its `WRITE_POINTS`; the crash-consistency tests pass a
`Faults` that reports or kills there, so every point is proven safe to die at.
"""

from __future__ import annotations

from typing import Protocol


class Faults(Protocol):
    def hit(self, point: str) -> None:
        """Called when execution reaches `point`; must not block or raise in production."""
        ...


class NoFaults:
    """Production: nothing happens at a write point."""

    def hit(self, point: str) -> None:
        del point


NO_FAULTS = NoFaults()
