"""`tolaria-operator`: kopf's flags passed through, Tolaria's settings validated first."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tolaria_operator import __main__ as cli


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    return cli.build_parser().parse_known_args(list(argv))


def test_kopfs_flags_become_a_kopf_run_of_the_handlers() -> None:
    args, rest = parse(
        "-n",
        "a",
        "--namespace",
        "b",
        "--standalone",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        "-v",
        "--log-format",
        "json",
        "--extra-kopf-flag",
    )
    assert cli.kopf_arguments(args, rest) == [
        "run",
        "-m",
        "tolaria_operator.handlers",
        "--namespace",
        "a",
        "--namespace",
        "b",
        "--standalone",
        "--verbose",
        "--liveness",
        "http://0.0.0.0:8080/healthz",
        "--log-format",
        "json",
        "--extra-kopf-flag",
    ]
    args, rest = parse("-A")
    assert cli.kopf_arguments(args, rest)[3:] == ["--all-namespaces"]


def test_settings_flags_namespaces_and_the_own_namespace_reach_the_environment() -> None:
    args, _ = parse("-n", "a", "-n", "b", "--set", "pods.native_sidecar=false")
    env = cli.settings_environment(args, {"POD_NAMESPACE": "tolaria-system"})
    assert env["TOLARIA_OPERATOR_PODS_NATIVE_SIDECAR"] == "false"
    assert env["TOLARIA_OPERATOR_ESCALATION_WATCH_NAMESPACES"] == "a,b"
    assert env["TOLARIA_OPERATOR_NETWORK_OPERATOR_NAMESPACE"] == "tolaria-system"


def test_a_bad_setting_exits_2_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--set", "pods.native_sidecar=perhaps"]) == cli.EXIT_INVALID
    assert "TOLARIA_OPERATOR_PODS_NATIVE_SIDECAR: must be true or false" in capsys.readouterr().err
    assert cli.main(["--set", "nodot"]) == cli.EXIT_INVALID


def test_the_console_script_is_installed() -> None:
    import shutil
    import sys

    script = Path(sys.executable).parent / "tolaria-operator"
    assert script.exists() or shutil.which("tolaria-operator")
