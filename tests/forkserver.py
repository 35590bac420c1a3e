"""The one forkserver of a test session, for the crash harnesses.

Python starts a single forkserver per process, and only the first `set_forkserver_preload`
before it starts counts. Every crash harness therefore asks for the context here, with the
preload list of all of them, so whichever runs first starts a server that has already
imported (and warmed) what every harness's children need: each child then starts in
milliseconds, where a cold import of torch costs seconds.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext

PRELOAD = ["tests.sidecar.crash_child", "tests.trainer.snapshot_crash_warm"]


def forkserver_context() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context
