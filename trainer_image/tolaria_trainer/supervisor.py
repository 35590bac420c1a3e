"""Local mode: `tolaria run` as a small pod (ARCHITECTURE "one manifest, two places to run").

The supervisor starts the sidecar as a child process, waits for it to be
ready, then runs the trainer (`tolaria_trainer.worker`) as a supervised child,
the way a kubelet runs the two containers of a run's pod:

* a trainer that dies from a signal or an unexpected exit code is restarted
  (a new attempt, without drills) up to `spec.restarts.limit` times, and
  resumes from the sidecar's shared-memory snapshots;
* exit codes 0, 1, 2, 3 and 130/143 (stopped by a signal) are final;
* a sidecar that dies is restarted; it re-attaches the slots it left behind
  while the trainer carries on DEGRADED;
* the metrics port (`--metrics-port`, else `spec.telemetry.metricsPort`) is
  bound here, before anything is created: a port in use is exit 2 naming the
  flag or field. Every trainer attempt serves on that one socket, so the URL
  it prints holds across restarts;
* `--sidecar-metrics-port` serves the sidecar's metrics too (the rollback,
  emergency and checkpoint series live there, as in a pod): a port in use is
  refused the same way; the port the first sidecar bound (0: a free one) is
  printed and given to every restarted sidecar, so its URL holds as well;
* the children run in their own process groups, so a terminal's Ctrl-C reaches
  only the supervisor, which stops them in order: the trainer first (it ends
  its step, writes the report and detaches), then the sidecar (it removes the
  shared memory). A second Ctrl-C makes the trainer abandon its step, and
  kills it after `ESCALATED_GRACE_S`; the report is written either way, with
  status `Stopped` and exit code 130 (SIGINT) or 143 (SIGTERM) (R13.5);
* however the run ends — success, failure, halt, SIGINT/SIGTERM, a crash of
  the supervisor itself (both children get SIGTERM as their parent-death
  signal: the trainer writes its report, the sidecar waits for it, then
  removes the segments and the socket directory) — nothing of the run stays in
  /dev/shm and the socket directory is removed.

At the end it adds to the report what only it knows (`reconcile.py`). It never
imports torch (it starts in milliseconds and stays small) and only talks to
its children through processes, files and signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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
from leyline.commands import (
    SIDECAR_MODULE,
    TRAINER_MODULE,
    SidecarCommand,
    TrainerCommand,
    python_module,
)
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
from tolaria_trainer.endpoint import bind_metrics_socket, open_metrics_socket
from tolaria_trainer.errors import MetricsPortUnavailable, SidecarDidNotStart
from tolaria_trainer.reconcile import (
    Death,
    check_checkpoints,
    order_drills,
    record_sidecar_drills,
    record_stop,
    record_trainer_drills,
)
from tolaria_trainer.report_file import (
    ReportNotWritten,
    is_placeholder,
    placeholder,
    reserve,
    reserve_bytes,
)
from tolaria_trainer.sidecar_child import SidecarChild
from tolaria_trainer.stopping import STOP_SIGNALS, signal_name
from tolaria_trainer.workdir import Prepared, RunDirectoryRefused, RunLock, prepare

logger = logging.getLogger("tolaria.supervisor")

STOP_GRACE_S = 20.0
"""After the first signal: time for the trainer to end its step and write its report, and
then for the sidecar to finish an in-flight checkpoint, before either is killed."""
ESCALATED_GRACE_S = 5.0
"""After a second signal: time for the trainer to abandon its step and write its report
before SIGKILL; a third signal kills at once."""
POLL_S = 0.05
"""How often the supervisor looks at its children (and forwards signals it received)."""
FINAL_CODES = frozenset({0, 1, 2, 3, 130, 143})
SIDECAR_METRICS_FLAG = "--sidecar-metrics-port"
_READY_METRICS = re.compile(r"\bmetrics=(\d+)")
"""The port in the sidecar's READY line."""


@dataclass
class SupervisorOptions:
    manifest: Path
    workdir: Path
    drills: Sequence[DrillSpec] = ()
    log_format: str = "rich"
    metrics_port: int | None = None
    sidecar_metrics_port: int | None = None
    """Serve the sidecar's metrics on this port (0: a free one); None: not served."""
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
    deaths: list[Death] = field(default_factory=list)
    """Trainer attempts that ended without a final exit code."""
    signals: list[int] = field(default_factory=list)
    """SIGINT/SIGTERM received, in order."""
    trainer_killed: bool = False
    """The trainer was killed after a second signal (its report abandoned)."""
    warnings: list[str] = field(default_factory=list)
    log_lines_lost: int = 0
    """Lines of the sidecar's output `sidecar.log` could not take (disk full)."""


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
        self._sidecar: SidecarChild | None = None
        self._trainer: subprocess.Popen[bytes] | None = None
        self._metrics: socket.socket | None = None
        self._stop = threading.Event()
        self._forwarded = 0
        self._kill_at: float | None = None
        self._made_run_dir = not self._run_dir.exists()
        self.seen = Supervision()
        self._trainer_drills, self._sidecar_drills = split(options.drills)
        self._sidecar_metrics_port = options.sidecar_metrics_port
        self._sidecar_metrics_printed = False

    @property
    def _report_path(self) -> Path:
        return self._run_dir / "report.json"

    # -- children ------------------------------------------------------------------------
    def _start_sidecar(self) -> None:
        """Starts the sidecar and waits for READY; raises `SidecarDidNotStart`."""
        self._run_dir.mkdir(parents=True, exist_ok=True)
        command = SidecarCommand(
            manifest=str(self._opts.manifest),
            socket=str(self._socket),
            run_id=self._run.name,
            checkpoint_dir=str(self._checkpoint_dir()),
            cleanup_on_exit=True,
            remove_socket_dir=True,  # the directory is ours; the sidecar removes it if we die
            metrics_port=self._sidecar_metrics_port,
            inject=tuple(d.raw for d in self._sidecar_drills),
        )
        cmd = [*python_module(SIDECAR_MODULE, sys.executable), *command.args()]
        env = {**os.environ, **child_environment(signal.SIGTERM), **self._identity()}
        if self._sidecar is not None:
            self.seen.log_lines_lost += self._sidecar.lines_lost
            self._sidecar = None
        self._sidecar = SidecarChild.start(cmd, env, self._run_dir / "sidecar.log")
        if self._sidecar_metrics_port is not None and not self._sidecar_metrics_printed:
            match = _READY_METRICS.search(self._sidecar.ready)
            if match:  # its port, bound: a restarted sidecar is given the same one
                self._sidecar_metrics_port = int(match.group(1))
                self._sidecar_metrics_printed = True
                host = self._run.spec.telemetry.metrics_address
                self._notice("sidecar metrics served", f"http://{host}:{match.group(1)}/metrics")

    def _notice(self, message: str, url: str) -> None:
        """A line for the reader of `tolaria run`'s output, in its log format."""
        if self._opts.log_format == "json":
            line = json.dumps({"event": "notice", "message": message, "url": url})
        else:
            line = f"! {message} url={url}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _checkpoint_dir(self) -> Path:
        configured = self._run.spec.checkpoints.directory
        return Path(configured) if configured else self._run_dir / "checkpoints"

    def _start_trainer(self, attempt: int) -> None:
        inherited: tuple[int, ...] = ()
        if self._metrics is not None:
            inherited = (self._metrics.fileno(),)
        command = TrainerCommand(
            manifest=str(self._opts.manifest),
            workdir=str(self._opts.workdir),
            socket=str(self._socket),
            attempt=attempt,
            log_format=self._opts.log_format,
            metrics_fd=inherited[0] if inherited else None,
            profile=self._opts.profile or "",
            verbose=self._opts.verbose,
            # a drill fires once: a restarted trainer gets none
            inject=tuple(d.raw for d in self._trainer_drills) if attempt == 1 else (),
        )
        cmd = [*python_module(TRAINER_MODULE, sys.executable), *command.args()]
        # SIGTERM when we die: the trainer stops after its step and still writes its report
        env = {**os.environ, **child_environment(signal.SIGTERM), **self._identity()}
        if self._sidecar is not None:
            env[SIDECAR_PID_ENV] = str(self._sidecar.proc.pid)
        self._forwarded = 0
        self._trainer = subprocess.Popen(cmd, env=env, pass_fds=inherited, process_group=0)

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
        previous = self._install_signals()
        try:
            return self._run_with_metrics()
        finally:
            self._restore_signals(previous)

    def _run_with_metrics(self) -> int:
        try:
            self._metrics = open_metrics_socket(self._run.spec.telemetry, self._opts.metrics_port)
            if self._sidecar_metrics_port:  # the sidecar binds it; taken is refused here, by name
                address = self._run.spec.telemetry.metrics_address
                port = self._sidecar_metrics_port
                bind_metrics_socket(address, port, field=SIDECAR_METRICS_FLAG).close()
        except MetricsPortUnavailable as err:  # before the lock: a refusal leaves nothing
            if self._metrics is not None:
                self._metrics.close()
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
        code = 1
        try:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            if no_room := reserve(  # the final report must fit even on a full disk (R13.5)
                self._report_path,
                placeholder(self._run.name, self.instance_id),
                reserve_bytes(self._run.spec.training.epochs),
            ):
                self.seen.warnings.append(no_room)
            try:
                self._start_sidecar()
            except SidecarDidNotStart as err:
                logger.error("%s", err)
                self.seen.notes.append(str(err))
            else:
                if not self._stop.is_set():
                    code = self._attempts()
        finally:
            self._shutdown()
        return self._finish(code)

    def _attempts(self) -> int:
        """Runs trainer attempts until one ends with a final code, a signal, or no restarts."""
        attempt = 1
        self._start_trainer(attempt)
        while True:
            code = self._wait_trainer()
            if code in FINAL_CODES or self._stop.is_set():
                return code
            self.seen.deaths.append(Death(attempt, code))
            if self.seen.restarts >= self._run.spec.restarts.limit:
                self.seen.notes.append(
                    f"trainer died (exit {code}) and the restart limit "
                    f"({self._run.spec.restarts.limit}) is used up"
                )
                return 1
            self.seen.restarts += 1
            attempt += 1
            logger.warning(
                "trainer died (exit %s); restart %d, attempt %d",
                code,
                self.seen.restarts,
                attempt,
            )
            self._start_trainer(attempt)

    def _wait_trainer(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 1
        while True:
            code = trainer.poll()
            if code is not None:
                return code
            self._forward_signals(trainer)
            sidecar = self._sidecar
            if sidecar is not None and sidecar.proc.poll() is not None and not self._stop.is_set():
                self.seen.sidecar_restarts += 1
                logger.warning("sidecar died (exit %s); restarting it", sidecar.proc.returncode)
                try:
                    self._start_sidecar()
                except SidecarDidNotStart as err:
                    logger.error("%s", err)
            time.sleep(POLL_S)

    def _forward_signals(self, trainer: subprocess.Popen[bytes]) -> None:
        """Passes the signals received on to the trainer, from the supervision loop (never
        from the handler): SIGINT for each of the first two, SIGKILL when the grace is over.
        SIGINT, whatever we got: SIGTERM is the trainer's parent-death signal, which tells it
        that we died."""
        wanted = min(len(self.seen.signals), 2)
        while self._forwarded < wanted:
            self._forwarded += 1
            trainer.send_signal(signal.SIGINT)
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            logger.error("the trainer did not end in time: SIGKILL")
            trainer.kill()
            self.seen.trainer_killed = True
            self._kill_at = None

    def _install_signals(self) -> dict[int, object]:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            del frame
            self.seen.signals.append(signum)
            self._stop.set()
            count = len(self.seen.signals)
            if count == 1:
                logger.warning("%s: stopping the run after the current step", signal_name(signum))
            elif count == 2:
                logger.warning(
                    "%s again: abandoning the current step (kill in %.0f s)",
                    signal_name(signum),
                    ESCALATED_GRACE_S,
                )
                self._kill_at = time.monotonic() + ESCALATED_GRACE_S
            else:
                self._kill_at = time.monotonic()

        return {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}

    @staticmethod
    def _restore_signals(previous: dict[int, object]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _stop_child(
        self, proc: subprocess.Popen[str] | subprocess.Popen[bytes], signum: int
    ) -> None:
        grace = ESCALATED_GRACE_S if len(self.seen.signals) > 1 else STOP_GRACE_S
        proc.send_signal(signum)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _shutdown(self) -> None:
        """Trainer first (its report needs the sidecar), then the sidecar; then whatever a
        killed child left behind."""
        trainer = self._trainer
        if trainer is not None and trainer.poll() is None:
            if self._forwarded:
                try:
                    trainer.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    trainer.kill()
                    trainer.wait()
            else:
                self._stop_child(trainer, signal.SIGINT)
        sidecar = self._sidecar
        if sidecar is not None and sidecar.proc.poll() is None:
            self._stop_child(sidecar.proc, signal.SIGTERM)
        remove_instance_segments(self.instance_id)  # exact names: never another run's
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- the report --------------------------------------------------------------------------
    def _trainer_report(self) -> RunReport | None:
        """The last attempt's report, or None when it wrote none over the placeholder."""
        report = RunReport()
        try:
            json_format.Parse(self._report_path.read_text(encoding="utf-8"), report)
        except (OSError, UnicodeDecodeError, json_format.ParseError):
            return None
        return None if is_placeholder(report) else report

    def _finish(self, code: int) -> int:
        if code == 2:
            self._forget_run_dir()
            return code
        report = self._trainer_report()
        from_trainer = report is not None
        if report is None:
            report = RunReport(
                version=1, run_id=self._run.name, status=RunPhase.Failed, exit_code=1
            )
            report.reason = (
                "; ".join(self.seen.notes) or f"trainer ended with exit code {code} and no report"
            )
            report.epochs_planned = self._run.spec.training.epochs
        report.restarts = self.seen.restarts
        report.sidecar_restarts = self.seen.sidecar_restarts
        report.instance_id = report.instance_id or self.instance_id
        report.lineage_id = report.lineage_id or self._prepared.lineage_id
        if self._prepared.resume is not None:
            report.resumed_from = str(self._prepared.resume.path)
        for change in check_checkpoints(report, self._checkpoint_dir(), self.instance_id):
            logger.info("report checkpoints: %s", change)
        record_trainer_drills(report, self._trainer_drills, self.seen.deaths)
        record_sidecar_drills(report, self._sidecar_drills, self.seen.sidecar_restarts)
        order_drills(report, self._opts.drills)
        if self.seen.signals:
            record_stop(
                report,
                self.seen.signals,
                from_trainer=from_trainer,
                trainer_killed=self.seen.trainer_killed,
                epochs=self._run.spec.training.epochs,
            )
        elif code not in FINAL_CODES or (self.seen.notes and report.status == RunPhase.Running):
            report.status = RunPhase.Failed
            report.exit_code = 1
            report.reason = "; ".join(self.seen.notes) or report.reason
        if self.seen.notes and not report.reason:
            report.reason = "; ".join(self.seen.notes)
        self._add_warnings(report)
        try:
            from tolaria_trainer.report import write_report

            write_report(report, self._report_path)
        except ReportNotWritten as err:
            logger.error("%s", err)
        self._print_finish(report, self._report_path)
        return int(report.exit_code)

    def _add_warnings(self, report: RunReport) -> None:
        warnings = list(self.seen.warnings)
        if self._sidecar is not None:
            self.seen.log_lines_lost += self._sidecar.lines_lost
            self._sidecar.lines_lost = 0
        if self.seen.log_lines_lost:
            warnings.append(
                f"sidecar.log: {self.seen.log_lines_lost} line(s) of the sidecar's output "
                "not written (disk full)"
            )
        for warning in warnings:
            if warning not in report.warnings:
                report.warnings.append(warning)

    def _forget_run_dir(self) -> None:
        """Invalid input leaves nothing: the run directory if we made it, else our
        placeholder report."""
        if self._made_run_dir:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        elif self._trainer_report() is None:
            with contextlib.suppress(OSError):
                self._report_path.unlink()

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
