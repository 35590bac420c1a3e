"""A sidecar whose launcher died waits for the trainer it served, bounded (R13.5). Real child
processes stand in for the trainer."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tolaria_sidecar.orphan import process_running, wait_for_trainer


def sleeper(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


@pytest.mark.req("R13.5")
def test_the_wait_ends_when_the_trainer_process_ends() -> None:
    child = sleeper(0.5)
    try:
        started = time.monotonic()
        assert wait_for_trainer(child.pid, timeout_s=30.0)
        assert time.monotonic() - started < 20.0
    finally:
        child.kill()
        child.wait()


@pytest.mark.req("R13.5")
def test_the_wait_is_bounded_when_the_trainer_does_not_end() -> None:
    child = sleeper(60)
    try:
        assert not wait_for_trainer(child.pid, timeout_s=0.3)
        assert process_running(child.pid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.req("R13.5")
def test_an_exited_trainer_not_yet_reaped_counts_as_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30.0
    while process_running(child.pid):  # exits by itself; we do not reap it yet (a zombie)
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert wait_for_trainer(child.pid, timeout_s=0.1)
    assert wait_for_trainer(0, timeout_s=0.1)  # no trainer ever attached
    child.wait()
