"""Tolaria's training runtime: the guarded epoch loop and the `tolaria` CLI.

What user code may import: `Task` (what a `module:function` task returns) and
`load_task`. The CLI is `tolaria_trainer.cli:main`; everything else is
internal and may change. Imports are lazy so that `tolaria validate` and the
local-mode supervisor start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tolaria_trainer.tasks import Task, load_task

__all__ = ["Task", "load_task"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tolaria_trainer import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'tolaria_trainer' has no attribute {name!r}")
