"""The `tolaria` command line: `run`, `validate`, `drills`.

`tolaria run` runs the manifest like a pod: the sidecar and the trainer as
supervised child processes (see `supervisor.py`); `--no-sidecar` trains in
this process with the epoch-boundary guards only (no snapshots, rollbacks or
emergency broadcast). Exit codes (stable): 0 succeeded, 1 failed, 2 invalid
input (manifest, flags, task, drills), 3 halted by an emergency, 130/143
stopped by SIGINT (Ctrl-C)/SIGTERM (status `Stopped`, report written; a second
signal abandons the step in progress, still with a report). Invalid input
is refused before anything is created on disk, with a message naming the field
and the rule. `--workdir` and `--inject` are stable spellings; later versions
add values. This module imports torch only for `--no-sidecar`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from leyline import RunPhase, RunReport
from leyline.spec import ManifestInvalid, load_manifest
from tolaria_trainer.drills import KINDS, DrillSpec, parse_drill
from tolaria_trainer.errors import DrillInvalid, TaskInvalid
from tolaria_trainer.report import write_report
from tolaria_trainer.report_file import ReportNotWritten
from tolaria_trainer.stopping import (
    Interrupted,
    StopRequest,
    exit_now,
    ignore_stop_signals,
    install_stop_handlers,
)
from tolaria_trainer.supervisor import Supervisor, SupervisorOptions

EXIT_FAILED = 1
EXIT_INVALID = 2

logger = logging.getLogger("tolaria")


def _epochs(text: str) -> frozenset[int]:
    try:
        values = frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected epochs like 0,3 (got {text!r})") from err
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("epochs must be >= 0")
    return values


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a port number (got {text!r})") from err
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return port


def _drill(text: str) -> DrillSpec:
    try:
        return parse_drill(text)
    except DrillInvalid as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--inject {text!r}: ")) from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria", description="Run and guard PyTorch training from a TolariaRun manifest."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TolariaRun manifest on this machine")
    run.add_argument("manifest", type=Path, help="TolariaRun YAML file")
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path("runs"),
        help="where runs keep their files (default: ./runs); the run uses WORKDIR/<name>",
    )
    run.add_argument(
        "--inject",
        type=_drill,
        action="append",
        default=[],
        metavar="DRILL",
        help="fire drill NAME@TRIGGER=N[,KEY=VALUE]; repeatable; see `tolaria drills`",
    )
    run.add_argument(
        "--log-format",
        choices=("rich", "json"),
        default="rich",
        help="rich progress for people, or one JSON object per line for machines",
    )
    run.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics on this port (0 picks a free one)",
    )
    run.add_argument(
        "--profile",
        type=_epochs,
        default=None,
        metavar="EPOCHS",
        help="write Chrome traces of these epochs, e.g. 0,3",
    )
    resume = run.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in WORKDIR/<name> from its newest valid checkpoint "
        "(spec.training must not have changed)",
    )
    resume.add_argument(
        "--fresh",
        action="store_true",
        help="move an earlier run's WORKDIR/<name> aside (to <name>.<UTC time>) and start over",
    )
    run.add_argument(
        "--no-sidecar",
        action="store_true",
        help="train in this process without the sidecar (no snapshots or rollbacks)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log INFO to stderr")
    validate = sub.add_parser("validate", help="check a manifest without running it")
    validate.add_argument("manifest", type=Path)
    sub.add_parser("drills", help="list the fire drills --inject accepts")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _failed_report(name: str, reason: str, *, stop: StopRequest | None = None) -> RunReport:
    """What the report says when the run ended before the runtime could write one."""
    if stop is not None and stop.is_set():
        return RunReport(
            version=1,
            run_id=name,
            status=RunPhase.Stopped,
            reason=reason,
            exit_code=stop.exit_code,
        )
    return RunReport(
        version=1, run_id=name, status=RunPhase.Failed, reason=reason, exit_code=EXIT_FAILED
    )


def cmd_run(args: argparse.Namespace) -> int:
    run = load_manifest(args.manifest)
    if args.no_sidecar:
        return _run_in_process(run, args)
    profile = ",".join(str(e) for e in sorted(args.profile)) if args.profile else None
    options = SupervisorOptions(
        manifest=args.manifest.resolve(),
        workdir=args.workdir.resolve(),
        drills=tuple(args.inject),
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        profile=profile,
        verbose=args.verbose,
        resume=args.resume,
        fresh=args.fresh,
    )
    return Supervisor(run, options).run()


def _run_in_process(run: object, args: argparse.Namespace) -> int:
    from tolaria_trainer.device import DeviceUnavailable
    from tolaria_trainer.progress import JsonView, ProgressView, RichView
    from tolaria_trainer.runtime import RunOptions, run_training

    view: ProgressView = JsonView() if args.log_format == "json" else RichView()
    stop = StopRequest()
    install_stop_handlers(stop, cause=lambda signum: "")
    options = RunOptions(
        workdir=args.workdir,
        view=view,
        drills=tuple(args.inject),
        metrics_port=args.metrics_port,
        profile_epochs=args.profile,
        stop=stop,
    )
    name: str = run.name  # type: ignore[attr-defined]
    report_path = args.workdir / name / "report.json"
    try:
        report = run_training(run, options)  # type: ignore[arg-type]
    except (TaskInvalid, DrillInvalid, DeviceUnavailable) as err:
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as err:  # a second signal before training started or while it ended
        report = _failed_report(name, str(err), stop=stop)
        _write_quietly(report, report_path)
    except Exception as err:  # boundary: set-up failed after validation; say why in a report
        logger.exception("run %s could not start", name)
        report = _failed_report(name, f"{type(err).__name__}: {err}", stop=stop)
        _write_quietly(report, report_path)
    view.finish(report, str(report_path))
    return report.exit_code


def _write_quietly(report: RunReport, path: Path) -> None:
    try:
        write_report(report, path)
    except ReportNotWritten as err:
        logger.error("%s", err)


def cmd_validate(args: argparse.Namespace) -> int:
    run = load_manifest(args.manifest)
    print(f"{args.manifest}: valid TolariaRun {run.name!r}")
    return 0


def cmd_drills() -> int:
    for kind in sorted(KINDS.values(), key=lambda k: k.name):
        params = ",".join(f"{k}={v:g}" for k, v in kind.params.items())
        print(
            f"{kind.name}@{kind.trigger}=N"
            + (f"[,{params}]" if params else "")
            + f"  {kind.summary}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    try:
        if args.command == "run":
            code = cmd_run(args)
            ignore_stop_signals()  # the report is written; the exit code is the run's
            if args.no_sidecar and argv is None:  # torch trained here: see `exit_now`
                exit_now(code)
            return code
        if args.command == "validate":
            return cmd_validate(args)
        return cmd_drills()
    except ManifestInvalid as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except (TaskInvalid, DrillInvalid) as err:
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    raise SystemExit(main())
