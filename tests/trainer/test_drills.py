"""`--inject` drills: parsing refuses bad input; drills fire where they say."""

from __future__ import annotations

import pytest
import torch

from tolaria_trainer.drills import Drills, check_reachable, parse_drill
from tolaria_trainer.errors import DrillInvalid


def test_a_valid_drill_parses() -> None:
    d = parse_drill("slow-tamiyo@epoch=3")
    assert (d.kind.name, d.at, d.params["seconds"]) == ("slow-tamiyo", 3, 1.0)


def test_drill_options_override_defaults() -> None:
    assert parse_drill("slow-tamiyo@epoch=1,seconds=0.2").params["seconds"] == 0.2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("melt-gpu@epoch=1", "unknown drill 'melt-gpu'"),
        ("slow-tamiyo", "expected slow-tamiyo@epoch=N"),
        ("slow-tamiyo@step=3", "slow-tamiyo takes epoch=N"),
        ("lr-tamper@step=x", "step must be an integer"),
        ("lr-tamper@step=0", "step must be >= 1"),
        ("slow-tamiyo@epoch=-1", "epoch must be >= 0"),
        ("slow-tamiyo@epoch=1,speed=2", "unknown option 'speed'"),
        ("slow-tamiyo@epoch=1,seconds=-2", "seconds must be >= 0"),
    ],
)
def test_bad_drills_are_refused_naming_the_problem(raw: str, message: str) -> None:
    with pytest.raises(DrillInvalid, match=message):
        parse_drill(raw)


def test_a_drill_the_run_never_reaches_is_refused() -> None:
    with pytest.raises(DrillInvalid, match="never reached"):
        check_reachable([parse_drill("slow-tamiyo@epoch=10")], epochs=10, total_steps=100)
    with pytest.raises(DrillInvalid, match="never reached"):
        check_reachable([parse_drill("lr-tamper@step=101")], epochs=10, total_steps=100)
    check_reachable(
        [parse_drill("slow-tamiyo@epoch=9"), parse_drill("lr-tamper@step=100")],
        epochs=10,
        total_steps=100,
    )


def test_lr_tamper_writes_the_lr_behind_the_controller_once() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    drills = Drills([parse_drill("lr-tamper@step=5")])
    drills.before_lr_step(0, 4, opt)
    assert opt.param_groups[0]["lr"] == 0.1
    drills.before_lr_step(0, 5, opt)
    drills.before_lr_step(0, 5, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert drills.records[0].fired and drills.records[0].step == 5


def test_no_drills_is_a_no_op() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    Drills().before_lr_step(0, 1, opt)
    assert opt.param_groups[0]["lr"] == 0.1


def test_corrupt_snapshot_waits_for_the_durable_checkpoint_first_unless_settle_0() -> None:
    settled: list[str] = []

    def settle() -> str:
        settled.append("settled")
        return "checkpoint on disk"

    drills = Drills(
        specs=[
            parse_drill("corrupt-snapshot@step=3,spike=0"),
            parse_drill("corrupt-snapshot@step=4,spike=0,settle=0"),
        ]
    )
    drills.settle = settle
    drills.corrupt_newest = lambda every: "corrupted slot 0"
    drills.after_step(0, 3)
    drills.after_step(0, 4)
    assert settled == ["settled"]
    first, second = drills.records
    assert first.observed == "checkpoint on disk; corrupted slot 0"
    assert second.observed == "corrupted slot 0"
