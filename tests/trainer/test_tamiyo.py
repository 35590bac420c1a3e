"""The default heuristic Tamiyo: hold, cut the LR on a plateau, pause on divergence."""

from __future__ import annotations

import json
import math

from leyline import SCHEMA_VERSION, CommandType, SystemStatePacket
from leyline.spec import TamiyoSpec
from tolaria_trainer.tamiyo import ACTION_HOLD, ANNOTATION_ACTION, HeuristicTamiyo, fallback_command


def decide(policy: HeuristicTamiyo, loss: float, epoch: int = 0):
    state = SystemStatePacket(
        version=SCHEMA_VERSION, current_epoch=epoch, validation_loss=loss, training_run_id="r"
    )
    return policy.decide(state, deadline_ns=0)


def test_an_improving_loss_holds() -> None:
    p = HeuristicTamiyo(TamiyoSpec())
    cmds = [decide(p, loss) for loss in (1.0, 0.8, 0.6)]
    assert all(c.command_type == CommandType.COMMAND_UNKNOWN for c in cmds)
    assert cmds[0].annotations[ANNOTATION_ACTION] == ACTION_HOLD
    assert all(c.version == SCHEMA_VERSION for c in cmds)


def test_a_plateau_asks_for_an_lr_cut() -> None:
    p = HeuristicTamiyo(TamiyoSpec(plateau_epochs=3))
    kinds = [decide(p, loss).command_type for loss in (1.0, 1.0, 1.0, 1.0)]
    assert kinds == [CommandType.COMMAND_UNKNOWN] * 3 + [CommandType.COMMAND_OPTIMIZER]


def test_the_cut_factor_is_the_spec_factor() -> None:
    p = HeuristicTamiyo(TamiyoSpec(plateau_epochs=1, lr_cut_factor=0.3))
    decide(p, 1.0)
    cmd = decide(p, 1.0)
    assert dict(cmd.optimizer_adjustment.hyperparameters) == {"lr_scale": 0.30000001192092896}


def test_cuts_stop_at_the_minimum_scale() -> None:
    p = HeuristicTamiyo(TamiyoSpec(plateau_epochs=1, lr_cut_factor=0.5, min_lr_scale=0.2))
    decide(p, 1.0)
    cuts = sum(decide(p, 1.0).command_type == CommandType.COMMAND_OPTIMIZER for _ in range(10))
    assert cuts == 2  # 0.5, 0.25; 0.125 would go below 0.2


def test_divergence_pauses_adaptation() -> None:
    p = HeuristicTamiyo(TamiyoSpec())
    decide(p, 1.0)
    assert decide(p, 2.0).command_type == CommandType.COMMAND_PAUSE
    assert decide(p, math.nan).command_type == CommandType.COMMAND_PAUSE


def test_state_round_trips_through_json() -> None:
    p = HeuristicTamiyo(TamiyoSpec(plateau_epochs=2))
    decide(p, 1.0)
    decide(p, 1.0)
    q = HeuristicTamiyo(TamiyoSpec(plateau_epochs=2))
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert (
        decide(q, 1.0).command_type == decide(p, 1.0).command_type == CommandType.COMMAND_OPTIMIZER
    )


def test_fallback_is_a_versioned_pause_with_its_reason() -> None:
    cmd = fallback_command("run", 4, "deadline 12 ms missed", 1)
    assert cmd.command_type == CommandType.COMMAND_PAUSE and cmd.version == SCHEMA_VERSION
    assert cmd.annotations["risk_reason"] == "deadline 12 ms missed" and cmd.issued_by == "tolaria"
