"""Named fault points for crash-safety tests: `faults.hit(point)` at every durable write step.

Each module that writes durable state calls `faults.hit("<module>.<step>")` between its steps
and exports the names it uses as `WRITE_POINTS`; tests arm a point to crash there (an
`InjectedCrash` in-process, or `os._exit` in a child process for a real crash) or to fail with
an `OSError`, then check that reopening yields a whole state. Production code holds a `Faults`
with nothing armed (the default of every store), so `hit` returns at once: it must never
allocate, log or touch disk.
"""

from __future__ import annotations

import os

from tolaria_sidecar.errors import InjectedCrash

EXIT_STATUS = 137
"""Status of a child killed at a point by `exit_at`: what a shell reports for SIGKILL."""


class Faults:
    """Armed fault points and what fired; one instance per store under test."""

    def __init__(self, *, trace: bool = False) -> None:
        """`trace=True` counts every hit in `hits` (to list the points a scenario reaches)."""
        self.fired: dict[str, int] = {}
        """Faults that fired, by point: a test asserts `faults.fired == {point: 1}`."""
        self.hits: dict[str, int] = {}
        """Every hit by point, counted while tracing or while anything is armed; `nth` in the
        controls counts hits from the moment the point is armed."""
        self._trace = trace
        self._crash: dict[str, int] = {}
        self._fail: dict[str, tuple[int, OSError]] = {}
        self._exit: dict[str, int] = {}

    def hit(self, point: str) -> None:
        """Marks a write point; raises or exits there when a test armed it."""
        if not (self._trace or self._crash or self._fail or self._exit):
            return
        count = self.hits.get(point, 0) + 1
        self.hits[point] = count
        if self._exit.get(point) == count:
            self._fire(point)
            os._exit(EXIT_STATUS)
        if self._crash.get(point) == count:
            self._fire(point)
            raise InjectedCrash(point, count)
        armed = self._fail.get(point)
        if armed is not None and armed[0] == count:
            del self._fail[point]
            self._fire(point)
            raise armed[1]

    def crash_at(self, point: str, nth: int = 1) -> None:
        """Raises `InjectedCrash` at the `nth` hit of `point` from now (counting from 1)."""
        self._crash[point] = self._target(point, nth)

    def fail_at(self, point: str, error: OSError, nth: int = 1) -> None:
        """Raises `error` at the `nth` hit of `point` from now, once (an I/O error: ENOSPC)."""
        self._fail[point] = (self._target(point, nth), error)

    def exit_at(self, point: str, nth: int = 1) -> None:
        """Ends the process with `os._exit(137)` at the `nth` hit of `point` from now (child
        processes): no `finally`, no flush, no atexit, as after a SIGKILL."""
        self._exit[point] = self._target(point, nth)

    def _target(self, point: str, nth: int) -> int:
        if nth < 1:
            raise ValueError(f"nth counts hits from 1, got {nth}")
        return self.hits.get(point, 0) + nth

    def _fire(self, point: str) -> None:
        self.fired[point] = self.fired.get(point, 0) + 1
