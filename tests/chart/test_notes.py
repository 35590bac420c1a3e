"""NOTES.txt, what `helm install` prints: what to do next."""

from __future__ import annotations

from tests.chart.rendering import VALUE_SETS, render_files

NOTES = "tolaria/templates/NOTES.txt"


def notes(values: dict[str, object]) -> str:
    return render_files(values)[NOTES]


def test_the_notes_say_how_to_create_and_watch_a_run() -> None:
    text = notes({})
    assert "kubectl -n tolaria-system rollout status deployment/tolaria-operator" in text
    assert "kubectl apply -f examples/kind-quickstart.yaml" in text
    assert "kubectl get trun -w -A" in text


def test_the_notes_say_where_the_metrics_are() -> None:
    text = notes({})
    assert "service/tolaria-operator-metrics, port 9403, /metrics" in text
    assert "trainer-metrics and sidecar-metrics" in text
    assert "monitoring.enabled=true" in text


def test_per_namespace_the_notes_use_a_watched_namespace() -> None:
    text = notes(VALUE_SETS["namespaced"])
    assert "TolariaRuns in: team-a, team-b" in text
    assert "kubectl get trun -w -n team-a" in text


def test_the_notes_warn_when_run_metrics_cannot_reach_prometheus() -> None:
    assert "WARNING: runs.metricsScraper.namespaceLabels is empty" in notes(
        {"monitoring": {"enabled": True}}
    )
    assert "WARNING" not in notes(VALUE_SETS["monitoring-on"])


def test_the_notes_say_what_uninstalling_leaves() -> None:
    assert "Uninstalling keeps the CRDs" in notes({})
    assert "secret/tolaria-operator-token-key" in notes({})
