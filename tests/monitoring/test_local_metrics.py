"""`tolaria run --sidecar-metrics-port`: the sidecar's metrics in local mode, as in a pod: port 0
picks a free one and prints it, a port in use is refused by name. The live tests (conftest)
scrape it on a port chosen beforehand."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import TOLARIA, small_manifest, tolaria


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_sidecar_metrics_port_in_use_exits_2_naming_the_flag_before_anything_starts(
    tmp_path: Path, taken_port: int
) -> None:
    manifest = tmp_path / "taken.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("taken")))
    workdir = tmp_path / "runs"
    flags = ["--workdir", str(workdir), "--sidecar-metrics-port", str(taken_port)]
    done = tolaria(["run", str(manifest), *flags], tmp_path)
    assert done.returncode == 2, done.stderr
    expected = f"--sidecar-metrics-port: cannot serve metrics on 127.0.0.1:{taken_port}: "
    assert expected in done.stderr and "already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


@pytest.mark.timeout(600)
def test_sidecar_metrics_port_0_serves_the_sidecars_metrics_at_the_url_it_prints(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "served.yaml"
    manifest.write_text(yaml.safe_dump(small_manifest("served", epochs=1000)))
    flags = ["--workdir", str(tmp_path / "runs"), "--log-format", "json"]
    proc = subprocess.Popen(
        [*TOLARIA, "run", str(manifest), *flags, "--sidecar-metrics-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # printed once the sidecar is READY
        with urllib.request.urlopen(first["url"], timeout=60) as response:
            body = response.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=300)
    assert first["message"] == "sidecar metrics served"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", first["url"])
    assert not first["url"].endswith(":0/metrics")
    assert "tolaria_sidecar_rollbacks_total" in body
