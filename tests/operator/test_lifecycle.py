"""kopf glue: kopf keeps its state out of `status`, errors map to kopf's retry semantics, the
`when=` filters, and every handler is registered."""

from __future__ import annotations

import asyncio

import kopf
import pytest

import tolaria_operator.handlers  # noqa: F401 - registers the handlers
from tests.operator.fake_kube import FakeKube
from tolaria_operator import lifecycle
from tolaria_operator.config import TolariaSettings
from tolaria_operator.context import build_context
from tolaria_operator.errors import KubeApiError, SpecInvalid


def test_kopf_keeps_its_progress_and_diff_base_in_annotations() -> None:
    settings = kopf.OperatorSettings()
    lifecycle.configure_kopf(settings)
    assert settings.persistence.finalizer == "tolaria.dev/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)


@pytest.mark.asyncio
async def test_errors_map_onto_kopf_retry_semantics() -> None:
    ctx = build_context(TolariaSettings(), kube=FakeKube())

    async def invalid() -> None:
        raise SpecInvalid("default/r1", "invalid spec")

    async def transient() -> None:
        raise KubeApiError("GET", "/api/v1/pods", 503, "ServiceUnavailable", "try later")

    with pytest.raises(kopf.PermanentError):
        await lifecycle.handle(ctx, "reconcile", invalid())
    with pytest.raises(kopf.TemporaryError) as caught:
        await lifecycle.handle(ctx, "resync", transient())
    assert caught.value.delay == 5.0
    assert (
        ctx.metrics.registry.get_sample_value(
            "tolaria_operator_reconcile_errors_total", {"handler": "resync"}
        )
        == 1
    )


def test_events_outside_kopf_are_dropped_not_raised() -> None:
    lifecycle.KopfEvents().post(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}},
        "Normal",
        "Test",
        "nothing posts this",
    )


def test_the_when_filters_read_the_raw_status() -> None:
    assert lifecycle.run_is_active(status={})
    assert lifecycle.run_is_active(status={"phase": "Suspended"})
    assert not lifecycle.run_is_active(status={"phase": "Succeeded"})
    in_progress = {
        "rollback": {"state": "InProgress", "tier": "ROLLBACK_TIER_FULL", "deadline": "x"}
    }
    assert lifecycle.rollback_pending(status=in_progress)
    assert not lifecycle.rollback_pending(status={"rollback": {"state": "Succeeded"}})


def test_every_handler_is_registered_and_no_login_handler_replaces_kopfs() -> None:
    registry = kopf.get_default_registry()
    ids = {h.id for h in registry._changing.get_all_handlers()}
    ids |= {h.id for h in registry._spawning.get_all_handlers()}
    ids |= {h.id for h in registry._watching.get_all_handlers()}
    for name in (
        "reconcile_run",
        "delete_run",
        "enforce_rollback_deadline",
        "resync_run",
        "follow_sidecar",
    ):
        assert any(i.startswith(name) for i in ids), name
    logins = [
        h.id
        for h in registry._activities.get_all_handlers()
        if h.activity.value == "authentication"
    ]
    assert logins == ["login_via_client"]


@pytest.mark.asyncio
async def test_an_unexpected_exception_is_counted_and_reraised_unchanged_for_kopf() -> None:
    """An error rate that only saw foreseen failures would stay flat while the operator breaks."""
    ctx = build_context(TolariaSettings(), kube=FakeKube())

    async def bug() -> None:
        raise KeyError("status")

    with pytest.raises(KeyError):
        await lifecycle.handle(ctx, "pod_event", bug())
    registry = ctx.metrics.registry
    assert (
        registry.get_sample_value(
            "tolaria_operator_reconcile_errors_total", {"handler": "pod_event"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "tolaria_operator_reconcile_duration_seconds_count", {"handler": "pod_event"}
        )
        == 1
    )


@pytest.mark.asyncio
async def test_a_cancelled_handler_is_not_an_error() -> None:
    ctx = build_context(TolariaSettings(), kube=FakeKube())

    async def stopped() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await lifecycle.handle(ctx, "sidecar", stopped())
    assert (
        ctx.metrics.registry.get_sample_value(
            "tolaria_operator_reconcile_errors_total", {"handler": "sidecar"}
        )
        == 0
    )
