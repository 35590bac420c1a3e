"""Renders the Grafana dashboard's panels to a PNG from real query results of a live Prometheus.

Why: a dashboard JSON says nothing about what it shows until it is pointed at data; this draws
every panel of `charts/tolaria/files/grafana/tolaria-overview.json` with matplotlib from the
same queries Grafana would run (variables substituted), so the picture in the README is what
the dashboard shows for a real run. It draws; it does not imitate Grafana's styling.

    # a real local run with drills, watched by a real Prometheus, drawn when it ends:
    .venv/bin/python scripts/render_dashboard.py --out docs/images/dashboard.png

    # or draw from a Prometheus you already run (the last 30 minutes of one run):
    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --namespace ml --run my-run --minutes 30

Needs `prometheus` on PATH for the first form and matplotlib (the `dev` extra). Panels whose
queries return nothing say so (a local run has no operator: its panels are empty).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
from livemon import (
    ROOT,
    LocalRun,
    Prometheus,
    PrometheusAPI,
    dashboard,
    grafana_variables,
    panels,
    substitute,
    temporary_directory,
)
from matplotlib.axes import Axes
from matplotlib.gridspec import GridSpec

DEMO_DRILLS = ("loss-spike@step=2000", "checkpoint-io-error@epoch=40", "loss-spike@step=9000")
"""What the picture shows: two fast rollbacks (SEVERE emergencies resolved at once) and one
failed checkpoint write, in a run that then succeeds."""
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ("#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def demo_manifest(name: str) -> dict[str, Any]:
    """A run of one to two minutes on a laptop: enough epochs for the hook and checkpoint panels."""
    return {
        "apiVersion": "tolaria.dev/v1alpha1",
        "kind": "TolariaRun",
        "metadata": {"name": name},
        "spec": {
            "training": {
                "task": "synthetic-mlp",
                "epochs": 120,
                "batchSize": 32,
                "data": {"trainSamples": 4096, "validationSamples": 512},
                "model": {"hiddenSize": 256, "layers": 3},
            },
            "snapshots": {"everySteps": 25},
        },
    }


def legend(template: str, metric: dict[str, str]) -> str:
    text = LEGEND.sub(lambda m: metric.get(m.group(1), ""), template).strip()
    text = text.replace("ROLLBACK_TIER_", "").replace("ROLLBACK_OUTCOME_", "")
    text = text.replace("CHECKPOINT_OUTCOME_", "").replace("EMERGENCY_LEVEL_", "")
    return text or ",".join(f"{k}={v}" for k, v in metric.items()) or "value"


def scale(unit: str, values: Sequence[float]) -> tuple[float, str]:
    """A factor and a unit label that keep the numbers readable (seconds shown in ms when
    they are small)."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    if unit == "s" and finite and max(finite) < 1:
        return 1000.0, "ms"
    return 1.0, "" if unit == "short" else unit


def draw_panel(
    ax: Axes, prom: PrometheusAPI, panel: dict[str, Any], variables: dict[str, str], span: tuple
) -> None:
    start, end, step = span
    ax.set_facecolor(PANEL)
    ax.set_title(panel["title"], color=TEXT, fontsize=10, loc="left")
    ax.tick_params(colors=TEXT, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.grid(color=GRID, linewidth=0.5)
    lines: list[tuple[str, list[float], list[float]]] = []
    for target in panel["targets"]:
        expr = substitute(target["expr"], variables)
        for series in prom.query_range(expr, start, end, step):
            xs = [float(t) - start for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            lines.append((legend(target.get("legendFormat", ""), series["metric"]), xs, ys))
    operator_only = all("tolaria_operator_" in t["expr"] for t in panel["targets"])
    hidden = 0
    if len(lines) > 4:  # many label values, most at 0 (tiers x outcomes): draw what moved
        moved = [line for line in lines if any(y for y in line[2] if math.isfinite(y))]
        shown = moved or lines[:1]
        hidden, lines = len(lines) - len(shown), shown
    if not lines:
        why = "no data: a local run has no operator" if operator_only else "no data"
        ax.text(0.5, 0.5, why, color=TEXT, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    factor, label = scale(unit, [y for _, _, ys in lines for y in ys])
    bars = panel["fieldConfig"]["defaults"].get("custom", {}).get("drawStyle") == "bars"
    for i, (name, xs, ys) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        scaled = [y * factor for y in ys]
        if bars:
            ax.bar(xs, scaled, width=step, color=color, label=name, alpha=0.85)
        else:
            ax.plot(xs, scaled, color=color, label=name, linewidth=1.4)
    ax.set_xlabel("seconds since start", color=TEXT, fontsize=7)
    if label:
        ax.set_ylabel(label, color=TEXT, fontsize=7)
    title = f"{hidden} series at 0 not drawn" if hidden else None
    ax.legend(
        fontsize=6,
        facecolor=PANEL,
        edgecolor=GRID,
        labelcolor=TEXT,
        loc="upper left",
        title=title,
        title_fontsize=6,
    )


def render(
    prom: PrometheusAPI, namespace: str, run: str, start: float, end: float, out: Path
) -> Path:
    """Draws every panel over [start, end] in the dashboard's own grid (24 columns)."""
    board = dashboard()
    drawn = list(panels(board))
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in drawn)
    step = max(1.0, (end - start) / 300)
    rate_interval = f"{max(15, int(step * 4))}s"
    variables = grafana_variables(namespace, run, rate_interval, f"{int(end - start) + 1}s")
    figure = plt.figure(figsize=(20, bottom * 0.42), facecolor=BACKGROUND)
    grid = GridSpec(bottom, 24, figure=figure, hspace=1.6, wspace=1.2, top=0.97, bottom=0.03)
    figure.suptitle(
        f"{board['title']}: run {namespace}/{run}", color=TEXT, fontsize=14, x=0.01, ha="left"
    )
    for panel in drawn:
        pos = panel["gridPos"]
        ax = figure.add_subplot(
            grid[pos["y"] : pos["y"] + pos["h"] - 1, pos["x"] : pos["x"] + pos["w"]]
        )
        draw_panel(ax, prom, panel, variables, (start, end, step))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=BACKGROUND, bbox_inches="tight")
    plt.close(figure)
    return out


def demo(out: Path, name: str) -> Path:
    """A real local run with `DEMO_DRILLS`, scraped every second, drawn when it ends."""
    work = temporary_directory("tolaria-dashboard-")
    with Prometheus(work / "prometheus") as prom:
        run = LocalRun(demo_manifest(name), work / "run", DEMO_DRILLS)
        prom.add_targets(run.target("sidecar"), run.target("trainer"))
        start = time.time()
        run.start()
        try:
            code = run.wait(1800)
        finally:
            run.stop()
        print(f"run {name} ended with exit code {code}; {run.report_path}")  # noqa: T201
        return render(prom, "local", name, start - 5, time.time(), out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/dashboard.png")
    parser.add_argument("--prometheus", help="draw from this Prometheus instead of a demo run")
    parser.add_argument("--namespace", default="local")
    parser.add_argument("--run", default="dashboard-demo")
    parser.add_argument("--minutes", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.prometheus:
        end = time.time()
        path = render(
            PrometheusAPI(args.prometheus),
            args.namespace,
            args.run,
            end - args.minutes * 60,
            end,
            args.out,
        )
    else:
        path = demo(args.out, args.run)
    print(f"wrote {path}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
