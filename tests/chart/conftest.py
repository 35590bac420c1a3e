"""tests/chart renders the chart with helm-python-sdk (see `rendering`); without it (a dev
dependency, so only a partial install) every test here skips saying so."""

from __future__ import annotations

import pytest

from tests.chart.rendering import helm


@pytest.fixture(autouse=True)
def _needs_helm() -> None:
    if helm is None:
        pytest.skip("helm-python-sdk is not installed (pip install -e '.[dev]')")
