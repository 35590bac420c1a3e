"""Tolaria's training runtime: the guarded epoch loop and the `tolaria` CLI.

What user code may import: `Task` (what a `module:function` task returns) and
`load_task`. The CLI is `tolaria_trainer.cli:main`; everything else is
internal and may change.
"""

from tolaria_trainer.tasks import Task, load_task

__all__ = ["Task", "load_task"]
