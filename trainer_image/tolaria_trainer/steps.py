"""Forward, loss, backward and the optimizer step, with accumulation and AMP.

`StepRunner` owns the mechanics of one micro-batch and one optimizer step;
the loop owns their order. Gradients accumulate over
`gradientAccumulationSteps` micro-batches (the loss is divided so the step
sees the mean). With fp16 autocast a GradScaler scales the loss and unscales
once per optimizer step, not per micro-batch (the Esper prototype's bug).
Losses stay on the device and are summed there: no host sync per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from tolaria_trainer.data import Batch
from tolaria_trainer.device import ExecutionPlan

logger = logging.getLogger(__name__)


@dataclass
class EpochLosses:
    """Device-side running sums for one epoch (read with one sync at epoch end)."""

    total: Tensor
    count: int = 0

    def mean(self) -> float:
        return float(self.total.item() / self.count) if self.count else float("nan")


class StepRunner:
    """Runs micro-batches and optimizer steps for one model."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: Callable[[], torch.optim.Optimizer],
        plan: ExecutionPlan,
        accumulation_steps: int,
        on_compile_fallback: Callable[[str], None],
    ) -> None:
        self.model = model
        self._loss_fn = loss_fn
        self._optimizer = optimizer
        self._plan = plan
        self._accumulation = accumulation_steps
        self._on_compile_fallback = on_compile_fallback
        self._micro = 0
        self._step_loss = torch.zeros((), device=plan.device)
        self.scaler = torch.amp.GradScaler("cuda") if plan.use_grad_scaler else None
        self.loss_hook: Callable[[Tensor], Tensor] | None = None
        """Fire drills may change a loss before backward (loss-spike, nan); None in production."""
        self.losses = self.new_epoch()

    def new_epoch(self) -> EpochLosses:
        self._micro = 0
        self._step_loss.zero_()
        self.losses = EpochLosses(torch.zeros((), device=self._plan.device))
        return self.losses

    def forward_backward(self, batch: Batch) -> Tensor:
        """One micro-batch: forward, loss, backward. Returns the (detached) loss on the device."""
        self.model.train()
        with record_function("tolaria/forward"), self._plan.autocast():
            output = self._forward(batch.inputs)
        with record_function("tolaria/loss"), self._plan.autocast():
            loss = self._loss_fn(output, batch.targets)
        if self.loss_hook is not None:
            loss = self.loss_hook(loss)
        scaled = loss / self._accumulation
        with record_function("tolaria/backward"):
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()  # type: ignore[no-untyped-call]
            else:
                scaled.backward()  # type: ignore[no-untyped-call]
        detached = loss.detach().float()
        self.losses.total += detached
        self.losses.count += 1
        self._step_loss += detached
        self._micro += 1
        return detached

    def step_loss(self) -> float:
        """Mean loss of the micro-batches of the pending step (one host sync per step)."""
        return float(self._step_loss.item()) / max(1, self._micro)

    def grads_finite(self) -> bool:
        """Whether every gradient of the pending step is finite (skipped under a GradScaler,
        which handles inf/nan steps itself)."""
        if self.scaler is not None:
            return True
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all())

    @property
    def step_ready(self) -> bool:
        """Whether enough micro-batches have accumulated for an optimizer step."""
        return self._micro >= self._accumulation

    def optimizer_step(self) -> None:
        """Applies the accumulated gradients and clears them."""
        optimizer = self._optimizer()
        with record_function("tolaria/optimizer_step"):
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self._step_loss.zero_()

    def discard_gradients(self) -> None:
        """Drops a partial accumulation (end of epoch, an anomaly, a rolled-back window)."""
        self._optimizer().zero_grad(set_to_none=True)
        self._micro = 0
        self._step_loss.zero_()

    def _forward(self, inputs: Tensor) -> Tensor:
        try:
            return self.model(inputs)  # type: ignore[no-any-return]
        except Exception as err:
            original = getattr(self.model, "_orig_mod", None)
            if original is None:
                raise
            # torch.compile fails lazily, at the first call: fall back to eager for good.
            self._on_compile_fallback(f"{type(err).__name__}: {err}")
            self.model = original
            return self.model(inputs)  # type: ignore[no-any-return]

    @torch.no_grad()
    def evaluate(
        self,
        batches: Callable[[], object],
        accuracy_fn: Callable[[Tensor, Tensor], tuple[float, int]] | None,
        on_batch: Callable[[], None] | None = None,
    ) -> tuple[float, float]:
        """Mean loss and accuracy over the validation batches (accuracy nan without accuracy_fn)."""
        self.model.eval()
        total = torch.zeros((), device=self._plan.device)
        count = 0
        correct = 0.0
        seen = 0
        for batch in batches():  # type: ignore[attr-defined]
            with self._plan.autocast():
                output = self._forward(batch.inputs)
                loss = self._loss_fn(output, batch.targets)
            n = int(batch.targets.shape[0])
            total += loss.float() * n
            count += n
            if accuracy_fn is not None:
                c, k = accuracy_fn(output, batch.targets)
                correct += float(c)
                seen += k
            if on_batch is not None:
                on_batch()  # heartbeat: a long validation is not a stall
        mean = float(total.item() / count) if count else float("nan")
        accuracy = correct / seen if seen else float("nan")
        return mean, accuracy
