"""Fixtures of the operator tests: settings, and the in-process cluster (kmock + kopf +
fake sidecars) for the `slow` tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.operator.harness import Cluster, configure_kmock
from tolaria_operator.config import TolariaSettings


@pytest.fixture
def settings() -> TolariaSettings:
    return TolariaSettings()


@pytest_asyncio.fixture
async def cluster(
    kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    configure_kmock(kmock, tmp_path, monkeypatch)
    world = Cluster(kmock)
    try:
        yield world
    finally:
        await world.close()
