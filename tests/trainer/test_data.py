"""BatchPlan: the sample order is a pure function of (seed, epoch), resumable from any batch."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, TensorDataset

from tolaria_trainer.data import Batch, BatchPlan, derive_seed
from tolaria_trainer.errors import StateMismatch

CPU = torch.device("cpu")


def numbered(samples: int) -> TensorDataset:
    """Inputs carry their own sample index, so a batch tells which samples it holds."""
    index = torch.arange(samples)
    return TensorDataset(index.float().unsqueeze(1), index)


def plan(samples: int = 10, batch_size: int = 3, **options: object) -> BatchPlan:
    kwargs: dict[str, object] = {"seed": 7, "shuffle": True, "device": CPU} | options
    return BatchPlan(numbered(samples), batch_size, **kwargs)  # type: ignore[arg-type]


def samples_of(batches: list[Batch]) -> list[list[int]]:
    return [batch.targets.tolist() for batch in batches]


class ListDataset(Dataset[tuple[torch.Tensor, int]]):
    """A map-style dataset that is not a TensorDataset: items are (tensor, int)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), index


@pytest.mark.req("R6.2")
def test_same_seed_and_epoch_give_the_same_order() -> None:
    assert torch.equal(plan().order(3), plan().order(3))
    assert samples_of(list(plan().batches(3))) == samples_of(list(plan().batches(3)))


@pytest.mark.req("R6.2")
def test_order_differs_between_epochs() -> None:
    shuffled = plan(samples=100)
    assert not torch.equal(shuffled.order(0), shuffled.order(1))


@pytest.mark.req("R6.2")
def test_order_differs_between_seeds() -> None:
    assert not torch.equal(plan(samples=100, seed=1).order(0), plan(samples=100, seed=2).order(0))


@pytest.mark.req("R6.2")
def test_seed_and_epoch_are_mixed_not_added() -> None:
    # With `seed + epoch`, run 1's epoch 0 would replay run 0's epoch 1.
    assert derive_seed(0, "order", 1) != derive_seed(1, "order", 0)
    assert not torch.equal(plan(samples=100, seed=0).order(1), plan(samples=100, seed=1).order(0))


@pytest.mark.req("R6.2")
def test_order_ignores_the_global_rng_and_leaves_it_untouched() -> None:
    torch.manual_seed(1)
    first = plan(samples=100).order(0)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = plan(samples=100).order(0)
    list(plan(samples=100).batches(0))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.req("R6.2")
def test_every_sample_appears_once_per_epoch() -> None:
    visited = [i for batch in samples_of(list(plan(samples=10).batches(4))) for i in batch]
    assert sorted(visited) == list(range(10))


def test_last_partial_batch_holds_the_remainder() -> None:
    batches = list(plan(samples=10, batch_size=3).batches(0))
    assert [len(batch.targets) for batch in batches] == [3, 3, 3, 1]
    assert plan(samples=10, batch_size=3).num_batches() == 4


def test_drop_last_leaves_out_the_partial_batch() -> None:
    dropping = plan(samples=10, batch_size=3, drop_last=True)
    assert dropping.num_batches() == 3
    assert [len(batch.targets) for batch in dropping.batches(0)] == [3, 3, 3]


def test_unshuffled_plan_visits_samples_in_dataset_order() -> None:
    in_order = plan(samples=7, batch_size=3, shuffle=False)
    assert samples_of(list(in_order.batches(5))) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.req("R6.2")
def test_resume_from_start_yields_exactly_the_tail_of_a_full_pass() -> None:
    full = list(plan(samples=20, batch_size=3).batches(2))
    resumed = list(plan(samples=20, batch_size=3).batches(2, start=4))
    assert [b.index for b in resumed] == [b.index for b in full[4:]] == [4, 5, 6]
    for got, expected in zip(resumed, full[4:], strict=True):
        assert torch.equal(got.inputs, expected.inputs)
        assert torch.equal(got.targets, expected.targets)


@pytest.mark.req("R6.2")
def test_resume_at_the_end_of_an_epoch_yields_nothing() -> None:
    assert list(plan(samples=10, batch_size=3).batches(0, start=4)) == []


@pytest.mark.req("R6.2")
@pytest.mark.parametrize("start", [-1, 5])
def test_start_outside_the_epoch_is_refused_at_the_call(start: int) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        plan(samples=10, batch_size=3).batches(0, start=start)


@pytest.mark.req("R6.1a")
def test_skip_removes_exactly_those_batches() -> None:
    full = samples_of(list(plan(samples=20, batch_size=3).batches(1)))
    kept = list(plan(samples=20, batch_size=3).batches(1, skip={2, 3, 99}))
    assert [b.index for b in kept] == [0, 1, 4, 5, 6]
    assert samples_of(kept) == [full[i] for i in (0, 1, 4, 5, 6)]


@pytest.mark.req("R6.2")
@settings(max_examples=60, deadline=None)
@given(
    samples=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 1000),
    data=st.data(),
)
def test_a_resumed_pass_with_skips_is_the_full_pass_minus_what_was_left_out(
    samples: int, batch_size: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    shuffled = plan(samples=samples, batch_size=batch_size, seed=seed)
    total = shuffled.num_batches()
    start = data.draw(st.integers(0, total), label="start")
    skip = data.draw(st.sets(st.integers(0, total)), label="skip")
    full = samples_of(list(shuffled.batches(epoch)))
    resumed = list(shuffled.batches(epoch, start=start, skip=skip))
    assert sorted(i for batch in full for i in batch) == list(range(samples))
    expected = [i for i in range(start, total) if i not in skip]
    assert [b.index for b in resumed] == expected
    assert samples_of(resumed) == [full[i] for i in expected]


@pytest.mark.req("R6.1a")
def test_a_reshuffle_keeps_the_batches_before_it_and_permutes_the_same_samples_after() -> None:
    shuffled = plan(samples=40, batch_size=4, seed=3)
    full = samples_of(list(shuffled.batches(2)))
    again = samples_of(list(shuffled.batches(2, reshuffles=[(5, 0)])))
    assert again[:5] == full[:5]
    after = [i for batch in again[5:] for i in batch]
    assert sorted(after) == sorted(i for batch in full[5:] for i in batch)
    assert again[5:] != full[5:], "the rest of the epoch is batched differently"


@pytest.mark.req("R6.1a")
def test_a_reshuffle_is_reproducible_and_a_resume_inside_it_sees_the_same_batches() -> None:
    shuffled = plan(samples=40, batch_size=4, seed=3)
    first = samples_of(list(shuffled.batches(2, reshuffles=[(5, 0), (7, 1)])))
    resumed = samples_of(list(shuffled.batches(2, start=8, reshuffles=[(5, 0), (7, 1)])))
    assert resumed == first[8:]
    assert samples_of(list(shuffled.batches(2, reshuffles=[(5, 1)]))) != first


def test_a_general_dataset_batches_like_the_tensor_fast_path() -> None:
    general = BatchPlan(ListDataset(10), 4, seed=3, shuffle=True, device=CPU)
    fast = plan(samples=10, batch_size=4, seed=3)
    for got, expected in zip(general.batches(1), fast.batches(1), strict=True):
        assert got.index == expected.index
        assert torch.equal(got.inputs, expected.inputs)
        assert torch.equal(got.targets, expected.targets)


def test_a_tensor_dataset_without_exactly_inputs_and_targets_is_refused() -> None:
    three = TensorDataset(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="holds 3 tensors"):
        BatchPlan(three, 2, seed=0, shuffle=False, device=CPU)


@pytest.mark.req("R6.2")
def test_state_dict_is_json_and_names_what_the_order_depends_on() -> None:
    state = plan(samples=10, batch_size=3, seed=2**63 - 1).state_dict()
    assert json.loads(json.dumps(state)) == {
        "seed": 2**63 - 1,
        "shuffle": True,
        "batch_size": 3,
        "drop_last": False,
        "dataset_length": 10,
    }


@pytest.mark.req("R6.2")
def test_resuming_with_a_matching_plan_is_accepted() -> None:
    plan().load_state_dict(plan().state_dict())


@pytest.mark.req("R6.2")
def test_resuming_with_a_different_dataset_or_batch_size_is_refused() -> None:
    saved = plan(samples=10, batch_size=3).state_dict()
    with pytest.raises(StateMismatch, match=r"batch_size: saved 3 != live 4.*dataset_length"):
        plan(samples=12, batch_size=4).load_state_dict(saved)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_batches_arrive_on_the_plan_device(device: str) -> None:
    target = torch.device(device)
    batches = list(plan(samples=10, batch_size=4, device=target).batches(0))
    assert all(b.inputs.device.type == b.targets.device.type == target.type for b in batches)
    assert samples_of(batches) == samples_of(list(plan(samples=10, batch_size=4).batches(0)))
