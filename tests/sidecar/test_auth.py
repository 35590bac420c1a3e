"""Authentication of the operator's TCP control API (R10.5): the run token or nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from leyline.spec import TolariaRun
from leyline.v1 import sidecar_pb2 as pb
from tests.sidecar.conftest import TOKEN, Served
from tolaria_sidecar.auth import MISSING, WRONG, TokenAuth, bearer
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import TokenRequired
from tolaria_sidecar.serving import serve

Start = Callable[..., Served]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.req("R10.5")
def test_a_call_without_the_token_is_unauthenticated(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    err = refused(lambda: served.control.GetStatus(pb.GetStatusRequest(), timeout=30))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "run token is missing" in (err.details() or "")


@pytest.mark.req("R10.5")
def test_a_call_with_a_wrong_token_is_unauthenticated_and_echoes_nothing(
    serve_sidecar: Start,
) -> None:
    served = serve_sidecar()
    guess = "guess-1234"
    err = refused(
        lambda: served.control.GetStatus(pb.GetStatusRequest(), metadata=bearer(guess), timeout=30)
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    details = err.details() or ""
    assert "run token is wrong" in details
    assert guess not in details and TOKEN not in details


@pytest.mark.req("R10.5")
def test_a_call_with_the_run_token_is_served(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    status = served.control.GetStatus(pb.GetStatusRequest(), metadata=served.auth, timeout=30)
    assert status.run_id == served.sidecar.config.run_id


@pytest.mark.req("R10.5")
def test_the_event_stream_needs_the_token_too(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    stream = served.control.StreamEvents(pb.StreamEventsRequest(), timeout=30)
    err = refused(lambda: next(iter(stream)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.req("R10.5")
def test_the_event_stream_replays_with_the_token(serve_sidecar: Start) -> None:
    served = serve_sidecar()
    served.attach()
    served.link.Detach(pb.DetachRequest(reason="done"))  # emits one progress event
    stream = served.control.StreamEvents(
        pb.StreamEventsRequest(after_sequence=0), metadata=served.auth, timeout=30
    )
    first = next(iter(stream))
    stream.cancel()
    assert first.WhichOneof("event") == "progress"


@pytest.mark.req("R10.5")
def test_the_control_server_refuses_to_start_without_a_token(
    run: TolariaRun, shm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOLARIA_SIDECAR_TOKEN", raising=False)
    config = SidecarConfig.from_run(
        run,
        socket_path=tmp_path / "s.sock",
        checkpoint_dir=tmp_path / "checkpoints",
        control_address="127.0.0.1:0",
    )
    with pytest.raises(TokenRequired) as refused_start:
        serve(config)
    message = str(refused_start.value)
    assert "--token-file" in message and "TOLARIA_SIDECAR_TOKEN" in message
    assert not list(shm_dir.iterdir()), "nothing may be created before the refusal"


@pytest.mark.req("R10.5")
@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), MISSING),
        ((("authorization", "Basic abc"),), MISSING),
        ((("authorization", "Bearer nope"),), WRONG),
        ((("authorization", f"Bearer {TOKEN}"),), None),
        ((("Authorization", f"Bearer {TOKEN}"),), None),
    ],
)
def test_the_token_check_distinguishes_missing_wrong_and_right(
    metadata: tuple[tuple[str, str], ...], expected: str | None
) -> None:
    assert TokenAuth(TOKEN).check(metadata) == expected
