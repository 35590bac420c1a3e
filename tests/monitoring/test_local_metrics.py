"""`tolaria run --sidecar-metrics-port`: the sidecar's metrics in local mode, as in a pod. Its
serving is exercised by every live test (conftest); here, a port in use is refused by name."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import small_manifest, tolaria


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
