"""`spec.training`: what to train and how (task, data, optimizer, schedule)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from leyline.spec.base import ProtoEnum, Rule, SpecModel
from leyline.v1.runtime_pb2 import DeviceKind, LrShape, OptimizerKind, Precision

BUILTIN_TASKS = ("synthetic-mlp", "char-lm")
"""Tasks shipped with the trainer; anything else must be `module:function`."""

TASK_PATTERN = r"^(synthetic-mlp|char-lm|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"
"""Built-in task names or an importable `module:function` returning a Task."""


class ModelSpec(SpecModel):
    """`spec.training.model`: size of the built-in tasks' models."""

    hidden_size: int = Field(default=128, ge=1, le=65536)
    """Width of hidden layers (MLP) or of the embedding and recurrent state (char-lm)."""
    layers: int = Field(default=2, ge=1, le=64)
    """Hidden layers of the MLP, or stacked recurrent layers of the char-lm."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability between layers; 0 keeps the built-in runs deterministic to compare."""


class DataSpec(SpecModel):
    """`spec.training.data`: how much data the built-in tasks generate or read."""

    train_samples: int = Field(default=8192, ge=1)
    """Training examples per epoch (synthetic-mlp) or sequence windows (char-lm)."""
    validation_samples: int = Field(default=2048, ge=1)
    """Held-out examples, evaluated after every epoch outside the hook budget (R1.1)."""
    features: int = Field(default=32, ge=1, le=65536)
    """Input width of synthetic-mlp."""
    classes: int = Field(default=10, ge=2, le=65536)
    """Number of classes of synthetic-mlp."""
    sequence_length: int = Field(default=64, ge=2, le=4096)
    """Characters per char-lm window; the model predicts each next character."""
    shuffle: bool = True
    """Reshuffle the training set each epoch from the run seed (the order is reproducible)."""


class OptimizerSpec(SpecModel):
    """`spec.training.optimizer`: the host optimizer (R4 rebuilds it when seeds add parameters)."""

    kind: Annotated[int, ProtoEnum(OptimizerKind)] = OptimizerKind.adamw
    """Optimizer family; every one listed keeps its moments across rebuilds (R4.1)."""
    lr: float = Field(default=3e-3, gt=0.0, le=10.0)
    """Base learning rate of the host groups; seed groups start from 0.1x this (R3.3)."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """Decoupled for adamw, L2 for the others, as torch defines it."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """Momentum of sgd and rmsprop; ignored by adam and adamw."""
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    """First-moment decay of adam and adamw."""
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    """Second-moment decay of adam and adamw (and alpha of rmsprop)."""
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)
    """Denominator guard of adam, adamw and rmsprop."""


class GroupScheduleSpec(SpecModel):
    """One entry of `spec.training.schedule.groups`: a per-group override (R3.1)."""

    shape: Annotated[int, ProtoEnum(LrShape)] | None = None
    """Schedule shape of this group; unset keeps the run's shape. `frozen` pins the LR to 0."""
    lr_scale: float = Field(default=1.0, ge=0.0, le=1000.0)
    """Multiplier on the base LR for this group."""


class ScheduleSpec(SpecModel):
    """`spec.training.schedule`: the LR schedule the LR controller owns (R3)."""

    shape: Annotated[int, ProtoEnum(LrShape)] = LrShape.cosine
    """Shape for the host groups: constant, step, cosine, linear (decay to minLrRatio) or frozen."""
    warmup_epochs: float = Field(default=0.0, ge=0.0, le=1000.0)
    """Linear warmup from warmupStartRatio x LR, in epochs (fractions allowed)."""
    warmup_start_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of the base LR at the first warmup step."""
    min_lr_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    """Floor of cosine and linear decay as a fraction of the base LR."""
    step_epochs: float = Field(default=10.0, gt=0.0)
    """Period of the `step` shape, in epochs."""
    step_gamma: float = Field(default=0.5, gt=0.0, le=1.0)
    """Factor applied every stepEpochs by the `step` shape."""
    groups: dict[str, GroupScheduleSpec] = Field(default_factory=dict)
    """Per-group overrides keyed by the group ids a task declares (built-ins declare `host`)."""

    rules = (
        Rule(
            field="shape",
            message="seed_warmup is reserved for seed groups",
            cel="self.shape != 'seed_warmup'",
            holds=lambda s: s.shape != LrShape.seed_warmup,
        ),
    )


class TrainingSpec(SpecModel):
    """`spec.training`: the task and the loop around it."""

    task: str = Field(pattern=TASK_PATTERN, max_length=256)
    """`synthetic-mlp`, `char-lm`, or `module:function` returning a `tolaria_trainer.Task`;
    required, so a manifest that forgot its task is refused instead of training a toy model."""
    epochs: int = Field(default=10, ge=1, le=1_000_000)
    """Epochs to run; the end-of-epoch hook runs after each (R1.1)."""
    batch_size: int = Field(default=64, ge=1, le=1_048_576)
    """Examples per micro-batch."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step; the effective batch is batchSize x this."""
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    """Cap on optimizer steps per epoch; unset runs the whole training set."""
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    """Seeds python, numpy and torch (CPU and CUDA) so reruns see the same samples."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on CUDA; CPU is deterministic already)."""
    device: Annotated[int, ProtoEnum(DeviceKind)] = DeviceKind.auto
    """Where to train: auto picks cuda when torch sees a GPU."""
    precision: Annotated[int, ProtoEnum(Precision)] = Precision.fp32
    """bf16/fp16 autocast on CUDA; the CPU path always runs fp32."""
    compile: bool = True
    """torch.compile the model on CUDA (falls back to eager on failure); CPU runs eager."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA (`set_float32_matmul_precision('high')`)."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Model size of the built-in tasks; user tasks may read it too."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Data size of the built-in tasks; user tasks may read it too."""
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """The host optimizer."""
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """The LR schedule."""
