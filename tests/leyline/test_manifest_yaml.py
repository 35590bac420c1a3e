"""Reading manifest YAML: a key written twice is refused by its path and lines, never last-wins.

PyYAML keeps the last of two equal keys without a word, so `epochs: 500` above `epochs: 5`
would train 5 epochs. `parse_document` (behind `tolaria run`, `tolaria validate`, the trainer
worker and the sidecar) refuses such a file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from leyline.spec import ManifestInvalid, load_manifest, parse_document

TWICE = """\
apiVersion: tolaria.dev/v1alpha1
kind: TolariaRun
metadata:
  name: twice
spec:
  training:
    task: synthetic-mlp
    epochs: 500
    batchSize: 32
    epochs: 5
"""
"""`epochs` at lines 8 and 10 of `spec.training`."""

LAST_WINS = "YAML would silently keep only the last value"


def refusal(text: str) -> list[str]:
    with pytest.raises(ManifestInvalid) as info:
        parse_document(text, "run.yaml")
    return [str(e) for e in info.value.errors]


@pytest.mark.req("R10.1")
def test_a_key_written_twice_is_refused_naming_its_path_and_both_lines() -> None:
    assert refusal(TWICE) == [
        f"spec.training.epochs: duplicate key at line 10 (first at line 8); {LAST_WINS}"
    ]


def test_a_manifest_file_with_a_key_written_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(TWICE)
    with pytest.raises(ManifestInvalid, match=r"spec\.training\.epochs: duplicate key at line 10"):
        load_manifest(path)


def test_a_key_written_twice_in_a_flow_mapping_is_named_with_both_columns() -> None:
    assert refusal("spec:\n  training: {epochs: 5, epochs: 6}\n") == [
        f"spec.training.epochs: duplicate key at line 2 column 25 (first at column 14); {LAST_WINS}"
    ]


def test_a_key_written_twice_inside_a_list_item_is_named_with_its_index() -> None:
    text = (
        "spec:\n  pod:\n    tolerations:\n"
        "      - {key: a, operator: Exists}\n"
        "      - key: b\n        operator: Exists\n        key: c\n"
    )
    assert refusal(text) == [
        f"spec.pod.tolerations[1].key: duplicate key at line 7 (first at line 5); {LAST_WINS}"
    ]


def test_quoted_and_plain_spellings_of_a_key_are_the_same_key() -> None:
    assert refusal('metadata:\n  name: a\n  "name": b\n')[0].startswith("metadata.name: duplicate")


def test_every_key_written_twice_is_reported_at_once_in_file_order() -> None:
    text = "spec:\n  suspend: true\n  suspend: false\nkind: A\nkind: B\n"
    assert [line.split(":", 1)[0] for line in refusal(text)] == ["spec.suspend", "kind"]


def test_keys_merged_from_an_anchor_may_be_overridden() -> None:
    text = "base: &base {epochs: 5, batchSize: 8}\ntraining:\n  <<: *base\n  epochs: 6\n"
    assert parse_document(text, "run.yaml")["training"] == {"epochs": 6, "batchSize": 8}


def test_an_aliased_mapping_is_walked_once_and_not_reported_twice() -> None:
    text = "a: &m {x: 1, x: 2}\nb: *m\n"
    assert refusal(text) == [
        f"a.x: duplicate key at line 1 column 14 (first at column 8); {LAST_WINS}"
    ]


KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)
LEAVES = st.integers(-1000, 1000) | st.booleans() | KEYS
DOCUMENTS = st.dictionaries(
    KEYS,
    st.recursive(LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=6),
    min_size=1,
    max_size=4,
)


@given(doc=DOCUMENTS, data=st.data())
def test_any_mapping_reads_back_and_writing_one_of_its_keys_again_is_refused(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    assert parse_document(text, "run.yaml") == doc
    key = data.draw(st.sampled_from(sorted(doc)))
    again = text + yaml.safe_dump({key: 0})
    line = len(text.splitlines()) + 1
    (error,) = refusal(again)
    assert error.startswith(f"{key}: duplicate key at line {line} (first at line ")
