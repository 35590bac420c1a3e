"""torch.profiler around chosen epochs, hook included (R9.1).

Off by default; `spec.profiler.epochs` or `tolaria run --profile 0,3` names the
epochs. The profiled block covers the epoch's training steps and the
end-of-epoch hook, so the named ranges (tolaria/forward, loss, backward,
optimizer_step, lr_update, tamiyo_eval, kasmina_apply, snapshot, rollback)
all land in one Chrome trace per epoch: `<run>/traces/tolaria-epoch-<N>.json`.
In conservative mode the profiler stays off (R2.2).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from leyline.spec import ProfilerSpec

logger = logging.getLogger(__name__)


class EpochProfiler:
    """Profiles the epochs it was asked to and remembers the trace files."""

    def __init__(self, spec: ProfilerSpec, epochs: frozenset[int], trace_dir: Path) -> None:
        self._spec = spec
        self._epochs = epochs
        self._dir = trace_dir
        self.traces: list[Path] = []
        self.skipped: list[int] = []

    @contextlib.contextmanager
    def epoch(self, epoch: int, *, conservative: bool) -> Iterator[None]:
        """Wraps one epoch (training and hook); yields exactly once, even if the body raises."""
        if epoch not in self._epochs:
            yield
            return
        if conservative:
            self.skipped.append(epoch)
            logger.warning("epoch %d not profiled: conservative mode keeps the profiler off", epoch)
            yield
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        prof = profile(
            activities=activities,
            record_shapes=self._spec.record_shapes,
            profile_memory=self._spec.profile_memory,
        )
        with prof:
            yield
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"tolaria-epoch-{epoch}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        logger.info("epoch %d trace written to %s", epoch, path)
