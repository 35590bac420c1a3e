"""Kubernetes quantities: the manifest's quantity fields and `leyline.quantity`'s parsers accept
and refuse the same strings (byte sizes with `parse_bytes`, which refuses milli, CPU with
`parse_quantity`), and the operator's byte sizes round-trip (R10.1)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from leyline.quantity import (
    BYTES_PATTERN,
    QUANTITY_PATTERN,
    format_quantity,
    parse_bytes,
    parse_quantity,
)
from leyline.spec import CheckpointVolumeSpec, PodSpec, ResourcesSpec

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

FIELD_MAX_LENGTH = 32
"""The quantity fields' `max_length`: longer strings are refused for their length alone."""

QUANTITY_FIELDS = {
    "resources.cpu": lambda text: ResourcesSpec(cpu=text),
    "resources.memory": lambda text: ResourcesSpec(memory=text),
    "checkpointVolume.sizeLimit": lambda text: CheckpointVolumeSpec(size_limit=text),
    "pod.shmSizeLimit": lambda text: PodSpec(shm_size_limit=text),
}
"""Every manifest field that takes a quantity, built from one string."""
BYTE_FIELDS = {"resources.memory", "checkpointVolume.sizeLimit", "pod.shmSizeLimit"}
"""The fields that take a byte size (no milli suffix)."""
NONZERO_FIELDS = {"checkpointVolume.sizeLimit", "pod.shmSizeLimit"}
"""Size limits of emptyDirs, where 0 would mean "no limit" to the kubelet."""


def parses(text: str, field: str = "resources.cpu") -> bool:
    """Whether the parser the operator uses for `field` reads `text` as a value it may take."""
    try:
        value = parse_bytes(text) if field in BYTE_FIELDS else parse_quantity(text)
    except ValueError:
        return False
    return value > 0 or field not in NONZERO_FIELDS


def spec_accepts(field: str, text: str) -> bool:
    try:
        QUANTITY_FIELDS[field](text)
    except ValidationError:
        return False
    return True


SAMPLES = [
    "4Gi",
    "500m",
    "2",
    "1.5",
    "0",
    "1088Mi",
    "10k",
    "3E",
    "7Ei",
    "0.25Ti",
    "",
    "4gi",
    "4GiB",
    "4 Gi",
    " 4Gi",
    "4Gi ",
    "4Gi\n",
    "-1",
    "+1",
    "1e3",
    "1.",
    ".5",
    "Gi",
    "1K",
    "1Ki1",
    "lots-of-4Gi",
    "１",
]


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("field", sorted(QUANTITY_FIELDS))
@pytest.mark.parametrize("text", SAMPLES)
def test_manifest_fields_and_parser_accept_the_same_quantities(field: str, text: str) -> None:
    if field == "pod.shmSizeLimit" and text == "":
        assert spec_accepts(field, text)  # empty: the operator computes the size instead
        return
    assert spec_accepts(field, text) == parses(text, field)


@pytest.mark.req("R10.1")
@given(
    field=st.sampled_from(sorted(QUANTITY_FIELDS)),
    text=st.text(alphabet="0123456789.KMGTPEikm \n-+e", min_size=1, max_size=FIELD_MAX_LENGTH)
    | st.from_regex(QUANTITY_PATTERN, fullmatch=True).filter(lambda t: len(t) <= FIELD_MAX_LENGTH),
)
def test_no_string_is_accepted_by_one_and_refused_by_the_other(field: str, text: str) -> None:
    assert spec_accepts(field, text) == parses(text, field)


@pytest.mark.req("R10.1")
@pytest.mark.parametrize("field", sorted(BYTE_FIELDS))
def test_a_milli_byte_size_is_refused_where_it_is_written(field: str) -> None:
    """`shmSizeLimit: 100m` is a tenth of a byte: the API server's grammar accepts it, the
    operator could never size /dev/shm with it, so the manifest refuses it."""
    assert parses("100m")  # a valid Kubernetes quantity
    assert not spec_accepts(field, "100m")
    with pytest.raises(ValueError, match="milli is for CPU"):
        parse_bytes("100m")


@pytest.mark.req("R10.1")
def test_a_fraction_of_a_byte_rounds_up_as_kubernetes_does() -> None:
    assert parse_bytes("1.5") == 2
    assert parse_bytes("0.5Ki") == 512
    assert BYTES_PATTERN.replace("|m", "") == BYTES_PATTERN  # no milli alternative at all


@pytest.mark.req("R10.1")
def test_quantities_have_their_kubernetes_values() -> None:
    assert parse_quantity("4Gi") == 4 * GiB
    assert parse_quantity("500M") == 500_000_000
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("1.5k") == 1500
    assert parse_quantity("2") == 2


@pytest.mark.req("R10.1")
def test_byte_sizes_round_trip_in_the_largest_exact_binary_unit() -> None:
    assert parse_bytes("4Gi") == 4 * GiB
    assert parse_bytes("500M") == 500_000_000
    assert format_quantity(4 * GiB) == "4Gi"
    assert format_quantity(1088 * MiB) == "1088Mi"
    assert format_quantity(1000) == "1000"
    with pytest.raises(ValueError, match="not a byte quantity"):
        parse_bytes("500m")
    with pytest.raises(ValueError, match="not a byte quantity"):
        parse_bytes("lots-of-4Gi")


@pytest.mark.req("R10.1")
@given(st.integers(min_value=1, max_value=2**62))
def test_every_formatted_byte_size_parses_back_and_passes_the_manifest(nbytes: int) -> None:
    text = format_quantity(nbytes)
    assert parse_bytes(text) == nbytes
    assert spec_accepts("pod.shmSizeLimit", text)


@pytest.mark.req("R10.1")
def test_a_negative_byte_size_has_no_quantity() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        format_quantity(-1)
