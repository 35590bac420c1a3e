"""Calls with a hard deadline that really bounds wall time (R1.3, ARCHITECTURE design rules).

The call runs on a persistent worker thread; the caller waits at most until
the deadline. A late worker is abandoned, never joined: its result is thrown
away when it finally arrives, and the next call gets a fresh worker. At most
`max_abandoned` abandoned workers may still be running; beyond that calls are
refused at once (a policy that hangs forever cannot leak threads without
bound, and the caller's breaker is open long before then).

Python cannot kill a thread, so the policy keeps its CPU until it returns;
what the deadline guarantees is that the *caller* is not delayed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from queue import SimpleQueue
from typing import Generic, TypeVar

T = TypeVar("T")


class CallStatus(Enum):
    """How a deadline call ended. Internal outcome, not a Leyline contract."""

    OK = auto()
    TIMED_OUT = auto()
    FAILED = auto()
    REFUSED = auto()


@dataclass
class CallOutcome(Generic[T]):
    status: CallStatus
    value: T | None
    error: BaseException | None
    elapsed_ns: int

    @property
    def ok(self) -> bool:
        return self.status is CallStatus.OK


class _Job(Generic[T]):
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class _Worker(threading.Thread):
    """Runs jobs one at a time until retired; a retired worker exits after its current job."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.jobs: SimpleQueue[_Job[object] | None] = SimpleQueue()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.value = job.fn()
            except BaseException as err:  # boundary: the error is handed to the caller
                job.error = err
            finally:
                job.done.set()


class DeadlineCaller:
    """Runs one call at a time on a worker thread, giving up at the deadline."""

    def __init__(self, name: str, *, max_abandoned: int = 4) -> None:
        self._name = name
        self._max_abandoned = max_abandoned
        self._late: list[_Job[object]] = []
        self._worker = self._spawn()
        self.abandoned_total = 0

    def call(self, fn: Callable[[], T], *, deadline_ns: int) -> CallOutcome[T]:
        """Runs `fn` and waits until `deadline_ns` (a `time.perf_counter_ns()` value) at most."""
        start = time.perf_counter_ns()
        self._late = [j for j in self._late if not j.done.is_set()]
        if len(self._late) > self._max_abandoned:
            return CallOutcome(CallStatus.REFUSED, None, None, 0)
        job: _Job[T] = _Job(fn)
        self._worker.jobs.put(job)  # type: ignore[arg-type]
        timeout_s = max(0.0, (deadline_ns - start) / 1e9)
        finished = job.done.wait(timeout_s)
        elapsed = time.perf_counter_ns() - start
        if not finished:
            self._abandon(job)  # type: ignore[arg-type]
            return CallOutcome(CallStatus.TIMED_OUT, None, None, elapsed)
        if job.error is not None:
            return CallOutcome(CallStatus.FAILED, None, job.error, elapsed)
        return CallOutcome(CallStatus.OK, job.value, None, elapsed)

    @property
    def abandoned_running(self) -> int:
        """Abandoned calls still running on their (retired) workers."""
        return sum(1 for j in self._late if not j.done.is_set())

    def close(self) -> None:
        """Retires the worker; abandoned ones exit when their call returns (daemon threads)."""
        self._worker.jobs.put(None)

    def _spawn(self) -> _Worker:
        worker = _Worker(f"{self._name}-worker")
        worker.start()
        return worker

    def _abandon(self, job: _Job[object]) -> None:
        self._worker.jobs.put(None)  # exits after the late call returns; its result is discarded
        self._late.append(job)
        self.abandoned_total += 1
        self._worker = self._spawn()
