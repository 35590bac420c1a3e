"""How a run ends when something outside it ends it: Ctrl-C, SIGTERM, a killed supervisor, a
full disk, a full /dev/shm (R13.5). Real `tolaria run` processes; the report, the exit code
and what is left on disk are checked, and no process prints a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.disks import fill_disk
from tests.integration.conftest import small_manifest

TOLARIA = [sys.executable, "-m", "tolaria_trainer.cli"]
END_TIMEOUT_S = 180.0


@dataclass
class Started:
    """A running `tolaria run` (or worker) started in its own session, like a terminal job."""

    proc: subprocess.Popen[str]
    workdir: Path
    name: str
    shm: Path
    sockets: Path
    stdout: str = ""
    stderr: str = ""

    @property
    def report_path(self) -> Path:
        return self.workdir / self.name / "report.json"

    @property
    def report(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.report_path.read_text())
        return loaded

    def wait_for_epochs(self, n: int) -> None:
        """Reads progress lines until `n` epochs have finished."""
        assert self.proc.stdout is not None
        seen = 0
        for line in self.proc.stdout:
            self.stdout += line
            if line.startswith("{") and json.loads(line).get("event") == "epoch":
                seen += 1
                if seen == n:
                    return
        raise AssertionError(f"the run ended after {seen} epochs: {self.stderr_now()}")

    def stderr_now(self) -> str:
        self.finish(timeout=END_TIMEOUT_S)
        return self.stderr[-3000:]

    def finish(self, timeout: float = END_TIMEOUT_S) -> int:
        """Waits for the process and for every holder of its output (its children) to end."""
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Shared-memory segments and socket directories of the run that still exist."""
        return sorted(
            [p.name for p in self.shm.iterdir()]
            + [p.name for p in self.sockets.iterdir() if p.name.startswith("tolaria-")]
        )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """Starts runs with their own shared-memory and temporary directories; afterwards kills
    whatever the test left running (found by that temporary directory, never by name)."""
    shm = tmp_path / "shm"
    shm.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))  # short: Unix socket paths
    started: list[Started] = []

    def run(
        doc: dict[str, Any],
        *flags: str,
        workdir: Path | None = None,
        shm_dir: Path | None = None,
        command: list[str] | None = None,
    ) -> Started:
        path = tmp_path / f"{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        workdir = workdir or tmp_path / "runs"
        env = {
            **os.environ,
            "TOLARIA_SHM_DIR": str(shm_dir or shm),
            "TMPDIR": str(sockets),
            "PYTHONUNBUFFERED": "1",
        }
        argv = command or [
            *TOLARIA,
            "run",
            str(path),
            "--workdir",
            str(workdir),
            "--log-format",
            "json",
            *flags,
        ]
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        one = Started(proc, workdir, doc["metadata"]["name"], shm_dir or shm, sockets)
        started.append(one)
        return one

    yield run
    for one in started:
        with contextlib.suppress(ProcessLookupError):
            one.proc.kill()
        one.proc.wait()
    for pid in _processes_with_env("TMPDIR", str(sockets)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(sockets, ignore_errors=True)


def _processes_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment has `key=value` (this test's children and grandchildren)."""
    wanted = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls `condition` against a deadline (the processes it watches are real)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)


def long_run(name: str, epochs: int = 200) -> dict[str, Any]:
    return small_manifest(name, epochs=epochs)


def assert_no_traceback(run: Started) -> None:
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stdout, run.stdout[-3000:]


@pytest.mark.req("R13.5")
def test_ctrl_c_stops_after_the_step_with_a_stopped_report_and_exit_130(
    start: Callable[..., Started],
) -> None:
    run = start(long_run("ctrlc"))
    run.wait_for_epochs(1)
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    assert run.finish() == 130, run.stderr[-3000:]
    report = run.report
    assert (report["status"], report["exit_code"]) == ("Stopped", 130)
    assert report["reason"].startswith("stopped by SIGINT at step ")
    assert 1 <= report["epochs_completed"] < 200 and report["epochs"]
    assert json.loads(run.stdout.splitlines()[-1])["status"] == "Stopped"
    assert_no_traceback(run)
    assert run.leftovers() == []


@pytest.mark.req("R13.5")
def test_sigterm_to_tolaria_run_stops_it_with_exit_143(start: Callable[..., Started]) -> None:
    run = start(long_run("term"))
    run.wait_for_epochs(1)
    run.proc.send_signal(signal.SIGTERM)  # to the supervisor alone, as `kill PID` does
    assert run.finish() == 143, run.stderr[-3000:]
    report = run.report
    assert (report["status"], report["exit_code"]) == ("Stopped", 143)
    assert "SIGTERM" in report["reason"]
    assert_no_traceback(run)
    assert run.leftovers() == []


@pytest.mark.req("R13.5")
def test_a_second_ctrl_c_ends_the_run_at_once_still_with_a_report(
    start: Callable[..., Started],
) -> None:
    run = start(long_run("twice"))
    run.wait_for_epochs(1)
    os.killpg(run.proc.pid, signal.SIGINT)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish() == 130, run.stderr[-3000:]
    report = run.report
    assert report["status"] == "Stopped" and report["reason"].startswith("stopped by SIGINT")
    assert_no_traceback(run)
    assert run.leftovers() == []


@pytest.mark.req("R13.5")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_without_a_sidecar_stops_the_same_way(
    start: Callable[..., Started], presses: int
) -> None:
    run = start(long_run("inproc"), "--no-sidecar")
    run.wait_for_epochs(1)
    for _ in range(presses):
        os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish() == 130, run.stderr[-3000:]
    report = run.report
    assert (report["status"], report["exit_code"]) == ("Stopped", 130)
    assert report["reason"].startswith("stopped by SIGINT")
    assert_no_traceback(run)


@pytest.mark.req("R13.5")
def test_a_killed_supervisor_leaves_a_stopped_report_and_nothing_in_shm_or_tmp(
    start: Callable[..., Started],
) -> None:
    run = start(long_run("orphan"))
    run.wait_for_epochs(1)
    assert run.leftovers(), "the run holds segments and a socket directory while it runs"
    run.proc.kill()  # SIGKILL: no handler, no cleanup of its own
    run.finish()  # the output ends when the trainer, the last holder, has exited

    def stopped() -> bool:
        with contextlib.suppress(OSError, ValueError):
            return run.report["status"] == "Stopped"
        return False

    until(stopped, 60, "a final report")
    until(lambda: run.leftovers() == [], 60, f"segments and socket dir removed: {run.leftovers()}")
    report = run.report
    assert report["exit_code"] == 143 and "supervising `tolaria run` died" in report["reason"]
    assert report["epochs_completed"] >= 1
    assert_no_traceback(run)


@pytest.mark.req("R13.5")
def test_a_disk_that_fills_mid_run_still_ends_with_a_report_and_exit_0(
    start: Callable[..., Started], small_tmpfs: Callable[[str, str], Path]
) -> None:
    disk = small_tmpfs("disk", "2m")
    run = start(small_manifest("full", epochs=12), workdir=disk / "runs")
    run.wait_for_epochs(3)
    fill_disk(disk)
    assert run.finish() == 0, run.stderr[-3000:]
    report = run.report
    assert (report["status"], report["epochs_completed"]) == ("Succeeded", 12)
    assert report["checkpoint_failures"], "checkpoints after the disk filled failed"
    assert "No space" in report["checkpoint_failures"][-1]["error"]
    warnings = " | ".join(report["warnings"])
    assert "telemetry stopped" in warnings and "disk full" in warnings, warnings
    assert report["telemetry_unwritten"] > 0
    lines = (run.workdir / "full" / "telemetry.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["packetId"] for line in lines)
    for checkpoint in report["checkpoints"]:
        assert (run.workdir / "full" / "checkpoints" / checkpoint["file_name"]).is_file()
    assert_no_traceback(run)
    assert run.leftovers() == []


@pytest.mark.req("R13.5")
def test_a_full_shm_fails_the_run_naming_the_bytes_needed_and_available(
    start: Callable[..., Started], small_tmpfs: Callable[[str, str], Path]
) -> None:
    shm = small_tmpfs("shm", "64k")  # the control block fits, the snapshot slots do not
    run = start(small_manifest("shmfull", epochs=3), shm_dir=shm)
    assert run.finish() == 1, run.stderr[-3000:]
    report = run.report
    assert (report["status"], report["exit_code"]) == ("Failed", 1)
    assert "RESOURCE_EXHAUSTED" in report["reason"]
    assert " need " in report["reason"] and "are available" in report["reason"]
    assert_no_traceback(run)
    assert run.leftovers() == []


@pytest.mark.req("R13.5")
def test_in_a_pod_sigterm_writes_a_stopped_termination_message(
    start: Callable[..., Started], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    doc = long_run("pod")
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    socket = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp")) / "s.sock"  # short: a Unix path
    request.addfinalizer(lambda: shutil.rmtree(socket.parent, ignore_errors=True))
    sidecar = start(
        doc,
        command=[
            sys.executable,
            "-m",
            "tolaria_sidecar",
            "--manifest",
            str(manifest),
            "--socket",
            str(socket),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--cleanup-on-exit",
            "--remove-socket-dir",
        ],
    )
    assert sidecar.proc.stdout is not None
    assert sidecar.proc.stdout.readline().startswith("READY")
    message = tmp_path / "termination-log"
    worker = start(
        doc,
        command=[
            sys.executable,
            "-m",
            "tolaria_trainer.worker",
            "--manifest",
            str(manifest),
            "--workdir",
            str(tmp_path / "runs"),
            "--socket",
            str(socket),
            "--log-format",
            "json",
            "--pod",
            "--termination-log",
            str(message),
        ],
    )
    worker.wait_for_epochs(1)
    worker.proc.send_signal(signal.SIGTERM)  # the kubelet stopping the container
    assert worker.finish() == 0, worker.stderr[-3000:]  # final outcomes exit 0 in a pod
    outcome = json.loads(message.read_text())
    assert (outcome["phase"], outcome["exitCode"]) == ("Stopped", 143)
    assert outcome["reason"].startswith("stopped by SIGTERM")
    assert worker.report["status"] == "Stopped"
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.finish() == 0
    assert not socket.parent.exists(), "the sidecar removed the socket directory it was given"
    assert_no_traceback(worker)
