"""The sidecar's output under `tolaria run`: READY awaited, the rest kept in `sidecar.log`, a
full disk costs lines, never the sidecar (R13.5). A real child process stands in for it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.disks import fill_disk
from tolaria_trainer.errors import SidecarDidNotStart
from tolaria_trainer.sidecar_child import SidecarChild

TALKER = (
    "import os, sys, time\n"
    "print('READY socket=x control=- metrics=-', flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n"  # until the test has filled the disk
    "    time.sleep(0.01)\n"
    "for i in range(2000):\n"
    "    print('line', i, 'x' * 200, flush=True)\n"
)


@pytest.mark.req("R13.5")
def test_a_full_disk_loses_sidecar_output_lines_but_never_blocks_the_sidecar(
    small_tmpfs: Callable[[str, str], Path], tmp_path: Path
) -> None:
    disk = small_tmpfs("disk", "256k")
    go = tmp_path / "go"
    child = SidecarChild.start(
        [sys.executable, "-c", TALKER, str(go)], {**os.environ}, disk / "sidecar.log"
    )
    fill_disk(disk)
    go.touch()
    assert child.proc.wait(timeout=60) == 0, "the sidecar wrote all its output and ended"
    assert 0 < child.lines_lost <= 2000


def test_a_sidecar_that_never_says_ready_fails_the_start_quoting_its_log(tmp_path: Path) -> None:
    code = "import sys; sys.stderr.write('tolaria-sidecar: shared memory: full\\n')"
    with pytest.raises(SidecarDidNotStart, match="shared memory: full"):
        SidecarChild.start([sys.executable, "-c", code], {**os.environ}, tmp_path / "sidecar.log")
