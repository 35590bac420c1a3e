"""The sidecar's background threads for slot work that must not run on an RPC thread:
`Verifier` hashes committed slots in commit order, `Persister` makes them durable one at a
time.

Started and stopped by the `Sidecar`; fed by the servicers (`submit` after a commit,
`schedule` for `PersistSnapshot` and `RequestCheckpoint`) and waited on only by
`RequestCheckpoint` (`Persister.wait`, bounded by the caller's deadline). Each thread top is
a boundary: one failing slot is logged and the thread carries on. Neither ever blocks the
trainer, and at shutdown a write still running after the grace period is abandoned, not
joined (the WAL keeps the store consistent).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from tolaria_sidecar.errors import PersistFailed
from tolaria_sidecar.slots import SlotManager
from tolaria_sidecar.values import PersistOutcome

logger = logging.getLogger(__name__)

RESULTS_KEPT = 64
"""Persist outcomes remembered by generation, for `RequestCheckpoint` waiters."""


class Verifier:
    """Hashes committed slots in the background, in commit order."""

    def __init__(self, slots: SlotManager) -> None:
        self._slots = slots
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="slot-verifier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, index: int, generation: int) -> None:
        self._queue.put((index, generation))

    def stop(self, timeout_s: float) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._slots.verify(*item)
            except Exception:  # boundary: one bad slot must not stop verification
                logger.exception("verification of slot %d generation %d failed", *item)


class Persister:
    """Runs durable writes one at a time; a newer request replaces a queued older one."""

    def __init__(self, slots: SlotManager) -> None:
        self._slots = slots
        self._cond = threading.Condition()
        self._queued: tuple[int, int] | None = None
        self._inflight: tuple[int, int] | None = None
        self._results: dict[int, PersistOutcome] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="persister", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._inflight is not None or self._queued is not None

    def schedule(self, index: int, generation: int) -> tuple[bool, str]:
        """Queues (index, generation); returns (scheduled, why not)."""
        with self._cond:
            if self._stopping:
                return False, "the sidecar is shutting down"
            if self._inflight is not None and self._inflight[1] == generation:
                return True, ""
            if self._queued is not None:
                if self._queued[1] > generation:
                    return False, f"newer generation {self._queued[1]} is already queued"
                if self._queued[1] < generation:
                    logger.info(
                        "persist of generation %d replaced by generation %d",
                        self._queued[1],
                        generation,
                    )
            self._results.pop(generation, None)
            self._queued = (index, generation)
            self._cond.notify_all()
            return True, ""

    def wait(self, generation: int, timeout_s: float) -> PersistOutcome | None:
        """The outcome of `generation`'s write, waiting up to `timeout_s`; None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while generation not in self._results:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._results[generation]

    def stop(self, timeout_s: float) -> bool:
        """Drops what is queued and waits up to `timeout_s` for the write in flight; returns
        False when it is still running (abandoned: the WAL keeps the store consistent)."""
        with self._cond:
            self._stopping = True
            self._queued = None
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._queued is None and not self._stopping:
                    self._cond.wait()
                if self._queued is None:
                    return
                item = self._inflight = self._queued
                self._queued = None
            outcome: PersistOutcome
            try:
                outcome = self._slots.persist(*item)
            except PersistFailed as err:
                outcome = err
            except Exception as err:  # boundary: the persister outlives any one write
                logger.exception("persist of slot %d generation %d crashed", *item)
                outcome = PersistFailed(item[0], item[1], f"{type(err).__name__}: {err}")
            with self._cond:
                self._inflight = None
                self._results[item[1]] = outcome
                while len(self._results) > RESULTS_KEPT:
                    del self._results[next(iter(self._results))]
                self._cond.notify_all()
