"""The value names of a Leyline enum, for everything that lists them: metric label values,
CRD enum lists, manifest fields that take an enum by name.

Called by `leyline.spec` (`ProtoEnum`) and by the trainer's, the sidecar's and the operator's
metrics when they touch every label value at start. The one place that knows value 0 is the
reserved UNSPECIFIED/UNKNOWN (ARCHITECTURE "Design rules"); nothing else may filter an
enum's items itself (`tests/leyline/test_single_definitions.py` fails when it does). Never
spells a value name: the names come from the generated descriptor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class LeylineEnum(Protocol):
    """A generated protobuf enum (its `EnumTypeWrapper`), as far as names go."""

    def items(self) -> Iterable[tuple[str, int]]: ...


def enum_names(enum: LeylineEnum) -> list[str]:
    """The enum's value names in declaration order, without the reserved 0.

    `enum_names(EmergencyLevel)` -> `["EMERGENCY_LEVEL_MINOR", ..., "EMERGENCY_LEVEL_CRITICAL"]`.
    """
    return [name for name, number in enum.items() if number != 0]
