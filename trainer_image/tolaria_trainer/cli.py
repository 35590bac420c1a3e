"""The `tolaria` command line: `run`, `validate`, `drills`, `checkpoints`.

`tolaria run` runs the manifest like a pod: the sidecar and the trainer as
supervised child processes (see `supervisor.py`); `--no-sidecar` trains in
this process with the epoch-boundary guards only (no snapshots, rollbacks or
emergency broadcast). Exit codes (stable): 0 succeeded, 1 failed, 2 invalid
input (manifest, flags, task, device, metrics port, drills), 3 halted by an
emergency, 130/143 stopped by SIGINT (Ctrl-C)/SIGTERM (status `Stopped`, report
written; a second signal abandons the step in progress, still with a report).
Invalid input is refused before anything is created on disk, with a message
naming the field or flag and the rule. `--workdir` and `--inject` are stable
spellings; later versions add values. `tolaria checkpoints DIR`
(`checkpoints_cli.py`) lists and verifies a checkpoint directory read-only: 0 all
verify, 1 damage, 2 not a directory. This module imports torch only for
`--no-sidecar` and for `validate` without `--offline` (which imports the task and
asks torch about the device).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from leyline import RunPhase, RunReport
from leyline.spec import ManifestInvalid, TolariaRun, load_manifest
from tolaria_trainer.checkpoints_cli import cmd_checkpoints
from tolaria_trainer.drills import KINDS, DrillSpec, parse_drill
from tolaria_trainer.errors import REFUSED_INPUT, DrillInvalid, FlagInvalid
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

VALIDATE_HELP = (
    "Check a TolariaRun manifest without running it. Checks every field and rule, as the "
    "Kubernetes API server does with the CRD; a key written twice is refused too. Then, unless "
    "--offline, imports spec.training.task's module and finds its function (it does not build "
    "the model or load data) and checks that spec.training.device exists on this machine "
    "(device: cuda needs a GPU torch can see). Takes a few seconds, most of it importing torch. "
    "Exit 0: valid; 2: invalid, naming the field and the rule."
)


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
        "--sidecar-metrics-port",
        type=_port,
        default=None,
        help="serve the sidecar's Prometheus metrics (rollbacks, emergencies, checkpoints) "
        "on this port (0 picks a free one); off by default",
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
    validate = sub.add_parser(
        "validate",
        help="check a manifest without running it: schema, task import, device",
        description=VALIDATE_HELP,
    )
    validate.add_argument("manifest", type=Path, help="TolariaRun YAML file")
    validate.add_argument(
        "--offline",
        action="store_true",
        help="check the schema only: no task import, no device check, no torch "
        "(for a manifest meant for another machine or image)",
    )
    sub.add_parser("drills", help="list the fire drills --inject accepts")
    checkpoints = sub.add_parser(
        "checkpoints",
        help="list and verify the checkpoints in a directory (read-only); exit 1 on damage",
    )
    checkpoints.add_argument("directory", type=Path, help="a checkpoint directory")
    checkpoints.add_argument("--json", action="store_true", help="one JSON object instead")
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


def check_profile(run: TolariaRun, epochs: frozenset[int] | None) -> None:
    """Refuses `--profile` epochs the run never reaches (a trace that never comes is a silent
    no-op otherwise); epochs are numbered from 0."""
    last = run.spec.training.epochs - 1
    beyond = sorted(e for e in epochs or () if e > last)
    if beyond:
        which = (
            f"epoch {beyond[0]} is"
            if len(beyond) == 1
            else f"epochs {', '.join(map(str, beyond))} are"
        )
        raise FlagInvalid("--profile", f"{which} never reached (this run's last epoch is {last})")


def cmd_run(args: argparse.Namespace) -> int:
    run = load_manifest(args.manifest)
    check_profile(run, args.profile)
    if args.no_sidecar:
        return _run_in_process(run, args)
    profile = ",".join(str(e) for e in sorted(args.profile)) if args.profile else None
    options = SupervisorOptions(
        manifest=args.manifest.resolve(),
        workdir=args.workdir.resolve(),
        drills=tuple(args.inject),
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        sidecar_metrics_port=args.sidecar_metrics_port,
        profile=profile,
        verbose=args.verbose,
        resume=args.resume,
        fresh=args.fresh,
    )
    return Supervisor(run, options).run()


def _run_in_process(run: object, args: argparse.Namespace) -> int:
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
    except REFUSED_INPUT as err:
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
    """The schema always; unless `--offline`, also what only this machine can tell: whether
    the task imports and the device exists. Raises ManifestInvalid, TaskInvalid or
    DeviceUnavailable; `main` turns each into exit 2."""
    run = load_manifest(args.manifest)
    if args.offline:
        print(f"{args.manifest}: valid TolariaRun {run.name!r} (schema only)")
        return 0
    from tolaria_trainer.device import plan_execution
    from tolaria_trainer.tasks import find_task

    training = run.spec.training
    target = find_task(training)
    plan = plan_execution(training)
    task = training.task if target == training.task else f"{training.task} = {target}"
    print(f"{args.manifest}: valid TolariaRun {run.name!r} (task {task}, device {plan.device})")
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
        if args.command == "checkpoints":
            return cmd_checkpoints(args.directory, as_json=args.json)
        return cmd_drills()
    except ManifestInvalid as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except FlagInvalid as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except REFUSED_INPUT as err:
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    raise SystemExit(main())
