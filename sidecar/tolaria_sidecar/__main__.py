"""`tolaria-sidecar` / `python -m tolaria_sidecar`: the sidecar process's command line.

Parses the flags, loads and validates the manifest, builds the `SidecarConfig` and hands it to
`serving.run`. Invalid input (a bad manifest, flag, token file or drill) exits with code 2 and
names the field on stderr; nothing is created before the input is valid.

    tolaria-sidecar --manifest run.yaml --socket /run/tolaria/sidecar.sock \\
        [--control-address 0.0.0.0:7070 --token-file /var/run/secrets/tolaria/token \\
         --tls-cert /var/run/secrets/tolaria/tls.crt --tls-key /var/run/secrets/tolaria/tls.key] \\
        [--metrics-port 9464] [--checkpoint-dir DIR] [--cleanup-on-exit] \\
        [--remove-socket-dir] [--inject checkpoint-io-error@epoch=N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from leyline.lifecycle import (
    INSTANCE_ENV,
    LINEAGE_ENV,
    RESUME_ALLOWED,
    RESUME_ENV,
    RESUME_REQUIRED,
    adopt_parent_death_signal,
)
from leyline.spec import ManifestInvalid, load_manifest
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import ConfigInvalid

EXIT_INVALID = 2
"""Exit status for input the sidecar refuses (argparse uses it too)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tolaria-sidecar",
        description="The Tolaria rollback/emergency sidecar of one run (no torch).",
    )
    p.add_argument("--manifest", type=Path, required=True, help="the run's TolariaRun YAML")
    p.add_argument("--run-id", help="run id (default: metadata.name)")
    p.add_argument(
        "--instance-id",
        default=os.environ.get(INSTANCE_ENV),
        help=f"this run instance: names the segments (default ${INSTANCE_ENV}, else random)",
    )
    p.add_argument(
        "--lineage-id",
        default=os.environ.get(LINEAGE_ENV),
        help=f"the run this instance continues (default ${LINEAGE_ENV}, else the instance)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=os.environ.get(RESUME_ENV, "") in (RESUME_ALLOWED, RESUME_REQUIRED),
        help="the durable tier may load checkpoints of other instances of the lineage",
    )
    p.add_argument("--socket", type=Path, required=True, help="Unix socket for the trainer")
    p.add_argument(
        "--control-address",
        metavar="HOST:PORT",
        help="serve the authenticated control API on TCP (port 0: any; printed on READY)",
    )
    p.add_argument("--token-file", type=Path, help="file holding the run token")
    p.add_argument(
        "--tls-cert",
        type=Path,
        help="PEM server certificate of the control port (with --tls-key); required unless "
        "the control address is loopback",
    )
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (0 picks a free one; off when not given)",
    )
    p.add_argument(
        "--metrics-address", help="bind address for metrics (default spec.telemetry.metricsAddress)"
    )
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="checkpoint directory (default: spec.checkpoints.directory, else "
        "<socket dir>/checkpoints)",
    )
    p.add_argument(
        "--cleanup-on-exit",
        action="store_true",
        help="unlink the run's shared-memory segments at exit (local mode)",
    )
    p.add_argument(
        "--remove-socket-dir",
        action="store_true",
        help="the socket's directory was made for this sidecar: remove it at exit (local mode)",
    )
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="DRILL",
        help="sidecar-side drill: checkpoint-io-error@epoch=N, slow-checkpoint@epoch=N[,seconds=S]",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    adopt_parent_death_signal()  # a supervising `tolaria run` may die; do not outlive it
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run = load_manifest(args.manifest)
        config = SidecarConfig.from_run(
            run,
            socket_path=args.socket,
            run_id=args.run_id,
            instance_id=args.instance_id,
            lineage_id=args.lineage_id,
            resume=args.resume,
            control_address=args.control_address,
            token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            metrics_port=args.metrics_port,
            metrics_address=args.metrics_address,
            checkpoint_dir=args.checkpoint_dir,
            cleanup_on_exit=args.cleanup_on_exit,
            remove_socket_dir=args.remove_socket_dir,
            inject=tuple(args.inject),
        )
        from tolaria_sidecar.serving import run as run_sidecar

        return run_sidecar(config)
    except (ManifestInvalid, ConfigInvalid) as err:
        print(f"tolaria-sidecar: {err}", file=sys.stderr)  # noqa: T201 - CLI error output
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
