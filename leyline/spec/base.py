"""Building blocks shared by every `TolariaRun` spec section.

`SpecModel` fixes the conventions of the manifest: camelCase keys, unknown
keys refused, frozen after validation, attribute docstrings as descriptions
(they become the CRD's `description`s). `ProtoEnum` lets a field take a
Leyline enum by name, so the CRD's enum list and the accepted values come from
the `.proto` source. `Rule` ties one cross-field check to its CEL twin so the
API server and `tolaria run` refuse the same manifests naming the same field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from leyline.enums import enum_names


class SpecModel(BaseModel):
    """Base of every manifest section."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    """Cross-field rules, checked here and emitted as CEL into the CRD."""

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.rules:
            if not rule.holds(self):
                raise RuleViolation(rule)
        return self


@dataclass(frozen=True)
class Rule:
    """A cross-field rule with its Python check and its CEL expression.

    `field` is the camelCase key the error names (the CRD's `fieldPath`); the
    CEL expression sees the section as `self`, exactly like the Python check.
    """

    field: str
    message: str
    cel: str
    holds: Callable[[Any], bool]


def cel_string(text: str) -> str:
    """`text` as a CEL string literal (single-quoted, backslashes and quotes escaped), so a
    Python regex can be handed to CEL's `matches` unchanged: both are RE2-compatible here."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class RuleViolation(ValueError):
    """Raised by `SpecModel` when a `Rule` fails; carries the field to name."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule.message)
        self.rule = rule


@dataclass(frozen=True)
class ProtoEnum:
    """`Annotated[int, ProtoEnum(OptimizerKind)]`: a Leyline enum written by name.

    Validates the value name, stores the number (code compares against
    `OptimizerKind.adamw`), serialises back to the name, and publishes the
    names as the JSON-schema (and so the CRD) enum list.
    """

    wrapper: Any  # a generated enum (EnumTypeWrapper at run time)
    strip: str = ""
    """For conventional proto enums: the value prefix dropped (and the rest lower-cased) in
    manifests, e.g. `EMERGENCY_LEVEL_MAJOR` is written `major`. Derived, never a table."""

    def names(self) -> list[str]:
        return [self.spell(n) for n in enum_names(self.wrapper)]

    def spell(self, proto_name: str) -> str:
        return proto_name.removeprefix(self.strip).lower() if self.strip else proto_name

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        names = self.names()
        numbers = {self.spell(n): int(self.wrapper.Value(n)) for n in enum_names(self.wrapper)}
        wrapper, spell = self.wrapper, self.spell

        def validate(value: object) -> int:
            if isinstance(value, str) and value in numbers:
                return numbers[value]
            raise PydanticCustomError(
                "leyline_enum", "must be one of: {expected}", {"expected": ", ".join(names)}
            )

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value: spell(str(wrapper.Name(value))),
                return_schema=core_schema.str_schema(),
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "enum": self.names()}
