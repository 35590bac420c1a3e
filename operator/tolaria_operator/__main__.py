"""`tolaria-operator` / `python -m tolaria_operator`: the operator's command line.

Takes kopf's usual flags (`-n/--namespace` repeatable, `-A/--all-namespaces`, `--standalone`,
`--liveness`, `-v/--verbose`, `-d/--debug`, `-q/--quiet`, `--log-format`, `--peering`,
`--priority`, `--dev`) and delegates to kopf's own CLI with `-m tolaria_operator.handlers`;
kopf reads the cluster from KUBECONFIG or the in-cluster service account. Tolaria's
settings come from `TOLARIA_OPERATOR_<SECTION>_<FIELD>` variables or `--set
section.field=value` (which wins); they are validated here, before anything connects, and a
bad one exits with code 2 naming it.

    tolaria-operator -A --standalone --liveness http://0.0.0.0:8080/healthz \\
        --set pods.native_sidecar=false --set metrics.port=9403
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tolaria_operator.config import env_name, from_env
from tolaria_operator.errors import SettingsInvalid

EXIT_INVALID = 2
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tolaria-operator",
        description="The Tolaria Kubernetes operator (kopf): TolariaRun -> pods, status, "
        "rollback deadlines, incidents.",
    )
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--standalone", action="store_true", help="no peering (one replica)")
    p.add_argument("-L", "--liveness", metavar="URL", help="kopf's liveness endpoint")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--log-format", choices=("plain", "full", "json"))
    p.add_argument("-P", "--peering", help="kopf peering object")
    p.add_argument("-p", "--priority", type=int, help="kopf peering priority")
    p.add_argument("--dev", action="store_true", help="kopf's development mode")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a Tolaria setting, e.g. pods.native_sidecar=false (see tolaria_operator.config)",
    )
    return p


def settings_environment(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The environment with `--set`, the watched namespaces and the operator's own namespace
    applied (flags win over variables, variables over the service account's namespace)."""
    out = dict(env)
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise SettingsInvalid(f"--set {item}", "must be SECTION.FIELD=VALUE")
        out[env_name(section, field)] = value
    if args.namespace and not args.all_namespaces:
        out.setdefault(env_name("escalation", "watch_namespaces"), ",".join(args.namespace))
    own = env_name("network", "operator_namespace")
    if own not in out:
        namespace = out.get("POD_NAMESPACE", "")
        if not namespace and SERVICE_ACCOUNT_NAMESPACE.is_file():
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
        if namespace:
            out[own] = namespace
    return out


def kopf_arguments(args: argparse.Namespace, rest: Sequence[str]) -> list[str]:
    """`kopf run` arguments for the parsed flags."""
    out = ["run", "-m", "tolaria_operator.handlers"]
    for namespace in args.namespace:
        out += ["--namespace", namespace]
    flags = (
        ("--all-namespaces", args.all_namespaces),
        ("--standalone", args.standalone),
        ("--verbose", args.verbose),
        ("--debug", args.debug),
        ("--quiet", args.quiet),
        ("--dev", args.dev),
    )
    out += [flag for flag, on in flags if on]
    for flag, value in (
        ("--liveness", args.liveness),
        ("--log-format", args.log_format),
        ("--peering", args.peering),
        ("--priority", args.priority),
    ):
        if value is not None:
            out += [flag, str(value)]
    return [*out, *rest]


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        env = settings_environment(args, dict(os.environ))
        from_env(env)  # refuse a bad setting before anything starts
    except SettingsInvalid as err:
        print(f"tolaria-operator: {err}", file=sys.stderr)  # noqa: T201 - CLI error output
        return EXIT_INVALID
    os.environ.update(env)
    from kopf import cli

    try:
        cli.main(args=kopf_arguments(args, rest), prog_name="tolaria-operator")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
