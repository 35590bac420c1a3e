"""What a person (rich) or a machine (JSON lines) sees while a run goes.

Both views show, per epoch: loss, validation loss and accuracy, hook p95, LR
and health; notable events (conservative mode, fallbacks, drills) as they
happen; and the final status with the report path. The JSON view writes one
object per line to stdout and nothing else, so it can be piped.
"""

from __future__ import annotations

import json
import math
import sys
from typing import IO, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from leyline import EpochRecord, HealthStatus, RunPhase, RunReport


class ProgressView(Protocol):
    def start(self, run_id: str, epochs: int, steps_per_epoch: int, device: str) -> None: ...
    def step(self, epoch: int, step_in_epoch: int) -> None: ...
    def epoch(self, record: EpochRecord, hook_p95_ms: float) -> None: ...
    def notice(self, message: str, **fields: str) -> None: ...
    def finish(self, report: RunReport, report_path: str) -> None: ...


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4f}"


def _health(h: HealthStatus.ValueType) -> str:
    return HealthStatus.Name(h).removeprefix("HEALTH_STATUS_")


class RichView:
    """Progress bar within the epoch, one table row per finished epoch."""

    def __init__(self, console: Console | None = None) -> None:
        # soft_wrap: a long epoch line stays one line in logs and pipes (rich would fold it
        # at 80 columns there); a terminal wraps it itself
        self._console = console or Console(stderr=False, soft_wrap=True)
        self._progress: Progress | None = None
        self._task: int | None = None
        self._steps = 0

    def start(self, run_id: str, epochs: int, steps_per_epoch: int, device: str) -> None:
        self._steps = steps_per_epoch
        self._console.print(
            f"[bold]tolaria[/] run [cyan]{run_id}[/]: "
            f"{epochs} epochs x {steps_per_epoch} steps on {device}"
        )
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
        )
        self._progress.start()

    def step(self, epoch: int, step_in_epoch: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("train", total=self._steps, epoch=epoch)
        self._progress.update(self._task, completed=step_in_epoch, epoch=epoch)  # type: ignore[arg-type]

    def epoch(self, record: EpochRecord, hook_p95_ms: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)  # type: ignore[arg-type]
            self._task = None
        lr = " ".join(f"{k}={v:.2e}" for k, v in sorted(record.learning_rates.items()))
        mode = " conservative" if record.conservative else ""
        why = f" ({record.health_reason})" if record.health_reason else ""
        self._console.print(
            f"epoch {record.epoch:>3}  loss {_fmt(record.training_loss)}  "
            f"val {_fmt(record.validation_loss)}  acc {_fmt(record.validation_accuracy)}  "
            f"hook p95 {hook_p95_ms:5.2f} ms  lr {lr}  {_health(record.health)}{why}{mode}",
            highlight=False,
            markup=False,
        )

    def notice(self, message: str, **fields: str) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self._console.print(f"[yellow]![/] {message} {extra}".rstrip())

    def finish(self, report: RunReport, report_path: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        status = RunPhase.Name(report.status)
        color = "green" if report.exit_code == 0 else "red"
        hook = report.hook_latency
        self._console.print(
            f"[{color}]{status}[/] after {report.epochs_completed} epochs, "
            f"{report.global_step} steps; "
            f"val loss {_fmt(report.validation_loss.first)} -> "
            f"{_fmt(report.validation_loss.last)}; "
            f"hook p50/p99/max {hook.p50_ms:.2f}/{hook.p99_ms:.2f}/{hook.max_ms:.2f} ms"
        )
        if report.reason:
            self._console.print(f"reason: {report.reason}")
        self._console.print(f"report: {report_path}")


class JsonView:
    """One JSON object per line on stdout."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._out = stream or sys.stdout

    def _write(self, obj: dict[str, object]) -> None:
        self._out.write(json.dumps(obj, allow_nan=True, sort_keys=False) + "\n")
        self._out.flush()

    def start(self, run_id: str, epochs: int, steps_per_epoch: int, device: str) -> None:
        self._write(
            {
                "event": "start",
                "run": run_id,
                "epochs": epochs,
                "steps_per_epoch": steps_per_epoch,
                "device": device,
            }
        )

    def step(self, epoch: int, step_in_epoch: int) -> None:
        del epoch, step_in_epoch  # machines get epoch records only

    def epoch(self, record: EpochRecord, hook_p95_ms: float) -> None:
        self._write(
            {
                "event": "epoch",
                "epoch": record.epoch,
                "global_step": record.global_step,
                "training_loss": record.training_loss,
                "validation_loss": record.validation_loss,
                "validation_accuracy": record.validation_accuracy,
                "hook_ms": record.hook_ms,
                "hook_p95_ms": hook_p95_ms,
                "validation_ms": record.validation_ms,
                "learning_rates": dict(record.learning_rates),
                "health": HealthStatus.Name(record.health),
                "health_reason": record.health_reason,
                "conservative": record.conservative,
                "fallback_reason": record.fallback_reason,
            }
        )

    def notice(self, message: str, **fields: str) -> None:
        self._write({"event": "notice", "message": message, **fields})

    def finish(self, report: RunReport, report_path: str) -> None:
        self._write(
            {
                "event": "finish",
                "status": RunPhase.Name(report.status),
                "exit_code": report.exit_code,
                "reason": report.reason,
                "epochs_completed": report.epochs_completed,
                "report": report_path,
            }
        )
