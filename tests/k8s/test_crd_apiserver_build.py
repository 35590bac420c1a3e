"""The CRD API server's build as a step of `make test`: bounded in time, never inside pytest,
and a failure that the server tests report when they skip (see conftest.py).

Each test uses its own empty cache directory, so the real cached server is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "crd-apiserver" / "build.sh"
STEP = ROOT / "scripts" / "crd-apiserver.sh"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def no_build(outdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUILD, "--no-build", outdir], capture_output=True, text=True, timeout=60, check=False
    )


def test_no_build_says_how_to_build_and_builds_nothing(tmp_path: Path) -> None:
    done = no_build(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert "not built" in done.stderr and "make crd-apiserver" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_build_reports_the_error_the_last_build_recorded(tmp_path: Path) -> None:
    recorded = "build.sh: error: apt-get update for sid from http://mirror/debian failed"
    (tmp_path / "last-error").write_text(recorded + "\n")
    done = no_build(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == recorded  # what a skipped test names


@pytest.fixture
def silent_mirror() -> Iterator[str]:
    """A mirror that accepts connections and never answers: apt waits, the build never ends."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"http://127.0.0.1:{server.getsockname()[1]}/debian"


@pytest.mark.skipif(
    shutil.which("apt-get") is None or not KEYRING.exists(),
    reason="build.sh needs apt-get and the Debian archive keyring before it reaches the mirror",
)
def test_the_build_step_stops_at_its_time_bound_records_why_and_never_fails_make(
    tmp_path: Path, silent_mirror: str
) -> None:
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path),
        "CRD_APISERVER_MIRROR": silent_mirror,
        "CRD_APISERVER_BUILD_TIMEOUT": "2",
    }
    done = subprocess.run([STEP], capture_output=True, text=True, env=env, timeout=120, check=False)
    outdir = tmp_path / "tolaria" / "crd-apiserver"
    assert done.returncode == 0, done.stderr
    assert "did not finish within 2 s" in (outdir / "last-error").read_text()
    assert no_build(outdir).stderr.strip().endswith("the next make test tries again")
