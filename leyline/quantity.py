"""Kubernetes resource quantities (`4Gi`, `500m`, `2`): the one grammar that the manifest's
quantity fields, the generated CRD and the operator share (R10.1).

`leyline.spec` puts `QUANTITY_PATTERN` on every quantity field, and so into the CRD's
`pattern`; `parse_quantity` accepts exactly the strings that pattern matches; the operator
reads byte sizes with `parse_bytes` and writes them with `format_quantity`. Pure functions on
strings: no Kubernetes client, no I/O. Nothing outside this module may write a quantity regex
or a suffix table (`tests/leyline/test_single_definitions.py` fails when one appears).

The grammar is the subset of Kubernetes' that manifests need: a non-negative decimal number
(no sign, no exponent) with an optional binary (`Ki`..`Ei`), decimal (`k`..`E`) or milli
(`m`) suffix.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL = ("k", "M", "G", "T", "P", "E")
MILLI = "m"

FACTORS: dict[str, Fraction] = {
    **{suffix: Fraction(1024 ** (power + 1)) for power, suffix in enumerate(_BINARY)},
    **{suffix: Fraction(1000 ** (power + 1)) for power, suffix in enumerate(_DECIMAL)},
    MILLI: Fraction(1, 1000),
}
"""What each suffix multiplies the number by; no suffix multiplies by 1."""

QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(" + "|".join(FACTORS) + r")?$"
"""A Kubernetes resource quantity such as `4Gi`, `500m`, `2` (the CRD's `pattern`)."""

_QUANTITY = re.compile(QUANTITY_PATTERN)

_FORMAT_UNITS = ("Gi", "Mi", "Ki")
"""The suffixes `format_quantity` writes, largest first."""


def parse_quantity(text: str) -> Fraction:
    """The exact value of a quantity: `4Gi` -> 4294967296, `500m` -> 1/2, `1.5k` -> 1500.

    Accepts exactly the strings `QUANTITY_PATTERN` matches (the whole string: no surrounding
    whitespace, no trailing newline); raises `ValueError` naming the text otherwise.
    """
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a quantity (e.g. 4Gi, 500M, 1073741824)")
    number, suffix = Fraction(match.group(1)), match.group(3)
    return number * FACTORS[suffix] if suffix else number


def parse_bytes(text: str) -> int:
    """Whole bytes in a quantity (`4Gi`, `500M`, `1073741824`), a fraction of a byte dropped.

    Raises `ValueError` for what `parse_quantity` refuses and for a milli quantity (`500m`
    is a CPU amount, not a byte size).
    """
    if text.endswith(MILLI):
        raise ValueError(f"{text!r} is not a byte quantity (milli is for CPU)")
    try:
        return int(parse_quantity(text))
    except ValueError as err:
        raise ValueError(f"{text!r} is not a byte quantity") from err


def format_quantity(nbytes: int) -> str:
    """`nbytes` in the largest of Gi, Mi, Ki that divides it exactly (`4Gi`, `1088Mi`), else
    plain bytes (`1000`); `parse_bytes` reads it back to `nbytes`. Raises `ValueError` when
    `nbytes` is negative (quantities have no sign)."""
    if nbytes < 0:
        raise ValueError(f"{nbytes} bytes: a quantity cannot be negative")
    for suffix in _FORMAT_UNITS:
        factor = int(FACTORS[suffix])
        if nbytes % factor == 0:
            return f"{nbytes // factor}{suffix}"
    return str(nbytes)
