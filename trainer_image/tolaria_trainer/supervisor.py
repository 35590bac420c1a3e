"""Local mode: `tolaria run` as a small pod (ARCHITECTURE "one manifest, two places to run").

The supervisor starts the sidecar as a child process, waits for it to be
ready, then runs the trainer (`tolaria_trainer.worker`) as a supervised child,
the way a kubelet runs the two containers of a run's pod:

* a trainer that dies from a signal or an unexpected exit code is restarted
  (a new attempt, without drills) up to `spec.restarts.limit` times, and
  resumes from the sidecar's shared-memory snapshots;
* exit codes 0, 1, 2 and 3 are final;
* a sidecar that dies is restarted; it re-attaches the slots it left behind
  while the trainer carries on DEGRADED;
* the metrics port (`--metrics-port`, else `spec.telemetry.metricsPort`) is
  bound here, before anything is created: a port in use is exit 2 naming the
  flag or field. Every trainer attempt serves on that one socket, so the URL
  it prints holds across restarts;
* however the run ends — success, failure, halt, SIGINT/SIGTERM, a crash of
  the supervisor itself (children get a parent-death signal) — nothing of the
  run stays in /dev/shm and the socket directory is removed.

It never imports torch (it starts in milliseconds and stays small) and only
talks to its children through processes, files and signals.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from google.protobuf import json_format

from leyline import RunPhase, RunReport
from leyline.lifecycle import (
    INSTANCE_ENV,
    LINEAGE_ENV,
    RESUME_ENV,
    RESUME_REQUIRED,
    child_environment,
)
from leyline.shm import new_instance_id, remove_instance_segments
from leyline.spec import TolariaRun
from tolaria_trainer.drills import SIDECAR_PID_ENV, DrillSpec, split
from tolaria_trainer.endpoint import open_metrics_socket
from tolaria_trainer.errors import MetricsPortUnavailable
from tolaria_trainer.workdir import Prepared, RunDirectoryRefused, RunLock, prepare

logger = logging.getLogger("tolaria.supervisor")

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
FINAL_CODES = frozenset({0, 1, 2, 3})


@dataclass
class SupervisorOptions:
    manifest: Path
    workdir: Path
    drills: Sequence[DrillSpec] = ()
    log_format: str = "rich"
    metrics_port: int | None = None
    profile: str | None = None
    verbose: bool = False
    resume: bool = False
    """Continue the run in the run directory from its newest valid checkpoint."""
    fresh: bool = False
    """Move an earlier run's directory aside and start from nothing."""


@dataclass
class Supervision:
    """What the supervisor saw, merged into the report at the end."""

    restarts: int = 0
    sidecar_restarts: int = 0
    notes: list[str] = field(default_factory=list)


class Supervisor:
    """Runs one TolariaRun locally as sidecar + trainer child processes."""

    def __init__(self, run: TolariaRun, options: SupervisorOptions) -> None:
        self._run = run
        self._opts = options
        self._run_dir = options.workdir / run.name
        self.instance_id = new_instance_id()
        """This run instance (R13.1): names the shared memory and the socket directory, and is
        written into every snapshot and checkpoint; a restarted trainer keeps it."""
        self._prepared = Prepared(self.instance_id, None)
        self._lock = RunLock(options.workdir, run.name)
        self._socket_dir = Path(tempfile.mkdtemp(prefix=f"tolaria-{self.instance_id}-"))
        self._socket = self._socket_dir / "sidecar.sock"
        self._sidecar: subprocess.Popen[str] | None = None
        self._trainer: subprocess.Popen[bytes] | None = None
        self._metrics: socket.socket | None = None
        self._stop = threading.Event()
        self._made_run_dir = not self._run_dir.exists()
        self.seen = Supervision()
        self._trainer_drills, self._sidecar_drills = split(options.drills)

    # -- children ------------------------------------------------------------------------
    def _start_sidecar(self) -> None:
        self._run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tolaria_sidecar",
            "--manifest",
            str(self._opts.manifest),
            "--run-id",
            self._run.name,
            "--socket",
            str(self._socket),
            "--checkpoint-dir",
            str(self._checkpoint_dir()),
            "--cleanup-on-exit",
        ]
        for d in self._sidecar_drills:
            cmd += ["--inject", d.raw]
        log = (self._run_dir / "sidecar.log").open("a")
        env = {**os.environ, **child_environment(signal.SIGTERM), **self._identity()}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.close()
        line = self._read_ready(proc)
        if not line.startswith("READY"):
            proc.kill()
            log_path = self._run_dir / "sidecar.log"
            raise RuntimeError(
                f"sidecar did not start (see {log_path}): {line.strip() or 'no output'}"
            )
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        self._sidecar = proc
        logger.info("sidecar ready (pid %d): %s", proc.pid, line.strip())

    def _checkpoint_dir(self) -> Path:
        configured = self._run.spec.checkpoints.directory
        return Path(configured) if configured else self._run_dir / "checkpoints"

    @staticmethod
    def _read_ready(proc: subprocess.Popen[str]) -> str:
        box: list[str] = []
        reader = threading.Thread(
            target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""), daemon=True
        )
        reader.start()
        reader.join(READY_TIMEOUT_S)
        return box[0] if box else ""

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        if proc.stdout is None:
            return
        with (self._run_dir / "sidecar.log").open("a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()

    def _start_trainer(self, attempt: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tolaria_trainer.worker",
            "--manifest",
            str(self._opts.manifest),
            "--workdir",
            str(self._opts.workdir),
            "--socket",
            str(self._socket),
            "--attempt",
            str(attempt),
            "--log-format",
            self._opts.log_format,
        ]
        if attempt == 1:  # a drill fires once: a restarted trainer gets none
            for d in self._trainer_drills:
                cmd += ["--inject", d.raw]
        inherited: tuple[int, ...] = ()
        if self._metrics is not None:
            inherited = (self._metrics.fileno(),)
            cmd += ["--metrics-fd", str(inherited[0])]
        if self._opts.profile:
            cmd += ["--profile", self._opts.profile]
        if self._opts.verbose:
            cmd.append("--verbose")
        env = {**os.environ, **child_environment(signal.SIGKILL), **self._identity()}
        if self._sidecar is not None:
            env[SIDECAR_PID_ENV] = str(self._sidecar.pid)
        self._trainer = subprocess.Popen(cmd, env=env, pass_fds=inherited)

    def _identity(self) -> dict[str, str]:
        """What both children share: the instance, its lineage, and whether to resume it."""
        return {
            INSTANCE_ENV: self.instance_id,
            LINEAGE_ENV: self._prepared.lineage_id,
            RESUME_ENV: RESUME_REQUIRED if self._prepared.resume is not None else "0",
        }

    # -- supervision ---------------------------------------------------------------------
    def run(self) -> int:
        """Runs to the end; returns the exit code `tolaria run` exits with."""
        try:
            self._metrics = open_metrics_socket(self._run.spec.telemetry, self._opts.metrics_port)
        except MetricsPortUnavailable as err:  # before the lock: a refusal leaves nothing
            return self._refuse(err)
        try:
            return self._run_locked()
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def _refuse(self, err: Exception) -> int:
        sys.stderr.write(f"error: {err}\n")
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        return 2

    def _run_locked(self) -> int:
        try:
            self._lock.acquire(self.instance_id)
        except RunDirectoryRefused as err:
            return self._refuse(err)
        try:
            self._prepared = prepare(
                self._run,
                run_dir=self._run_dir,
                checkpoint_dir=self._checkpoint_dir(),
                instance_id=self.instance_id,
                resume=self._opts.resume,
                fresh=self._opts.fresh,
            )
        except RunDirectoryRefused as err:
            self._lock.release()
            return self._refuse(err)
        self._made_run_dir = not self._run_dir.exists()
        for moved in self._prepared.moved_aside:
            logger.warning("--fresh: moved the earlier run to %s", moved)
        try:
            return self._supervise()
        finally:
            self._lock.release()

    def _supervise(self) -> int:
        previous = self._install_signals()
        code = 1
        try:
            self._start_sidecar()
            attempt = 1
            self._start_trainer(attempt)
            while True:
                code = self._wait_trainer()
                if code in FINAL_CODES or self._stop.is_set():
                    break
                if self.seen.restarts >= self._run.spec.restarts.limit:
                    self.seen.notes.append(
                        f"trainer died (exit {code}) and the restart limit "
                        f"({self._run.spec.restarts.limit}) is used up"
                    )
                    code = 1
                    break
                self.seen.restarts += 1
                attempt += 1
                logger.warning(
                    "trainer died (exit %s); restart %d, attempt %d",
                    code,
                    self.seen.restarts,
                    attempt,
                )
                self._start_trainer(attempt)
        finally:
            self._shutdown()
            self._restore_signals(previous)
        return self._finish(code)

    def _wait_trainer(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        while True:
            code = trainer.poll()
            if code is not None:
                return code
            sidecar = self._sidecar
            if sidecar is not None and sidecar.poll() is not None and not self._stop.is_set():
                self.seen.sidecar_restarts += 1
                logger.warning("sidecar died (exit %s); restarting it", sidecar.returncode)
                self._sidecar = None
                try:
                    self._start_sidecar()
                except RuntimeError as err:
                    logger.error("%s", err)
            time.sleep(0.05)

    def _install_signals(self) -> dict[int, object]:
        def forward(signum: int, frame: FrameType | None) -> None:
            del frame
            self._stop.set()
            if self._trainer is not None and self._trainer.poll() is None:
                self._trainer.send_signal(signal.SIGTERM)

        previous: dict[int, object] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _shutdown(self) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.poll() is None:
            trainer.send_signal(signal.SIGTERM)
            try:
                trainer.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                trainer.kill()
                trainer.wait()
        sidecar = self._sidecar
        if sidecar is not None and sidecar.poll() is None:
            sidecar.send_signal(signal.SIGTERM)
            try:
                sidecar.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                sidecar.kill()
                sidecar.wait()
        remove_instance_segments(self.instance_id)  # exact names: never another run's
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- the report --------------------------------------------------------------------------
    def _finish(self, code: int) -> int:
        path = self._run_dir / "report.json"
        if code == 2:
            if self._made_run_dir:
                shutil.rmtree(self._run_dir, ignore_errors=True)  # invalid input leaves nothing
            return code
        report = RunReport()
        try:
            json_format.Parse(path.read_text(encoding="utf-8"), report)
        except (OSError, json_format.ParseError):
            report = RunReport(
                version=1, run_id=self._run.name, status=RunPhase.Failed, exit_code=1
            )
            report.reason = (
                "; ".join(self.seen.notes) or f"trainer ended with exit code {code} and no report"
            )
        report.restarts = self.seen.restarts
        report.sidecar_restarts = self.seen.sidecar_restarts
        report.instance_id = report.instance_id or self.instance_id
        report.lineage_id = report.lineage_id or self._prepared.lineage_id
        if self._prepared.resume is not None:
            report.resumed_from = str(self._prepared.resume.path)
        self._record_sidecar_drills(report)
        if code not in FINAL_CODES or (self.seen.notes and report.status == RunPhase.Running):
            report.status = RunPhase.Failed
            report.exit_code = 1
            report.reason = "; ".join(self.seen.notes) or report.reason
        if self.seen.notes and not report.reason:
            report.reason = "; ".join(self.seen.notes)
        from tolaria_trainer.report import write_report

        write_report(report, path)
        self._print_finish(report, path)
        return int(report.exit_code)

    def _record_sidecar_drills(self, report: RunReport) -> None:
        """Drills the sidecar ran: fired when the report shows their effect."""
        for drill in self._sidecar_drills:
            record = report.drills.add(spec=drill.raw)
            failures = [f for f in report.checkpoint_failures if f.epoch == drill.at]
            if failures:
                record.fired = True
                record.epoch = drill.at
                record.step = failures[0].global_step
                latest = report.checkpoints[-1].checkpoint_id if report.checkpoints else "none"
                record.observed = (
                    f"checkpoint of epoch {drill.at} failed ({failures[0].error}); "
                    f"training went on, later checkpoints committed; latest {latest}"
                )
            else:
                record.observed = "did not fire (no checkpoint was written for that epoch)"
        if self.seen.sidecar_restarts:
            for record in report.drills:
                if record.spec.startswith("sidecar-crash") and record.fired:
                    restarts = self.seen.sidecar_restarts
                    record.observed += f"; sidecar restarted {restarts}x, slots re-attached"

    def _print_finish(self, report: RunReport, path: Path) -> None:
        if self._opts.log_format == "json":
            line = {
                "event": "finish",
                "status": RunPhase.Name(report.status),
                "exit_code": report.exit_code,
                "reason": report.reason,
                "epochs_completed": report.epochs_completed,
                "restarts": report.restarts,
                "report": str(path),
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            return
        from tolaria_trainer.progress import RichView

        RichView().finish(report, str(path))
