"""Shared fixtures: injected clocks and event sinks; no global state."""

from __future__ import annotations

import pytest

from leyline.spec import BreakerSpec, ConservativeSpec
from tests.fakes import FakeClock, RecordingEvents
from tolaria_trainer.guards import Guards


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


@pytest.fixture
def guards(clock: FakeClock, events: RecordingEvents) -> Guards:
    return Guards(BreakerSpec(), ConservativeSpec(), clock, events)
