"""One trainer process: `python -m tolaria_trainer.worker` (a container's command, or a child
of `tolaria run`).

Trains the manifest with the recovery layer attached to the sidecar at
`--socket`, writes `<workdir>/<run>/report.json` and exits with the run's code
(0 succeeded, 1 failed, 2 invalid input, 3 halted, 130/143 stopped by
SIGINT/SIGTERM). A restarted worker finds the sidecar's committed slots and
resumes from the newest valid one (R6.2). Under `tolaria run` its parent-death
signal is SIGTERM: when the supervisor dies the run stops after the current
step and the report says so (R13.5).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from leyline import RunPhase
from leyline.lifecycle import (
    INSTANCE_ENV,
    RESUME_ENV,
    RESUME_REQUIRED,
    adopt_parent_death_signal,
)
from leyline.spec import ManifestInvalid, load_manifest
from leyline.termination import TerminationMessage
from tolaria_trainer.drills import DrillSpec, parse_drill
from tolaria_trainer.errors import REFUSED_INPUT, DrillInvalid
from tolaria_trainer.progress import JsonView, ProgressView, RichView
from tolaria_trainer.recovery.participant import POD_MODE_ENV
from tolaria_trainer.runtime import EXIT_INVALID, RunOptions, run_training
from tolaria_trainer.stopping import (
    Interrupted,
    StopRequest,
    exit_now,
    ignore_stop_signals,
    install_stop_handlers,
)

logger = logging.getLogger("tolaria.worker")

REFUSED: tuple[type[Exception], ...] = (ManifestInvalid, *REFUSED_INPUT)
"""Input refused before anything is written: exit 2 with the message, no traceback."""


def _drill(text: str) -> DrillSpec:
    try:
        return parse_drill(text)
    except DrillInvalid as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tolaria-worker", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--socket", required=True, help="the sidecar's TrainerLink Unix socket")
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("--inject", type=_drill, action="append", default=[])
    p.add_argument("--log-format", choices=("rich", "json"), default="rich")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument(
        "--metrics-fd",
        type=int,
        default=None,
        help="serve metrics on this inherited, listening socket (from `tolaria run`)",
    )
    p.add_argument(
        "--profile", type=lambda s: frozenset(int(x) for x in s.split(",") if x), default=None
    )
    p.add_argument(
        "--pod",
        action="store_true",
        help="in a pod: write the outcome to --termination-log and exit 0 for every final "
        "outcome, so the kubelet restarts only crashes (restartPolicy OnFailure)",
    )
    p.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _terminate(args: argparse.Namespace, phase: RunPhase.ValueType, code: int, reason: str) -> int:
    """In a pod, report the outcome through the termination message and exit 0 (final);
    locally, exit with the run's code."""
    if not args.pod:
        return code
    message = TerminationMessage(phase, code, reason).encode()
    try:
        args.termination_log.write_text(message, encoding="utf-8")
    except OSError as err:
        logger.error("cannot write the termination message to %s: %s", args.termination_log, err)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = StopRequest()
    install_stop_handlers(stop)  # before the parent-death signal can arrive
    adopt_parent_death_signal()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s trainer[{args.attempt}] %(name)s: %(message)s",
    )
    try:
        return _work(args, stop)
    except Interrupted as err:  # a second signal outside `run_training`: no report to write
        logger.error("%s", err)
        return _terminate(args, RunPhase.Stopped, stop.exit_code, str(err))
    finally:
        ignore_stop_signals()  # the exit code is the run's, whatever comes now


def _work(args: argparse.Namespace, stop: StopRequest) -> int:
    view: ProgressView = JsonView() if args.log_format == "json" else RichView()
    if args.pod:
        os.environ[POD_MODE_ENV] = str(args.termination_log)
    try:
        run = load_manifest(args.manifest)
        report = run_training(
            run,
            RunOptions(
                workdir=args.workdir,
                view=view,
                drills=tuple(args.inject),
                metrics_port=args.metrics_port,
                metrics_socket=(
                    socket.socket(fileno=args.metrics_fd) if args.metrics_fd is not None else None
                ),
                profile_epochs=args.profile,
                stop=stop,
                sidecar_socket=args.socket,
                attempt=args.attempt,
                instance_id=os.environ.get(INSTANCE_ENV) or None,
                resume_required=os.environ.get(RESUME_ENV, "") == RESUME_REQUIRED,
            ),
        )
    except REFUSED as err:
        sys.stderr.write(f"error: {args.manifest}: {err}\n")
        return _terminate(args, RunPhase.Failed, EXIT_INVALID, str(err))
    return _terminate(args, report.status, report.exit_code, report.reason)


if __name__ == "__main__":
    exit_now(main())
