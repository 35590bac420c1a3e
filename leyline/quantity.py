"""Kubernetes resource quantities (`4Gi`, `500m`, `2`): the one grammar that the manifest's
quantity fields, the generated CRD and the operator share (R10.1).

`leyline.spec` puts `QUANTITY_PATTERN` on every quantity field, and so into the CRD's
`pattern`; `parse_quantity` accepts exactly the strings that pattern matches; the operator
reads byte sizes with `parse_bytes` and writes them with `format_quantity`. Pure functions on
strings: no Kubernetes client, no I/O. Nothing outside this module may write a quantity regex
or a suffix table (`tests/leyline/test_single_definitions.py` fails when one appears).

The grammar is the subset of Kubernetes' that manifests need: a non-negative decimal number
(no sign, no exponent) with an optional binary (`Ki`..`Ei`), decimal (`k`..`E`) or milli
(`m`) suffix. Every string it accepts, the API server's `resource.ParseQuantity` accepts with
the same value (`tests/k8s` checks this against a real server's CEL `quantity()`).

Why a pattern and not CEL's `quantity()`: the CRD must install on the oldest Kubernetes the
chart supports (1.28), and a CRD's new rules may call the CEL quantity library only from 1.29
on (a 1.28 server compiles new rules without it and keeps it for rules a newer server stored),
so one rule calling it would make the whole CRD fail to install on 1.28. A pattern checks the
same grammar on every version, and byte sizes get their own (`BYTES_PATTERN`):
`shmSizeLimit: 100m` (a tenth of a byte, which the server would accept) is refused where it is
written.
"""

from __future__ import annotations

import math
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
BYTES_PATTERN = r"^([0-9]+(\.[0-9]+)?)(" + "|".join(s for s in FACTORS if s != MILLI) + r")?$"
"""A byte size such as `4Gi`, `500M`, `1073741824`: a quantity without the milli suffix, which
would make it a fraction of a byte (memory, `/dev/shm`, volume sizes)."""
HUGEPAGES_PATTERN = r"^hugepages-[0-9]+(" + "|".join(_BINARY) + r")?$"
"""The resource name of huge pages of one size (`hugepages-2Mi`, `hugepages-1Gi`)."""
COUNT_PATTERN = r"^[0-9]+$"
"""A whole count such as `2`: what extended resources (`nvidia.com/gpu`) take; the API server
refuses a fraction of one."""

_QUANTITY = re.compile(QUANTITY_PATTERN)
_BYTES = re.compile(BYTES_PATTERN)

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
    """Whole bytes in a byte size (`4Gi`, `500M`, `1073741824`), a fraction of a byte rounded
    up as Kubernetes' `Quantity.Value()` does.

    Accepts exactly the strings `BYTES_PATTERN` matches; raises `ValueError` otherwise, and
    names a milli quantity's mistake (`500m` is a CPU amount, not a byte size).
    """
    if _BYTES.fullmatch(text) is None:
        if _QUANTITY.fullmatch(text) is not None:
            raise ValueError(f"{text!r} is not a byte quantity (milli is for CPU)")
        raise ValueError(f"{text!r} is not a byte quantity")
    return math.ceil(parse_quantity(text))


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
