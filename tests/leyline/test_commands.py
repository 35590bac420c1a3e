"""The process contracts in Leyline are read back exactly by the processes that receive them."""

from __future__ import annotations

from pathlib import Path

import pytest

from leyline import RunPhase
from leyline.commands import SidecarCommand, TrainerCommand
from leyline.termination import REASON_LIMIT, TerminationMessage
from tolaria_sidecar.__main__ import parser as sidecar_parser
from tolaria_trainer.worker import build_parser as trainer_parser


@pytest.mark.req("R10.1")
def test_every_sidecar_flag_a_launcher_writes_is_parsed_back_by_the_sidecar() -> None:
    command = SidecarCommand(
        manifest="/etc/tolaria/run.yaml",
        socket="/run/tolaria/sidecar.sock",
        run_id="r1",
        checkpoint_dir="/var/lib/tolaria/checkpoints",
        control_address="0.0.0.0:7070",
        token_file="/var/run/secrets/tolaria/token",
        metrics_port=9464,
        metrics_address="0.0.0.0",
        cleanup_on_exit=True,
        remove_socket_dir=True,
        inject=("checkpoint-io-error@epoch=2",),
    )
    args = sidecar_parser().parse_args(command.args())
    assert (args.manifest, args.socket) == (Path(command.manifest), Path(command.socket))
    assert (args.run_id, args.checkpoint_dir) == ("r1", Path(command.checkpoint_dir))
    assert (args.control_address, args.token_file) == ("0.0.0.0:7070", Path(command.token_file))
    assert (args.metrics_port, args.metrics_address) == (9464, "0.0.0.0")
    assert args.cleanup_on_exit and args.remove_socket_dir
    assert args.inject == ["checkpoint-io-error@epoch=2"]


@pytest.mark.req("R10.1")
def test_every_trainer_flag_a_launcher_writes_is_parsed_back_by_the_worker() -> None:
    command = TrainerCommand(
        manifest="/etc/tolaria/run.yaml",
        workdir="/var/lib/tolaria/work",
        socket="/run/tolaria/sidecar.sock",
        attempt=3,
        log_format="rich",
        metrics_port=9400,
        metrics_fd=7,
        profile="0,3",
        verbose=True,
        pod=True,
        inject=("loss-spike@step=40",),
    )
    args = trainer_parser().parse_args(command.args())
    assert (args.manifest, args.workdir) == (Path(command.manifest), Path(command.workdir))
    assert (args.socket, args.attempt, args.log_format) == (command.socket, 3, "rich")
    assert (args.metrics_port, args.metrics_fd, args.profile) == (9400, 7, frozenset({0, 3}))
    assert args.verbose and args.pod
    assert [d.raw for d in args.inject] == ["loss-spike@step=40"]


@pytest.mark.req("R10.2")
@pytest.mark.parametrize("phase", [p for p in RunPhase.values() if p])
def test_a_termination_message_round_trips_every_phase(phase: int) -> None:
    message = TerminationMessage(phase, 3, "x" * (REASON_LIMIT + 50))
    decoded = TerminationMessage.decode(message.encode())
    assert decoded == TerminationMessage(phase, 3, "x" * REASON_LIMIT)
    assert len(message.encode().encode()) <= 4096, "the kubelet keeps 4096 bytes"


@pytest.mark.req("R10.2")
@pytest.mark.parametrize(
    "text",
    ["", "Traceback (most recent call last):", "[]", '{"phase": "Exploded"}', '{"phase": 3}'],
)
def test_anything_else_is_not_a_termination_message(text: str) -> None:
    assert TerminationMessage.decode(text) is None
