"""The run's durable store as the sidecar opens it: the checkpoint directory's
`checkpoints.DurableStore`, refused at the edge when it cannot be used, and measured
(`TimedStore`) so each WAL append shows in the metrics.

Called once by the `Sidecar` as it is built (`open_store`); `TimedStore` then serves the
slot jobs' writes and loads on the persister and servicer threads. Opening may replay and
repair the WAL (`checkpoints.DurableStore`); nothing here writes a checkpoint itself, and an
unusable directory is `ConfigInvalid` naming `--checkpoint-dir`, never a half-open store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from leyline import CheckpointRecord
from tolaria_sidecar.checkpoints import DurableStore
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import CheckpointDirectoryLocked, ConfigInvalid, WalVersionUnsupported
from tolaria_sidecar.metrics import SidecarMetrics
from tolaria_sidecar.persist_guard import PersistGuard


def open_store(config: SidecarConfig, guard: PersistGuard) -> DurableStore:
    """Opens (creating the directory) the store of `config.checkpoint_dir`, holding its WAL
    lock; `ConfigInvalid` naming `--checkpoint-dir` when another sidecar holds it or the
    directory or its WAL cannot be used."""
    try:
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return DurableStore(
            config.checkpoint_dir,
            config.checkpoints,
            run_id=config.run_id,
            instance_id=config.instance_id,
            lineage_id=config.lineage_id,
            faults=guard,
        )
    except CheckpointDirectoryLocked as err:
        raise ConfigInvalid(
            "--checkpoint-dir",
            f"{err}: is another sidecar using {config.checkpoint_dir}?",
        ) from err
    except (OSError, WalVersionUnsupported) as err:
        raise ConfigInvalid(
            "--checkpoint-dir", f"cannot open {config.checkpoint_dir}: {err}"
        ) from err


class TimedStore:
    """The real store, feeding the WAL append time of each commit into the metrics."""

    def __init__(self, store: DurableStore, metrics: SidecarMetrics) -> None:
        self._store = store
        self._metrics = metrics

    def write(
        self,
        *,
        manifest: bytes,
        data: memoryview,
        epoch: int,
        global_step: int,
        snapshot_generation: int,
        manifest_digest: str = "",
    ) -> CheckpointRecord:
        appends = self._store.wal.appends
        try:
            return self._store.write(
                manifest=manifest,
                data=data,
                epoch=epoch,
                global_step=global_step,
                snapshot_generation=snapshot_generation,
                manifest_digest=manifest_digest,
            )
        finally:
            if self._store.wal.appends > appends:
                self._metrics.wal_append_seconds.observe(self._store.wal.last_append_ns / 1e9)

    def latest(self) -> CheckpointRecord | None:
        return self._store.latest()

    def committed(self) -> list[CheckpointRecord]:
        return self._store.committed()

    def load_latest(
        self,
        into: memoryview,
        *,
        accept: Callable[[CheckpointRecord, bytes], str | None] | None = None,
        max_step: int | None = None,
    ) -> tuple[CheckpointRecord, bytes, int]:
        return self._store.load_latest(into, accept=accept, max_step=max_step)

    @property
    def last_rejections(self) -> Sequence[tuple[CheckpointRecord, object]]:
        return self._store.last_rejections
