"""What a snapshot holds, and how its bytes map onto the live training state (R6.2).

`TrainingState` enumerates, in a fixed order, every tensor needed to continue
exactly (model parameters and buffers, optimizer state by stable parameter
name, torch and CUDA RNG states) and every JSON document (LR controller,
Tamiyo, Kasmina, data position, loop counters, numpy and python RNG, GradScaler,
detector, run history). `layout()` assigns each tensor an offset in a slot's
data region (64-byte aligned) and names the result with a fingerprint of the
model and optimizer configuration, so a crash-resumed trainer only restores a
snapshot of the same run shape.

Nothing here pickles: tensors are raw bytes described by a Leyline
`SnapshotManifest`, documents are JSON. Called by the snapshot writer (capture)
and the restorer (restore) on the training thread.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from leyline import StateComponent, StateDocument, TensorDtype, TensorEntry
from leyline.checksum import xxh3
from tolaria_trainer.errors import StateMismatch
from tolaria_trainer.protocols import JsonDict

ALIGN = 64
DTYPES: Mapping[torch.dtype, TensorDtype.ValueType] = {
    torch.float32: TensorDtype.TENSOR_DTYPE_FLOAT32,
    torch.float64: TensorDtype.TENSOR_DTYPE_FLOAT64,
    torch.float16: TensorDtype.TENSOR_DTYPE_FLOAT16,
    torch.bfloat16: TensorDtype.TENSOR_DTYPE_BFLOAT16,
    torch.int64: TensorDtype.TENSOR_DTYPE_INT64,
    torch.int32: TensorDtype.TENSOR_DTYPE_INT32,
    torch.int16: TensorDtype.TENSOR_DTYPE_INT16,
    torch.int8: TensorDtype.TENSOR_DTYPE_INT8,
    torch.uint8: TensorDtype.TENSOR_DTYPE_UINT8,
    torch.bool: TensorDtype.TENSOR_DTYPE_BOOL,
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}

DocumentSource = tuple[Callable[[], JsonDict], Callable[[Mapping[str, Any]], None]]
"""(save, load) of one JSON document."""


@dataclass(frozen=True)
class LiveTensor:
    """One tensor of the live state and where it goes in a slot."""

    name: str
    component: StateComponent.ValueType
    tensor: torch.Tensor
    offset: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def entry(self) -> TensorEntry:
        return TensorEntry(
            name=self.name,
            dtype=DTYPES[self.tensor.dtype],
            shape=list(self.tensor.shape),
            offset=self.offset,
            nbytes=self.nbytes,
            component=self.component,
        )


@dataclass(frozen=True)
class Layout:
    """The tensors of one capture, their offsets, and the bytes they need."""

    tensors: tuple[LiveTensor, ...]
    data_bytes: int
    fingerprint: str


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _rng_documents() -> DocumentSource:
    def save() -> JsonDict:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        return {
            "python": [version, list(internal), gauss],
            "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        }

    def load(doc: Mapping[str, Any]) -> None:
        version, internal, gauss = doc["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = doc["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

    return save, load


class TrainingState:
    """The registry of everything a snapshot captures; see the module docstring."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: Callable[[], torch.optim.Optimizer],
        parameter_names: Callable[[], Mapping[str, torch.nn.Parameter]],
        documents: Mapping[str, tuple[StateComponent.ValueType, DocumentSource]],
    ) -> None:
        self._model = model
        self._optimizer = optimizer
        self._names = parameter_names
        self._documents: dict[str, tuple[StateComponent.ValueType, DocumentSource]] = {
            "rng": (StateComponent.STATE_COMPONENT_RNG, _rng_documents()),
            **documents,
        }
        self.unverified_reason = ""
        """Non-empty while the live state may hold bytes of a restore that did not finish
        (R13.2): nothing may be captured, persisted or stepped from it until a later restore
        succeeds. The reason says what broke."""

    @property
    def verified(self) -> bool:
        """The live state is whole: the initial state, trained state, or a finished restore."""
        return not self.unverified_reason

    # -- identity ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Model tensors (names, dtypes, shapes), optimizer class and group ids, as hex xxh3.

        Optimizer *state* is not part of it: a fresh process has none yet and
        must still recognise its own run's snapshots (crash resume).
        """
        parts = [
            f"{name}:{t.dtype}:{tuple(t.shape)}"
            for name, t in self._model.state_dict(keep_vars=True).items()
        ]
        opt = self._optimizer()
        parts.append(type(opt).__name__)
        parts += [str(g.get("group_id", i)) for i, g in enumerate(opt.param_groups)]
        return f"{xxh3('|'.join(parts).encode()):016x}"

    # -- tensors -------------------------------------------------------------------------------
    def _optimizer_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        state = self._optimizer().state
        for name, param in sorted(self._names().items()):
            for key, value in sorted(state.get(param, {}).items()):
                if isinstance(value, torch.Tensor):
                    yield f"optimizer/{name}/{key}", value

    def live_tensors(self) -> list[tuple[str, StateComponent.ValueType, torch.Tensor]]:
        """Every tensor to capture, in layout order (model, optimizer, RNG)."""
        out: list[tuple[str, StateComponent.ValueType, torch.Tensor]] = [
            (f"model/{name}", StateComponent.STATE_COMPONENT_MODEL, t.detach())
            for name, t in self._model.state_dict(keep_vars=True).items()
        ]
        out += [
            (name, StateComponent.STATE_COMPONENT_OPTIMIZER, t.detach())
            for name, t in self._optimizer_tensors()
        ]
        out.append(("rng/torch_cpu", StateComponent.STATE_COMPONENT_RNG, torch.get_rng_state()))
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out.append((f"rng/cuda_{i}", StateComponent.STATE_COMPONENT_RNG, s))
        for name, _, t in out:
            if t.dtype not in DTYPES:
                raise StateMismatch(f"{name}: dtype {t.dtype} cannot be snapshotted")
        return out

    def forward_mutable(self) -> frozenset[str]:
        """Names of captured tensors that a forward pass changes in place: the model's buffers
        (BatchNorm statistics, counters). A capture must copy them before the next forward."""
        state_keys = self._model.state_dict(keep_vars=True).keys()
        buffers = {name for name, _ in self._model.named_buffers()}
        return frozenset(f"model/{k}" for k in state_keys if k in buffers)

    def layout(self) -> Layout:
        """Offsets for the current tensors (recomputed per capture: the optimizer state grows)."""
        offset = 0
        placed = []
        for name, component, tensor in self.live_tensors():
            placed.append(LiveTensor(name, component, tensor, offset))
            offset = _aligned(offset + tensor.numel() * tensor.element_size())
        return Layout(tuple(placed), offset, self.fingerprint())

    def estimated_bytes(self) -> int:
        """Bytes a snapshot will need once the optimizer state exists (for the first attach)."""
        model = sum(
            _aligned(t.numel() * t.element_size()) for t in self._model.state_dict().values()
        )
        params = sum(_aligned(p.numel() * p.element_size()) for p in self._names().values())
        opt = self._optimizer()
        moments = {"Adam": 2, "AdamW": 2, "RMSprop": 3, "SGD": 1}.get(type(opt).__name__, 3)
        rng = 16 * 1024 * (1 + torch.cuda.device_count())
        return model + moments * params + rng

    def estimated_manifest_bytes(self, *, reserve: int = 0) -> int:
        """Bytes of a serialized `SnapshotManifest` once the optimizer state exists, plus
        `reserve` for documents that grow (the run history): what a slot's manifest region must
        hold. Tensor entries are estimated from their names; documents are saved now."""
        names = [f"model/{name}" for name in self._model.state_dict()]
        keys = {"Adam": 3, "AdamW": 3, "RMSprop": 3, "SGD": 1}.get(
            type(self._optimizer()).__name__, 4
        )
        names += [f"optimizer/{name}/exp_avg_sq" for name in self._names() for _ in range(keys)]
        entries = sum(len(name) + 48 for name in names) + 64 * (2 + torch.cuda.device_count())
        documents = sum(len(doc.json) + len(doc.name) + 16 for doc in self.documents())
        return entries + documents + reserve + 4096

    # -- documents -----------------------------------------------------------------------------
    def documents(self) -> list[StateDocument]:
        """The JSON documents, saved now (call on the training thread at the capture point)."""
        return [
            StateDocument(component=component, name=name, json=json.dumps(save()).encode())
            for name, (component, (save, _)) in self._documents.items()
        ]

    def parse_documents(self, documents: Iterable[StateDocument]) -> dict[str, Any]:
        """Parses every document of a snapshot without loading any (the all-or-nothing
        restore's check before it touches live state). Refuses an unknown document, a missing
        one and JSON that does not parse, naming the document."""
        parsed: dict[str, Any] = {}
        for doc in documents:
            if doc.name not in self._documents:
                raise StateMismatch(f"snapshot document {doc.name!r} is unknown to this trainer")
            try:
                parsed[doc.name] = json.loads(doc.json)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise StateMismatch(f"snapshot document {doc.name!r} is not JSON: {err}") from err
        missing = sorted(set(self._documents) - set(parsed))
        if missing:
            raise StateMismatch(f"snapshot lacks documents {missing}")
        return parsed

    def load_parsed(self, parsed: Mapping[str, Any], *, skip: frozenset[str] = frozenset()) -> None:
        """Loads documents `parse_documents` returned, except `skip` (kept live)."""
        for name, doc in parsed.items():
            if name not in skip:
                self._documents[name][1][1](doc)

    def load_documents(
        self, documents: Iterable[StateDocument], *, skip: frozenset[str] = frozenset()
    ) -> list[str]:
        """Parses, then loads every document except `skip`; returns the names it found."""
        parsed = self.parse_documents(documents)
        self.load_parsed(parsed, skip=skip)
        return list(parsed)

    # -- restore -------------------------------------------------------------------------------
    def check_targets(self, entries: Iterable[TensorEntry]) -> None:
        """Checks that every saved tensor fits the live state, changing nothing (R13.2).

        Model tensors must exist with the same dtype and shape; optimizer state must belong
        to a parameter of the optimizer, and where the live optimizer already holds that
        state it must have the same dtype and shape. Raises `StateMismatch` naming the tensor.
        """
        model = self._model.state_dict(keep_vars=True)
        params = self._names()
        state = self._optimizer().state
        for entry in entries:
            dtype, shape = self._entry_type(entry)
            if entry.name.startswith("model/"):
                live = model.get(entry.name.removeprefix("model/"))
                if live is None:
                    raise StateMismatch(f"{entry.name}: not in the live model")
                self._same_type(entry, live, dtype, shape)
            elif entry.name.startswith("optimizer/"):
                pname, _, key = entry.name.removeprefix("optimizer/").rpartition("/")
                param = params.get(pname)
                if param is None:
                    raise StateMismatch(
                        f"{entry.name}: parameter {pname!r} is not in the optimizer"
                    )
                held = state.get(param, {}).get(key)
                if isinstance(held, torch.Tensor):
                    self._same_type(entry, held, dtype, shape)
            elif not entry.name.startswith("rng/"):
                raise StateMismatch(f"{entry.name}: unknown tensor family")

    def restore_targets(
        self, entries: Iterable[TensorEntry]
    ) -> list[tuple[TensorEntry, torch.Tensor]]:
        """Pairs each saved tensor with the live tensor it is copied into, making the
        optimizer's state exactly the snapshot's: state it lacks is created (a fresh process,
        a baseline taken before the first step), state the snapshot does not have is dropped.
        RNG states get fresh buffers (set after the copy). Call after `check_targets`; this
        mutates the optimizer's state.
        """
        entries = list(entries)
        self.check_targets(entries)
        model = self._model.state_dict(keep_vars=True)
        params = self._names()
        state = self._optimizer().state
        saved: dict[str, set[str]] = {}
        pairs = []
        for entry in entries:
            dtype, shape = self._entry_type(entry)
            if entry.name.startswith("model/"):
                target = model[entry.name.removeprefix("model/")].detach()
            elif entry.name.startswith("optimizer/"):
                pname, _, key = entry.name.removeprefix("optimizer/").rpartition("/")
                param = params[pname]
                saved.setdefault(pname, set()).add(key)
                slot = state.setdefault(param, {})
                if key not in slot or not isinstance(slot[key], torch.Tensor):
                    device = param.device if shape else torch.device("cpu")
                    slot[key] = torch.empty(shape, dtype=dtype, device=device)
                target = slot[key]
            else:
                target = torch.empty(shape, dtype=dtype)
            pairs.append((entry, target))
        for pname, param in params.items():
            held = state.get(param)
            if held is None:
                continue
            for key in [k for k, v in held.items() if isinstance(v, torch.Tensor)]:
                if key not in saved.get(pname, set()):
                    del held[key]
            if not held:
                del state[param]
        return pairs

    @staticmethod
    def _entry_type(entry: TensorEntry) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise StateMismatch(f"{entry.name}: unsupported dtype {entry.dtype}")
        return dtype, tuple(entry.shape)

    @staticmethod
    def _same_type(
        entry: TensorEntry, live: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> None:
        if live.dtype != dtype or tuple(live.shape) != shape:
            raise StateMismatch(
                f"{entry.name}: snapshot has {TensorDtype.Name(entry.dtype)}{list(shape)}, "
                f"live tensor is {live.dtype}{list(live.shape)}"
            )

    @staticmethod
    def apply_rng(pairs: Iterable[tuple[TensorEntry, torch.Tensor]]) -> None:
        """Sets torch and CUDA RNG states from their restored buffers."""
        for entry, tensor in pairs:
            if entry.name == "rng/torch_cpu":
                torch.set_rng_state(tensor)
            elif entry.name.startswith("rng/cuda_") and torch.cuda.is_available():
                torch.cuda.set_rng_state(tensor, int(entry.name.removeprefix("rng/cuda_")))
