"""`helm package` keeps everything the templates read (files/crds, files/prometheus,
files/grafana): the packaged chart, as a user pulls it, renders exactly as the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chart.rendering import CHART_DIR, NAMESPACE, RELEASE, VALUE_SETS, helm, render_files


@pytest.mark.parametrize("name", ["default", "monitoring-on"])
def test_the_packaged_chart_renders_like_the_directory(tmp_path: Path, name: str) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as chart:
        packaged = chart.render(
            VALUE_SETS[name], name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    assert packaged == render_files(VALUE_SETS[name])
