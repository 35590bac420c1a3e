"""Turns pydantic validation errors into `path: rule` lines users can act on.

The path is the manifest's own spelling (`spec.training.epochs`), the rule is
short and stated as a requirement (`must be >= 1`), so the same manifest
refused by the Kubernetes API server and by `tolaria run` names the same field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from leyline.spec.base import RuleViolation


@dataclass(frozen=True)
class FieldError:
    """One refused field: where, and which rule it broke."""

    path: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}"


def _rule_text(err: ErrorDetails) -> str:
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    simple = {
        "missing": "is required",
        "extra_forbidden": "unknown field",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be a boolean",
        "bool_parsing": "must be a boolean",
        "string_type": "must be a string",
        "dict_type": "must be an object",
        "model_type": "must be an object",
        "model_attributes_type": "must be an object",
        "list_type": "must be a list",
        "tuple_type": "must be a list",
        "frozen_instance": "cannot be changed",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    if kind == "string_too_short":
        return f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} items"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "value_error" and isinstance(ctx.get("error"), RuleViolation):
        return str(ctx["error"].rule.message)
    message = err["msg"]
    return message.removeprefix("Value error, ")


def _path(err: ErrorDetails, prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    for item in err["loc"]:
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and isinstance(ctx.get("error"), RuleViolation):
        parts.append(ctx["error"].rule.field)
    return ".".join(parts) if parts else "(root)"


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    """The errors of `exc` as `FieldError`s, in pydantic's order."""
    return [FieldError(_path(err, prefix), _rule_text(err)) for err in exc.errors()]
