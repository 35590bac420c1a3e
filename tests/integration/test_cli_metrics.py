"""`tolaria run --metrics-port`: the printed URL is the port really bound, in both log formats;
a port already in use is exit 2 naming the flag or field, before any child trains and with
nothing on disk; a trainer that cannot bind (alone, or in a pod) exits 2 without a traceback."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import TOLARIA, small_manifest, tolaria

URL_DEADLINE_S = 300.0
"""Until the trainer prints its URL: a sidecar start and a torch import on a loaded 2-core box."""
RICH_URL = re.compile(r"metrics served url=(http://\S+/metrics)")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process listens on for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Lines:
    """The stdout lines of a running process, read on a thread so a wait can have a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def first_url(self, log_format: str, deadline_s: float = URL_DEADLINE_S) -> str:
        """The metrics URL the run prints; waits on its output, fails at EOF or the deadline."""
        end = time.monotonic() + deadline_s
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the run ended without printing a metrics URL: {self.seen}")
            self.seen.append(line)
            if log_format == "json":
                event = json.loads(line)
                if event.get("message") == "metrics served":
                    return str(event["url"])
            elif match := RICH_URL.search(line):
                return match.group(1)
        pytest.fail(f"no metrics URL within {deadline_s:.0f} s: {self.seen}")


@pytest.mark.req("R8.3")
@pytest.mark.parametrize("log_format", ["rich", "json"])
def test_metrics_port_0_serves_on_a_free_port_and_prints_the_url_it_bound(
    tmp_path: Path, log_format: str
) -> None:
    path = write(tmp_path, small_manifest("scraped", epochs=1000))
    flags = ["--metrics-port", "0", "--log-format", log_format]
    proc = subprocess.Popen(
        [*TOLARIA, "run", str(path), "--workdir", str(tmp_path / "runs"), *flags],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = Lines(proc).first_url(log_format)
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)  # a long run: stop it after the current step
        _, stderr = proc.communicate(timeout=300)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url) and not url.endswith(":0/metrics")
    assert "tolaria_steps_total" in body and "tolaria_breaker_state" in body, stderr[-3000:]


@pytest.mark.req("R6.2")
def test_a_restarted_trainer_serves_metrics_at_the_url_the_first_attempt_printed(
    tmp_path: Path,
) -> None:
    """`tolaria run` binds the port once and hands the socket to every attempt."""
    path = write(tmp_path, small_manifest("restarted", epochs=4))
    flags = ["--log-format", "json", "--metrics-port", "0", "--inject", "crash@step=40"]
    done = tolaria(["run", str(path), "--workdir", str(tmp_path / "runs"), *flags], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    urls = [e["url"] for e in events if e.get("message") == "metrics served"]
    assert len(urls) == 2 and urls[0] == urls[1], urls
    assert events[-1]["restarts"] == 1


@pytest.mark.req("R13.5")
@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("flag", "--metrics-port"),
        ("manifest", "spec.telemetry.metricsPort"),
        ("flag --no-sidecar", "--metrics-port"),
    ],
)
def test_a_metrics_port_in_use_exits_2_naming_it_before_anything_starts(
    tmp_path: Path, taken_port: int, source: str, named: str
) -> None:
    doc = small_manifest("taken")
    flags = ["--metrics-port", str(taken_port)] if source.startswith("flag") else []
    if source == "manifest":
        doc["spec"]["telemetry"] = {"metricsPort": taken_port}
    if source.endswith("--no-sidecar"):
        flags.append("--no-sidecar")
    workdir = tmp_path / "runs"
    done = tolaria(["run", str(write(tmp_path, doc)), "--workdir", str(workdir), *flags], tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{named}: cannot serve metrics on 127.0.0.1:{taken_port}: " in done.stderr
    assert "already in use" in done.stderr and "Traceback" not in done.stderr
    assert not workdir.exists()


@pytest.mark.req("R13.5")
@pytest.mark.parametrize("pod", [False, True], ids=["local", "pod"])
def test_a_trainer_that_cannot_bind_its_metrics_port_exits_2_without_a_traceback(
    tmp_path: Path, taken_port: int, pod: bool
) -> None:
    """The trainer binds itself where nothing bound for it: alone, or in a pod (where the
    outcome goes to the termination log and the container exits 0, final)."""
    doc = small_manifest("raced")
    doc["spec"]["telemetry"] = {"metricsPort": taken_port}
    workdir = tmp_path / "runs"
    termination = tmp_path / "termination-log"
    flags = ["--workdir", str(workdir), "--socket", str(tmp_path / "no-sidecar.sock")]
    flags += ["--pod", "--termination-log", str(termination)] if pod else []
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tolaria_trainer.worker",
            "--manifest",
            str(write(tmp_path, doc)),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    message = f"spec.telemetry.metricsPort: cannot serve metrics on 127.0.0.1:{taken_port}"
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not workdir.exists()
    if pod:
        outcome = json.loads(termination.read_text())
        assert done.returncode == 0 and outcome["exitCode"] == 2
        assert outcome["reason"].startswith(message)
    else:
        assert done.returncode == 2
