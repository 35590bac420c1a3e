"""Shared fixtures: injected clocks and event sinks; no global state."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leyline.spec import BreakerSpec, ConservativeSpec
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.guards import Guards


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


@pytest.fixture
def guards(clock: FakeClock, events: RecordingEvents) -> Guards:
    return Guards(BreakerSpec(), ConservativeSpec(), clock, events)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mounts real tmpfs file systems of a given size (a disk or a /dev/shm that can fill up);
    unmounts them afterwards. Skips where mounting is not permitted (the suite runs as root in
    CI)."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / f"tmpfs-{name}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
