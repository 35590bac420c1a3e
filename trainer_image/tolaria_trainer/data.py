"""Deterministic, resumable batching: which samples make up batch `i` of epoch `e` (R6.2).

The runtime builds one `BatchPlan` for the training set (shuffled) and one for
the validation set (in order) and the loop asks it for an epoch's batches. The
order of an epoch is a pure function of `(seed, epoch)`: it comes from a private
`torch.Generator` seeded from those two numbers only. So the data position a
snapshot has to hold is just `(epoch, batch index)`; a resumed or rolled-back
run calls `batches(epoch, start=index)` and sees exactly the samples it would
have seen, and a rollback that skips an offending window (R6.1a) passes those
batch indexes in `skip`.

A plan must never read or advance the global RNG (that would make the order
depend on how many dropout masks were drawn before), never spawn workers, and
never touch the disk: on the hot path it only indexes tensors and copies them
to the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset, default_collate

from tolaria_trainer.errors import StateMismatch

_SEED_BITS = 63
"""`torch.Generator.manual_seed` takes any 64-bit value; 63 bits keep it a non-negative int64."""


def derive_seed(seed: int, *labels: object) -> int:
    """A seed for one purpose, mixed from the run seed and labels (`"order", epoch`).

    Hashing keeps derived streams unrelated: `seed + epoch` would give run 1's
    epoch 0 the order of run 0's epoch 1. Stable across processes and Python
    versions (no `hash()`, which is salted per process).
    """
    text = ":".join(str(part) for part in (seed, *labels))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def generator_for(seed: int, *labels: object) -> torch.Generator:
    """A fresh CPU generator seeded by `derive_seed`; never the global one."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, *labels))
    return generator


@dataclass(frozen=True)
class Batch:
    """One batch, already on the run's device."""

    index: int
    """Batch index within the epoch: the data position snapshots record (R6.2)."""
    inputs: Tensor
    targets: Tensor
    samples: Tensor
    """The dataset indexes of its samples (int64, CPU): what a data anomaly is blamed on."""


class BatchPlan:
    """The batches of one dataset for any epoch, reproducibly and from any position.

    Checkpoint behavior: the plan has no mutable state, because the order of an
    epoch is recomputed from `(seed, epoch)`. `state_dict()` records what the
    order depends on, and `load_state_dict()` only checks that the live plan
    matches it, so that a resume with another seed, batch size or dataset is
    refused instead of silently seeing different samples.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        device: torch.device,
        drop_last: bool = False,
    ) -> None:
        """Checks the dataset once; raises ValueError for what could never be batched."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        length = _length_of(dataset)
        tensors: tuple[Tensor, Tensor] | None = None
        if isinstance(dataset, TensorDataset):
            if len(dataset.tensors) != 2:
                raise ValueError(
                    f"a TensorDataset must hold (inputs, targets); this one holds "
                    f"{len(dataset.tensors)} tensors"
                )
            tensors = (dataset.tensors[0], dataset.tensors[1])
        self._dataset = dataset
        self._tensors = tensors
        self._length = length
        self._batch_size = batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._device = device
        self._drop_last = drop_last

    @property
    def dataset_length(self) -> int:
        """Samples in the dataset (not all are used per epoch when drop_last is set)."""
        return self._length

    def num_batches(self, excluded: int = 0) -> int:
        """Batches per epoch (with `excluded` samples left out); the last one is partial
        unless drop_last."""
        length = self._length - excluded
        if self._drop_last:
            return length // self._batch_size
        return -(-length // self._batch_size)

    def order(self, epoch: int) -> Tensor:
        """The sample indexes of `epoch`, in visiting order (int64, on the CPU).

        Depends on `(seed, epoch)` only, never on the global RNG; identity order
        when the plan does not shuffle.
        """
        if not self._shuffle:
            return torch.arange(self._length)
        return torch.randperm(self._length, generator=generator_for(self._seed, "order", epoch))

    def batches(
        self,
        epoch: int,
        start: int = 0,
        skip: Collection[int] = (),
        reshuffles: Sequence[tuple[int, int]] = (),
        exclude: Collection[int] = (),
    ) -> Iterator[Batch]:
        """The batches of `epoch` from batch index `start`, leaving out the indexes in `skip`.

        Samples in `exclude` (dataset indexes quarantined by recovery, R13.3) are removed from
        the epoch's order before it is cut into batches; the caller changes `exclude` only at
        epoch boundaries, so batch positions within an epoch stay stable.

        Each `(first, nonce)` in `reshuffles` permutes the epoch's samples from batch `first`
        on again, with a generator seeded from `(seed, epoch, nonce)`: the same samples, other
        batches (the reshuffle replay policy). Applied in order, so a resume sees the same.

        `start` may equal `num_batches()` (an epoch resumed at its end yields
        nothing); outside `0..num_batches()` it raises ValueError at the call,
        not at the first `next()`. Indexes in `skip` that do not exist are
        ignored. Each batch is moved to the plan's device.
        """
        excluded = frozenset(exclude)
        total = self.num_batches(len(excluded & frozenset(range(self._length))))
        if not 0 <= start <= total:
            raise ValueError(f"start batch {start} is outside 0..{total} for this plan")
        return self._iterate(epoch, start, frozenset(skip), total, tuple(reshuffles), excluded)

    def state_dict(self) -> dict[str, Any]:
        """What the order depends on, JSON-serialisable, for snapshots and checkpoints."""
        return {
            "seed": self._seed,
            "shuffle": self._shuffle,
            "batch_size": self._batch_size,
            "drop_last": self._drop_last,
            "dataset_length": self._length,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuses a saved plan that would yield other samples; there is nothing to restore.

        Raises StateMismatch naming every field that differs (saved != live).
        """
        live = self.state_dict()
        differences = [
            f"{key}: saved {state.get(key)!r} != live {value!r}"
            for key, value in live.items()
            if state.get(key) != value
        ]
        if differences:
            raise StateMismatch(
                "batch plan does not match the saved one: " + "; ".join(differences)
            )

    def reshuffled_order(self, epoch: int, reshuffles: Sequence[tuple[int, int]]) -> Tensor:
        """`order(epoch)` with each reshuffle applied (see `batches`)."""
        order = self.order(epoch)
        for first, nonce in reshuffles:
            begin = min(first * self._batch_size, self._length)
            tail = order[begin:]
            generator = generator_for(self._seed, "reshuffle", epoch, nonce)
            order = torch.cat([order[:begin], tail[torch.randperm(len(tail), generator=generator)]])
        return order

    def _iterate(
        self,
        epoch: int,
        start: int,
        skip: frozenset[int],
        total: int,
        reshuffles: tuple[tuple[int, int], ...],
        excluded: frozenset[int] = frozenset(),
    ) -> Iterator[Batch]:
        order = self.reshuffled_order(epoch, reshuffles)
        if excluded:
            drop = torch.tensor(sorted(excluded), dtype=order.dtype)
            order = order[~torch.isin(order, drop)]
        samples = order
        if self._tensors is not None:
            # Index where the tensors live: one index copy per epoch, not per batch.
            order = order.to(self._tensors[0].device)
        size = self._batch_size
        for index in range(start, total):
            if index in skip:
                continue
            inputs, targets = self._gather(order[index * size : (index + 1) * size])
            yield Batch(
                index,
                self._to_device(inputs),
                self._to_device(targets),
                samples[index * size : (index + 1) * size],
            )

    def _gather(self, indexes: Tensor) -> tuple[Tensor, Tensor]:
        if self._tensors is not None:
            # Fast path: two vectorised index ops instead of a Python loop over samples.
            inputs, targets = self._tensors
            return inputs[indexes], targets[indexes]
        collated = default_collate([self._dataset[i] for i in indexes.tolist()])
        if not (isinstance(collated, list | tuple) and len(collated) == 2):
            raise ValueError(
                f"dataset items must be (input, target) pairs; collated a {type(collated).__name__}"
            )
        inputs, targets = collated
        if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
            raise ValueError(
                "dataset items must collate to tensors; got "
                f"({type(inputs).__name__}, {type(targets).__name__})"
            )
        return inputs, targets

    def _to_device(self, tensor: Tensor) -> Tensor:
        if tensor.device == self._device:
            return tensor
        if self._device.type == "cuda" and tensor.device.type == "cpu":
            # A pinned source lets the copy overlap the previous step's kernels; the
            # caching host allocator keeps the buffer alive until the copy is done.
            source = tensor if tensor.is_pinned() else tensor.pin_memory()
            return source.to(self._device, non_blocking=True)
        return tensor.to(self._device)


def _length_of(dataset: Dataset[Any]) -> int:
    length = getattr(dataset, "__len__", None)
    if length is None or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"BatchPlan needs a map-style dataset (__len__ and __getitem__); "
            f"got {type(dataset).__name__}"
        )
    return int(length())
