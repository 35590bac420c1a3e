"""A real Prometheus scraping a real local Tolaria run: shared by the live monitoring tests
(tests/monitoring/) and scripts/render_dashboard.py, so both see the same thing.

Why it exists: the alert rules and the dashboard are only worth shipping if their queries work
against what the trainer and the sidecar really expose, under the labels the chart's monitors
give them. This module starts

* `Prometheus`: the `prometheus` binary in a temporary directory, on a free loopback port,
  scraping every second, evaluating rules every second, with targets from `file_sd` files;
* `LocalRun`: `tolaria run` with both metrics endpoints (`--metrics-port`,
  `--sidecar-metrics-port`) on ports chosen beforehand, and drills;

and offers what both users need around them: the labels a PodMonitor would set
(`pod_labels`), a copy of the shipped rules with shorter `for:` durations (`scaled_rules`),
and the dashboard's queries with Grafana's variables substituted (`dashboard_queries`).

Waits poll for progress against generous deadlines; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "charts/tolaria/files/prometheus/tolaria-rules.yaml"
DASHBOARD = ROOT / "charts/tolaria/files/grafana/tolaria-overview.json"
LOCAL_NAMESPACE = "local"
"""The `namespace` label given to a local run's targets (a pod's namespace on a cluster)."""
RUN_JOB = "tolaria-runs"
OPERATOR_JOB = "tolaria-operator"
READY_DEADLINE_S = 120.0
"""Prometheus answers /-/ready within seconds; a loaded 2-core machine may take much longer."""
URL_DEADLINE_S = 300.0
"""Until a run prints both metrics URLs: a sidecar start and a torch import on a loaded box."""

T = TypeVar("T")


class PromQLError(RuntimeError):
    """Prometheus refused a query; the message is Prometheus's."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], deadline_s: float, step_s: float = 0.5) -> T:
    """Polls `probe` until it returns something truthy; raises TimeoutError naming `what` and
    the last value after `deadline_s`."""
    end = time.monotonic() + deadline_s
    last: T | None = None
    while time.monotonic() < end:
        last = probe()
        if last:
            return last
        time.sleep(step_s)
    raise TimeoutError(f"{what}: not within {deadline_s:.0f} s (last: {last!r})")


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as `10m`, `1h30m` or `90s`."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def scaled_rules(source: Path, target: Path, factor: float) -> Path:
    """Writes `source` to `target` with every `for:` divided by `factor` (at least 1 s).

    Why: a live test cannot wait ten minutes, and a shipped rule must not be weakened for a
    test. Only the pending time changes; expressions, thresholds and labels stay the shipped
    ones, so the test still proves that the expression matches what the processes expose.
    The promtool unit tests check the real `for:` durations.
    """
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                seconds = max(1.0, parse_duration(str(rule["for"])) / factor)
                rule["for"] = f"{round(seconds)}s"
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


def pod_labels(run: str, namespace: str = LOCAL_NAMESPACE) -> dict[str, str]:
    """The labels the chart's PodMonitor gives a run pod's targets: `namespace`, `pod`, and the
    pod's `tolaria.dev/run` label as `run`. A local run has one "pod", named like attempt 1."""
    return {"namespace": namespace, "pod": f"{run}-a1", "run": run}


@dataclass(frozen=True)
class Target:
    """One scrape target: `host:port` and the labels its scrape config sets."""

    job: str
    address: str
    labels: Mapping[str, str]


def address_of(url: str) -> str:
    """`host:port` of a `/metrics` URL."""
    return urllib.parse.urlsplit(url).netloc


class PrometheusAPI:
    """The HTTP API of a Prometheus at `url` (one this module started, or anyone's)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def api(self, path: str, **params: str) -> Any:
        """GET `/api/v1/<path>`; returns `data`, raises PromQLError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our http URL
                body = json.load(response)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} ({params})")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (vector or scalar as a one-element list)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        return list(data["result"])

    def values(self, expr: str) -> list[float]:
        """The values of an instant query, one per series."""
        return [float(r["value"][1]) for r in self.query(expr)]

    def alerts(self) -> list[dict[str, Any]]:
        """Every pending or firing alert (`/api/v1/alerts`)."""
        return list(self.api("alerts")["alerts"])

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == name and a["state"] == "firing"
        ]


class Prometheus(PrometheusAPI):
    """A real Prometheus process; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
        binary: str = "prometheus",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self._rule_files = list(rule_files)
        self._interval = interval
        self._binary = binary
        self._targets: list[Target] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def _write_targets(self) -> None:
        by_job: dict[str, list[Target]] = {}
        for target in self._targets:
            by_job.setdefault(target.job, []).append(target)
        for job in (RUN_JOB, OPERATOR_JOB):
            groups = [
                {"targets": [t.address], "labels": dict(t.labels)} for t in by_job.get(job, [])
            ]
            path = self.workdir / f"{job}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(groups))
            tmp.replace(path)  # atomic: Prometheus never reads half a file

    def add_targets(self, *targets: Target) -> None:
        """Adds scrape targets (picked up within a second or two through file_sd; call
        `wait_discovered` before anything that must be seen from its first second)."""
        self._targets.extend(targets)
        self._write_targets()

    def wait_discovered(self, targets: Sequence[Target], deadline_s: float) -> None:
        """Waits until Prometheus scrapes every target in `targets` (file_sd is read on a
        timer, later still on a loaded machine): from then on a process listening there is
        scraped within one interval of its start."""
        wanted = {t.address for t in targets}

        def discovered() -> bool:
            active = self.api("targets", state="active")["activeTargets"]
            return wanted <= {t["discoveredLabels"].get("__address__") for t in active}

        wait_for("Prometheus to discover the targets", discovered, deadline_s)

    def start(self) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_targets()
        config = {
            "global": {
                "scrape_interval": self._interval,
                "scrape_timeout": self._interval,
                "evaluation_interval": self._interval,
            },
            "rule_files": [str(p) for p in self._rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "file_sd_configs": [
                        {"files": [str(self.workdir / f"{job}.json")], "refresh_interval": "1s"}
                    ],
                }
                for job in (RUN_JOB, OPERATOR_JOB)
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("Prometheus ready", self._ready, READY_DEADLINE_S)
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self._proc.returncode}: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:  # noqa: S310 - our http URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-size:]
        return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalRun:
    """`tolaria run` of `manifest` with both metrics endpoints on free ports; see the module
    docstring. Its JSON output lines are kept in `events`."""

    manifest: dict[str, Any]
    workdir: Path
    drills: Sequence[str] = ()
    events: list[dict[str, Any]] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    ports: dict[str, int] = field(
        default_factory=lambda: {"trainer": free_port(), "sidecar": free_port()}
    )
    """Chosen before the run starts, so Prometheus scrapes them from the first second: a
    target found later (file_sd updates reach the scraper up to 5 s late) could miss what a
    fast run does first."""

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def report_path(self) -> Path:
        return self.workdir / "runs" / self.name / "report.json"

    def start(self) -> LocalRun:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.manifest))
        command = [sys.executable, "-m", "tolaria_trainer.cli", "run", str(path)]
        command += ["--workdir", str(self.workdir / "runs"), "--log-format", "json", "--fresh"]
        command += ["--metrics-port", str(self.ports["trainer"])]
        command += ["--sidecar-metrics-port", str(self.ports["sidecar"])]
        for drill in self.drills:
            command += ["--inject", drill]
        with (self.workdir / "stderr.log").open("w") as stderr:
            self.proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        threading.Thread(target=self._pump, name="run-output", daemon=True).start()
        return self

    def _pump(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.append(json.loads(line))

    def url(self, which: str, deadline_s: float = URL_DEADLINE_S) -> str:
        """The metrics URL the run printed for `which` ("trainer" or "sidecar"). The sidecar's
        comes first: it is READY before the trainer starts importing torch."""
        message = {"trainer": "metrics served", "sidecar": "sidecar metrics served"}[which]

        def printed() -> str | None:
            found = next((e["url"] for e in self.events if e.get("message") == message), None)
            if found is None and self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the run ended without a {which} URL: {self.events[-5:]}")
            return str(found) if found else None

        return wait_for(f"the {which}'s metrics URL", printed, deadline_s, step_s=0.1)

    def target(self, which: str, namespace: str = LOCAL_NAMESPACE) -> Target:
        """The trainer or the sidecar as a scrape target, labelled as a PodMonitor would
        (known before the run starts)."""
        address = f"127.0.0.1:{self.ports[which]}"
        return Target(RUN_JOB, address, pod_labels(self.name, namespace))

    def wait(self, deadline_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=deadline_s)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT (the run ends its step and writes its report), then SIGKILL after `grace_s`
        (a hung trainer cannot end its step; the supervisor's death stops its children)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel with queries (rows and text panels have none)."""
    for panel in board.get("panels", []):
        yield from panels(panel)
        if panel.get("targets"):
            yield panel


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Grafana's variables in `expr` replaced: `$name` and `${name}` (longest names first, so
    `$__rate_interval` is not read as `$__rate`)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def regex_value(value: str) -> str:
    """A variable's value as Grafana's Prometheus data source writes it into `=~"..."`: regex
    metacharacters escaped with a backslash that is itself escaped for the PromQL string."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def grafana_variables(
    namespace: str, run: str, rate_interval: str = "15s", range_: str = "5m"
) -> dict[str, str]:
    """What Grafana would put in the dashboard's queries for one run (the dashboard matches its
    variables with `=~`)."""
    return {
        "namespace": regex_value(namespace),
        "run": regex_value(run),
        "__rate_interval": rate_interval,
        "__interval": "1s",
        "__range": range_,
    }


def dashboard_queries(
    board: Mapping[str, Any], variables: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """(panel title, legend, query) of every target of every panel, variables substituted."""
    return [
        (str(panel["title"]), str(t.get("legendFormat", "")), substitute(t["expr"], variables))
        for panel in panels(board)
        for t in panel["targets"]
        if t.get("expr")
    ]


def temporary_directory(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
