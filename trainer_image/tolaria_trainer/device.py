"""Device, precision and determinism set-up: the same code on CPU and CUDA.

CUDA-only features (autocast, GradScaler, TF32, torch.compile) are switched on
only when the run is on a CUDA device; the CPU path runs eager fp32. Called
once at start-up, never on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from leyline import DeviceKind, Precision
from leyline.spec import TrainingSpec
from tolaria_trainer.errors import DeviceUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionPlan:
    """What the run actually uses, after guarding CUDA-only options by device."""

    device: torch.device
    amp_dtype: torch.dtype | None
    use_grad_scaler: bool
    compile: bool
    tf32: bool

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        extras = (" compiled" if self.compile else "") + (" tf32" if self.tf32 else "")
        return f"{self.device} {amp}{extras}"


def plan_execution(spec: TrainingSpec) -> ExecutionPlan:
    """Resolves device and precision; refuses cuda without a GPU instead of silently using CPU."""
    has_cuda = torch.cuda.is_available()
    if spec.device == DeviceKind.cuda and not has_cuda:
        raise DeviceUnavailable(
            "spec.training.device: cuda requested but torch sees no CUDA device"
        )
    on_cuda = spec.device == DeviceKind.cuda or (spec.device == DeviceKind.auto and has_cuda)
    device = torch.device("cuda") if on_cuda else torch.device("cpu")
    amp: torch.dtype | None = None
    if on_cuda and spec.precision == Precision.bf16:
        amp = torch.bfloat16
    elif on_cuda and spec.precision == Precision.fp16:
        amp = torch.float16
    return ExecutionPlan(
        device=device,
        amp_dtype=amp,
        use_grad_scaler=amp is torch.float16,
        compile=on_cuda and spec.compile,
        tf32=on_cuda and spec.tf32,
    )


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seeds python, numpy and torch (CPU and CUDA) so reruns see the same samples."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def apply_process_settings(plan: ExecutionPlan) -> None:
    """Process-wide switches, set once (TF32)."""
    if plan.tf32:
        torch.set_float32_matmul_precision("high")


def maybe_compile(
    model: torch.nn.Module, plan: ExecutionPlan, on_fallback: Callable[[str], None]
) -> torch.nn.Module:
    """torch.compile on CUDA; any failure falls back to eager and is reported."""
    if not plan.compile:
        return model
    try:
        return torch.compile(model)  # type: ignore[return-value]
    except Exception as err:  # boundary: compile is an optimisation, never a reason to fail
        on_fallback(f"{type(err).__name__}: {err}")
        return model
