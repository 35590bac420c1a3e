"""Snapshots into real shared-memory slots and restores from them (R6.1, R6.2)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from leyline import StateComponent
from leyline.shm import SLOT_DYNAMIC_AT, ControlBlock, Slot
from leyline.spec import SnapshotSpec
from tolaria_trainer.recovery import snapshots
from tolaria_trainer.recovery.restore import NothingToRestore, Restorer
from tolaria_trainer.recovery.snapshots import SnapshotWriter
from tolaria_trainer.state import TrainingState


class Counter:
    """A JSON document source: one number that training changes."""

    def __init__(self) -> None:
        self.value = 0
        self.refuse = False
        """Makes `load` fail as a component whose loader rejects its document would."""

    def save(self) -> dict[str, Any]:
        return {"value": self.value}

    def load(self, doc: Mapping[str, Any]) -> None:
        if self.refuse:
            raise KeyError("value")
        self.value = int(doc["value"])


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOLARIA_SHM_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def rig(shm: Path) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    yield from _rig(
        shm, torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    )


@pytest.fixture
def bn_rig(shm: Path) -> Iterator[dict[str, Any]]:
    """A model with buffers the forward changes (BatchNorm running statistics)."""
    torch.manual_seed(0)
    yield from _rig(
        shm,
        torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3)
        ),
    )


def _rig(shm: Path, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = dict(model.named_parameters())
    counter = Counter()
    state = TrainingState(
        model=model,
        optimizer=lambda: opt,
        parameter_names=lambda: names,
        documents={"loop": (StateComponent.STATE_COMPONENT_DATA, (counter.save, counter.load))},
    )
    control = ControlBlock.create(shm / "tolaria-t-ctl", 3, instance_id="test-snapshots")
    slots = [
        Slot.create(
            shm / f"tolaria-t-slot-{i}",
            i,
            1 << 20,
            1 << 16,
            prefault=True,
            instance_id="test-snapshots",
        )
        for i in range(3)
    ]
    commits: list[tuple[int, int]] = []

    def commit(slot: int, generation: int) -> str:
        commits.append((slot, generation))
        return ""

    writer = SnapshotWriter(
        state=state,
        slots=slots,
        control=control,
        spec=SnapshotSpec(),
        commit=commit,
        run_id="t",
        window=10,
    )
    yield {
        "model": model,
        "opt": opt,
        "state": state,
        "writer": writer,
        "slots": slots,
        "control": control,
        "counter": counter,
        "commits": commits,
    }
    writer.fence()
    for slot in slots:
        slot.close()
    control.close()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(4, 8)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def snapshot_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"m/{k}": v.clone() for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"o/{id(p)}/{k}"] = v.clone()
    return out


@pytest.mark.req("R6.1")
def test_a_restore_brings_back_model_optimizer_documents_and_rng_bit_for_bit(
    rig: dict[str, Any],
) -> None:
    model, opt, writer, counter = rig["model"], rig["opt"], rig["writer"], rig["counter"]
    train_step(model, opt)
    counter.value = 7
    before = snapshot_of(model, opt)
    rng = torch.get_rng_state()
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    for _ in range(3):
        train_step(model, opt)
    counter.value = 99
    random.random()
    restored = Restorer(state=rig["state"], control=rig["control"]).restore(
        rig["slots"], max_step=4, budgets_ms=(150, 250, 100)
    )
    after = snapshot_of(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert counter.value == 7 and restored.global_step == 1 and restored.batch_index == 1
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.phase for p in restored.phases] == [1, 2, 3]


@pytest.mark.req("R6.1")
def test_buffers_a_forward_changes_while_the_copy_runs_are_captured_as_they_were(
    bn_rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy overlaps the next forward, which updates BatchNorm statistics in place: the
    snapshot still holds them as they were at the capture point, like every other tensor."""
    model, opt, writer = bn_rig["model"], bn_rig["opt"], bn_rig["writer"]
    train_step(model, opt)
    before = snapshot_of(model, opt)
    forward_done = threading.Event()
    real_copy = snapshots.copy_hashing

    def copy_after_the_forward(*args: Any, **kwargs: Any) -> int:
        forward_done.wait(timeout=30)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(snapshots, "copy_hashing", copy_after_the_forward)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    model(torch.randn(4, 8)).pow(2).mean().backward()  # the next step's forward and backward
    forward_done.set()
    writer.fence()
    assert not torch.equal(model[1].running_mean, before["m/1.running_mean"])
    Restorer(state=bn_rig["state"], control=bn_rig["control"]).restore(
        bn_rig["slots"], max_step=1, budgets_ms=(150, 250, 100)
    )
    after = snapshot_of(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.req("R6.2")
def test_python_and_numpy_rng_continue_as_if_nothing_happened(rig: dict[str, Any]) -> None:
    model, opt, writer = rig["model"], rig["opt"], rig["writer"]
    train_step(model, opt)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    Restorer(state=rig["state"], control=rig["control"]).restore(
        rig["slots"], max_step=1, budgets_ms=(150, 250, 100)
    )
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.req("R6.1")
def test_the_newest_snapshot_older_than_the_anomaly_is_restored(rig: dict[str, Any]) -> None:
    model, opt, writer, counter = rig["model"], rig["opt"], rig["writer"], rig["counter"]
    for step in (1, 2, 3):
        train_step(model, opt)
        counter.value = step
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
    writer.fence()
    restored = Restorer(state=rig["state"], control=rig["control"]).restore(
        rig["slots"], max_step=2, budgets_ms=(150, 250, 100)
    )
    assert restored.global_step == 2 and counter.value == 2


@pytest.mark.req("R6.2")
def test_a_corrupted_slot_is_rejected_and_the_next_older_restored(rig: dict[str, Any]) -> None:
    model, opt, writer, counter, slots = (
        rig["model"],
        rig["opt"],
        rig["writer"],
        rig["counter"],
        rig["slots"],
    )
    for step in (1, 2):
        train_step(model, opt)
        counter.value = step
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
    writer.fence()
    newest = max(slots, key=lambda s: s.header().generation)
    newest.data[100] ^= 0xFF
    restored = Restorer(state=rig["state"], control=rig["control"]).restore(
        slots, max_step=9, budgets_ms=(150, 250, 100)
    )
    assert restored.global_step == 1 and counter.value == 1
    assert [r.slot for r in restored.rejected] == [newest.index]
    assert "checksum" in restored.rejected[0].reason


@pytest.mark.req("R6.2")
def test_a_torn_header_is_never_restored(rig: dict[str, Any]) -> None:
    model, opt, writer, slots = rig["model"], rig["opt"], rig["writer"], rig["slots"]
    train_step(model, opt)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    (slot,) = [s for s in slots if s.header().visible]
    slot.seg.buf[SLOT_DYNAMIC_AT + 8 + 30] ^= 0x01  # inside the dynamic header
    with pytest.raises(NothingToRestore):
        Restorer(state=rig["state"], control=rig["control"]).restore(
            slots, max_step=9, budgets_ms=(150, 250, 100)
        )


def test_a_slot_rejected_by_the_sidecar_is_skipped(rig: dict[str, Any]) -> None:
    model, opt, writer, slots, control = (
        rig["model"],
        rig["opt"],
        rig["writer"],
        rig["slots"],
        rig["control"],
    )
    for step in (1, 2):
        train_step(model, opt)
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
    writer.fence()
    newest = max(slots, key=lambda s: s.header().generation)
    control.set_rejected(newest.index, newest.header().generation)
    restored = Restorer(state=rig["state"], control=control).restore(
        slots, max_step=9, budgets_ms=(150, 250, 100)
    )
    assert restored.global_step == 1


def test_the_writer_never_overwrites_a_pinned_generation(rig: dict[str, Any]) -> None:
    model, opt, writer, slots, control = (
        rig["model"],
        rig["opt"],
        rig["writer"],
        rig["slots"],
        rig["control"],
    )
    train_step(model, opt)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    (first,) = [s for s in slots if s.header().visible]
    control.set_pinned(first.index, first.header().generation)
    for step in range(2, 8):
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
        writer.fence()
    assert first.header().global_step == 1


def test_every_capture_is_committed_to_the_sidecar(rig: dict[str, Any]) -> None:
    model, opt, writer = rig["model"], rig["opt"], rig["writer"]
    train_step(model, opt)
    for step in (1, 2):
        writer.capture(global_step=step, epoch=0, batch_index=step, epoch_end=False)
    writer.fence()
    assert [g for _, g in rig["commits"]] == [1, 2]
    assert all(r.committed for r in writer.results)


def test_a_fresh_optimizer_gets_its_state_created_on_restore(rig: dict[str, Any]) -> None:
    model, opt, writer = rig["model"], rig["opt"], rig["writer"]
    train_step(model, opt)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    moments = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    opt.state.clear()
    Restorer(state=rig["state"], control=rig["control"]).restore(
        rig["slots"], max_step=9, budgets_ms=(150, 250, 100)
    )
    restored = opt.state[next(iter(model.parameters()))]
    assert all(torch.equal(moments[k], restored[k]) for k in moments)


def live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, bytes]:
    """Every live tensor's bytes, to prove a refused restore changed none of them."""
    out = {f"m/{k}": v.detach().numpy().tobytes() for k, v in model.state_dict().items()}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                out[f"o/{i}/{j}/{k}"] = v.detach().numpy().tobytes()
    return out


@pytest.mark.req("R13.2")
@pytest.mark.parametrize("where", ["first byte", "middle", "last byte", "manifest"])
def test_a_rejected_slot_leaves_every_live_tensor_and_the_optimizer_untouched(
    rig: dict[str, Any], where: str
) -> None:
    model, opt, writer, slots, counter = (
        rig["model"],
        rig["opt"],
        rig["writer"],
        rig["slots"],
        rig["counter"],
    )
    train_step(model, opt)
    counter.value = 1
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    (slot,) = [s for s in slots if s.header().visible]
    header = slot.header()
    if where == "manifest":
        slot.manifest_region[header.manifest_length // 2] ^= 0x10
    else:
        offset = {"first byte": 0, "middle": header.data_length // 2}.get(
            where, header.data_length - 1
        )
        slot.data[offset] ^= 0x10
    train_step(model, opt)
    counter.value = 2
    before = live_bytes(model, opt)
    rng = torch.get_rng_state()
    with pytest.raises(NothingToRestore):
        Restorer(state=rig["state"], control=rig["control"]).restore(
            slots, max_step=9, budgets_ms=(150, 250, 100)
        )
    assert live_bytes(model, opt) == before
    assert torch.equal(torch.get_rng_state(), rng) and counter.value == 2
    assert rig["state"].verified


@pytest.mark.req("R13.2")
def test_a_restore_that_fails_after_its_first_write_leaves_the_state_unverified_and_uncaptured(
    rig: dict[str, Any],
) -> None:
    model, opt, writer, slots, counter = (
        rig["model"],
        rig["opt"],
        rig["writer"],
        rig["slots"],
        rig["counter"],
    )
    train_step(model, opt)
    writer.capture(global_step=1, epoch=0, batch_index=1, epoch_end=False)
    writer.fence()
    counter.refuse = True
    with pytest.raises(NothingToRestore) as refused:
        Restorer(state=rig["state"], control=rig["control"]).restore(
            slots, max_step=9, budgets_ms=(150, 250, 100)
        )
    assert "did not load" in refused.value.rejected[0].reason
    assert not rig["state"].verified
    writer.capture(global_step=2, epoch=0, batch_index=2, epoch_end=False)
    writer.fence()
    assert writer.results[-1].error.startswith("not captured")
    assert [s.header().global_step for s in slots if s.header().visible] == [1]


@pytest.mark.req("R13.4")
def test_restoring_a_snapshot_taken_before_the_first_step_empties_the_optimizer(
    rig: dict[str, Any],
) -> None:
    model, opt, writer = rig["model"], rig["opt"], rig["writer"]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    writer.capture(global_step=0, epoch=0, batch_index=0, epoch_end=False)  # the baseline
    writer.fence()
    for _ in range(3):
        train_step(model, opt)
    assert opt.state
    Restorer(state=rig["state"], control=rig["control"]).restore(
        rig["slots"], max_step=0, budgets_ms=(150, 250, 100)
    )
    assert not opt.state, "moments of steps the baseline never took were dropped"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in initial.items())
