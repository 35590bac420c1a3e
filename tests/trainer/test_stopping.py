"""Stop signals: the first stops after the step, a second abandons it, only while training runs
(R13.5). Real signals to this process, handlers restored afterwards."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tolaria_trainer.stopping import Interrupted, StopRequest, install_stop_handlers


@pytest.fixture
def stop() -> Iterator[StopRequest]:
    request = StopRequest()
    previous = install_stop_handlers(request, cause=lambda signum: "")
    yield request
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def deliver(signum: int) -> None:
    """Raises `signum` in this thread; its Python handler runs before this returns."""
    signal.raise_signal(signum)


@pytest.mark.req("R13.5")
def test_the_first_sigint_requests_a_stop_with_exit_code_130_and_a_reason(
    stop: StopRequest,
) -> None:
    deliver(signal.SIGINT)
    assert stop.is_set() and stop.exit_code == 130
    reason = stop.reason(global_step=57, epochs_completed=3, epochs=10)
    assert reason == "stopped by SIGINT at step 57 (3 of 10 epochs completed)"


@pytest.mark.req("R13.5")
def test_a_second_signal_while_training_abandons_the_step(stop: StopRequest) -> None:
    deliver(signal.SIGTERM)
    stop.interruptible = True
    with pytest.raises(Interrupted):
        deliver(signal.SIGTERM)
    assert stop.exit_code == 143 and stop.interrupted
    deliver(signal.SIGTERM)  # a third one while the report is written: ignored
    assert "abandoned the step" in stop.reason(global_step=1, epochs_completed=0, epochs=1)


@pytest.mark.req("R13.5")
def test_a_second_signal_while_the_report_is_written_is_ignored(stop: StopRequest) -> None:
    deliver(signal.SIGINT)
    deliver(signal.SIGINT)  # not interruptible: no exception
    assert stop.signum == signal.SIGINT and not stop.interrupted
