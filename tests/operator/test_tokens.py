"""Run tokens (R10.5): derived from the run's identity under one operator key, which lives in
one Secret of the operator's own namespace, the only Secret the operator reads."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.operator.fake_kube import FakeKube
from tolaria_operator.config import TokenSettings
from tolaria_operator.errors import TokenKeyInvalid
from tolaria_operator.resources import KEY_SECRETS
from tolaria_operator.tokens import KEY_BYTES, RunTokens, derive_token, key_secret

pytestmark = pytest.mark.req("R10.5")

KEY = b"k" * KEY_BYTES
HOME = "tolaria-system"
SECRET = ("secrets", HOME, "tolaria-operator-token-key")


def test_a_token_is_a_hmac_of_the_runs_identity() -> None:
    token = derive_token(KEY, "team-a", "r1", "uid-1")
    assert token == derive_token(KEY, "team-a", "r1", "uid-1")
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    others = {
        derive_token(b"j" * KEY_BYTES, "team-a", "r1", "uid-1"),
        derive_token(KEY, "team-b", "r1", "uid-1"),
        derive_token(KEY, "team-a", "r2", "uid-1"),
        derive_token(KEY, "team-a", "r1", "uid-2"),  # the same name, made again
        derive_token(KEY, "team-a", "r1u", "id-1"),  # no ambiguity in how parts join
    }
    assert token not in others and len(others) == 5


@pytest.mark.asyncio
async def test_the_first_operator_creates_the_key_and_the_next_one_reads_it() -> None:
    kube = FakeKube()
    first = RunTokens(kube, TokenSettings(), HOME)
    token = await first.token("ns", "r1", "uid-1")
    assert SECRET in kube.objects
    assert len(base64.b64decode(kube.objects[SECRET]["data"]["key"])) == KEY_BYTES
    restarted = RunTokens(kube, TokenSettings(), HOME)
    assert await restarted.token("ns", "r1", "uid-1") == token
    assert [c for c in kube.calls if c[0] == "create"] == [("create", *SECRET[::2])]


@pytest.mark.asyncio
async def test_the_key_is_read_once_per_process() -> None:
    kube = FakeKube()
    tokens = RunTokens(kube, TokenSettings(), HOME)
    for uid in ("a", "b", "c"):
        await tokens.token("ns", "r", uid)
    assert kube.calls == [("get", *SECRET[::2]), ("create", *SECRET[::2])]  # then memory


@pytest.mark.asyncio
async def test_a_key_created_by_another_operator_meanwhile_is_used() -> None:
    kube = FakeKube()
    theirs = b"t" * KEY_BYTES

    original = kube.get

    async def racing_get(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        found = await original(*args, **kwargs)
        if found is None and SECRET not in kube.objects:
            kube.objects[SECRET] = key_secret(SECRET[2], HOME, theirs)
        return found

    kube.get = racing_get  # type: ignore[method-assign]
    tokens = RunTokens(kube, TokenSettings(), HOME)
    assert await tokens.key() == theirs


@pytest.mark.asyncio
async def test_a_short_key_is_refused_naming_the_secret() -> None:
    kube = FakeKube()
    await kube.create(KEY_SECRETS, HOME, key_secret(SECRET[2], HOME, b"short"))
    with pytest.raises(TokenKeyInvalid, match=f"Secret {HOME}/{SECRET[2]}.*5 bytes"):
        await RunTokens(kube, TokenSettings(), HOME).key()


@pytest.mark.asyncio
async def test_without_its_namespace_the_operator_keeps_a_key_in_memory() -> None:
    kube = FakeKube()
    tokens = RunTokens(kube, TokenSettings(), "")
    assert len(await tokens.key()) == KEY_BYTES
    assert kube.calls == []
