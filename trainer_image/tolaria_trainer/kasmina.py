"""Kasmina without seeds: the seed manager used until morphogenetic seeds arrive.

It satisfies the `SeedManager` protocol so the hook always has someone to
apply seed and pause commands to. Pauses are accepted (nothing to pause);
seed operations are refused with a reason, which the hook reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from leyline import AdaptationCommand, CommandType, SeedOperation, SeedState
from tolaria_trainer.protocols import JsonDict


class SeedOperationRefused(ValueError):
    """Kasmina will not perform this seed operation; the hook records why."""


class NullSeedManager:
    """A Kasmina with no seeds."""

    def apply_command(self, command: AdaptationCommand, *, deadline_ns: int) -> str:
        del deadline_ns
        if command.command_type == CommandType.COMMAND_PAUSE:
            return "pause: no seeds to pause"
        if command.command_type == CommandType.COMMAND_SEED:
            op = SeedOperation.Name(command.seed_operation.operation)
            raise SeedOperationRefused(f"{op}: this run has no seed manager with seeds")
        return f"{CommandType.Name(command.command_type)}: nothing for Kasmina to do"

    def export_seed_states(self) -> Sequence[SeedState]:
        return ()

    def state_dict(self) -> JsonDict:
        return {"seeds": []}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state
