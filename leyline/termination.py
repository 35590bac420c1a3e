"""The trainer container's last word in a pod: its termination message (R10.2).

`tolaria_trainer.worker --pod` writes one JSON object to `/dev/termination-log` when the run
ends, and the operator reads it back from the pod's container status to set the run's phase:

    {"phase": "<RunPhase name>", "exitCode": <int>, "reason": "<text, at most 3000 chars>"}

The phase names are Leyline's `RunPhase` names. A final phase (Succeeded, Failed, Halted,
Suspended) ends the attempt with that outcome; `Stopped` (a SIGTERM, usually the pod going
away) is not an outcome of the run. The kubelet keeps at most 4096 bytes of the message, so the
reason is cut to leave room for the rest. Defined once here so that writer and reader cannot
drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from leyline.v1.report_pb2 import RunPhase

REASON_LIMIT = 3000
"""Characters of the reason kept: the kubelet truncates the whole message at 4096 bytes."""
_PHASE_NAMES = frozenset(RunPhase.keys())


@dataclass(frozen=True)
class TerminationMessage:
    """The trainer's outcome as a pod reports it."""

    phase: RunPhase.ValueType
    exit_code: int
    reason: str = ""

    def encode(self) -> str:
        return json.dumps(
            {
                "phase": RunPhase.Name(self.phase),
                "exitCode": self.exit_code,
                "reason": self.reason[:REASON_LIMIT],
            }
        )

    @classmethod
    def decode(cls, text: str) -> TerminationMessage | None:
        """The message in `text`, or None when it is not one (a crash's log tail, garbage)."""
        try:
            doc = json.loads(text)
        except (ValueError, TypeError):
            return None
        if not isinstance(doc, dict):
            return None
        name = doc.get("phase")
        if not isinstance(name, str) or name not in _PHASE_NAMES:
            return None
        code = doc.get("exitCode", 0)
        reason = doc.get("reason", "")
        return cls(
            phase=RunPhase.Value(name),
            exit_code=code if isinstance(code, int) and not isinstance(code, bool) else 0,
            reason=reason[:REASON_LIMIT] if isinstance(reason, str) else "",
        )
