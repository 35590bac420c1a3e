"""What `tolaria run --resume` compares: the canonical form of `spec.training`.

Every snapshot and checkpoint records the canonical JSON of the manifest's `spec.training`
(`SnapshotManifest.training_spec_json`) and its digest (`manifest_digest`). Resuming a run
with a manifest whose training section differs would silently train something else from the
old state, so the comparison names each field that differs, as the user wrote it
(`spec.training.optimizer.lr`). The other sections (budgets, detection, telemetry, ...) guard
the run without changing what it computes, so they may change between resumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leyline.checksum import xxh3
from leyline.spec.training import TrainingSpec

PREFIX = "spec.training"


@dataclass(frozen=True)
class TrainingIdentity:
    """`spec.training` as canonical JSON bytes, and their xxh3-64 as 16 hex digits."""

    json: bytes
    digest: str


def training_identity(spec: TrainingSpec) -> TrainingIdentity:
    """The canonical form of `spec`: every field with its default filled in, camelCase keys,
    sorted, no whitespace; equal manifests give equal bytes whatever their YAML looked like."""
    doc = spec.model_dump(mode="json", by_alias=True)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return TrainingIdentity(raw, f"{xxh3(raw):016x}")


def training_differences(recorded: bytes, spec: TrainingSpec) -> list[str]:
    """`path: recorded -> now` for every field of `spec.training` that differs from the
    recorded canonical JSON; empty when they are the same training. Unreadable bytes are one
    difference naming the section."""
    try:
        old = json.loads(recorded.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{PREFIX}: the recorded training section is unreadable ({err})"]
    new = json.loads(training_identity(spec).json)
    out: list[str] = []
    _diff(old, new, PREFIX, out)
    return out


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            _diff(old.get(key), new.get(key), f"{path}.{key}", out)
        return
    if old != new:
        out.append(f"{path}: {json.dumps(old)} in the checkpoint, {json.dumps(new)} now")
