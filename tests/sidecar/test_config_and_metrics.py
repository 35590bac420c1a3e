"""The sidecar's configuration (spec sections, flags, token, drills) and its metric names."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from leyline import (
    AnomalyKind,
    EmergencyLevel,
    RollbackOutcome,
    RollbackTier,
    RunPhase,
    enum_names,
)
from leyline.spec import TolariaRun
from leyline.v1.resilience_pb2 import CheckpointOutcome, SlotCondition
from tests.sidecar.doubles import tolaria_run
from tolaria_sidecar.config import CheckpointDrill, ControlAddress, SidecarConfig, read_token
from tolaria_sidecar.errors import ConfigInvalid
from tolaria_sidecar.metrics import SidecarMetrics


def build(run: TolariaRun, tmp_path: Path, **options: object) -> SidecarConfig:
    return SidecarConfig.from_run(run, socket_path=tmp_path / "s.sock", **options)  # type: ignore[arg-type]


@pytest.mark.req("R12")
def test_spec_sections_come_from_the_manifest_unchanged(tmp_path: Path) -> None:
    run = tolaria_run(snapshots={"slots": 3}, emergency={"criticalMs": 50})
    config = build(run, tmp_path)
    assert config.snapshots is run.spec.snapshots
    assert config.rollback is run.spec.rollback
    assert config.detection is run.spec.detection
    assert config.emergency is run.spec.emergency
    assert config.checkpoints is run.spec.checkpoints
    assert (config.snapshots.slots, config.emergency.critical_ms) == (3, 50)


@pytest.mark.req("R6.3")
def test_the_checkpoint_directory_defaults_to_the_spec_then_beside_the_socket(
    tmp_path: Path,
) -> None:
    assert build(tolaria_run(), tmp_path).checkpoint_dir == tmp_path / "checkpoints"
    configured = tolaria_run(checkpoints={"directory": "/data/ckpt"})
    assert build(configured, tmp_path).checkpoint_dir == Path("/data/ckpt")
    flag = build(configured, tmp_path, checkpoint_dir=tmp_path / "x")
    assert flag.checkpoint_dir == tmp_path / "x"


@pytest.mark.req("R10.5")
def test_the_run_id_defaults_to_the_manifest_name_and_is_validated(tmp_path: Path) -> None:
    assert build(tolaria_run("my-run"), tmp_path).run_id == "my-run"
    with pytest.raises(ConfigInvalid, match="--run-id"):
        build(tolaria_run(), tmp_path, run_id="../escape")


@pytest.mark.req("R10.5")
def test_a_socket_path_longer_than_linux_allows_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="--socket"):
        SidecarConfig.from_run(tolaria_run(), socket_path=Path("/tmp/" + "x" * 200))


@pytest.mark.req("R10.5")
def test_the_token_comes_from_the_file_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLARIA_SIDECAR_TOKEN", "from-env")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token(token_file) == "from-file"
    assert read_token(None) == "from-env"
    token_file.write_text("  \n")
    with pytest.raises(ConfigInvalid, match="--token-file"):
        read_token(token_file)
    with pytest.raises(ConfigInvalid, match="--token-file"):
        read_token(tmp_path / "absent")


@pytest.mark.req("R10.5")
@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0.0.0.0:7070", True),
        ("127.0.0.1:0", True),
        ("host", False),
        (":80", False),
        ("h:99999", False),
    ],
)
def test_control_addresses_are_host_and_port(text: str, ok: bool) -> None:
    if ok:
        assert ControlAddress.parse(text).target == text
    else:
        with pytest.raises(ConfigInvalid, match="--control-address"):
            ControlAddress.parse(text)


@pytest.mark.req("R6.3")
def test_the_checkpoint_io_error_drill_parses_and_unknown_drills_are_refused() -> None:
    assert CheckpointDrill.parse("checkpoint-io-error@epoch=4").epoch == 4
    for bad in ("disk-full@epoch=1", "checkpoint-io-error@step=1", "checkpoint-io-error@epoch=x"):
        with pytest.raises(ConfigInvalid, match="--inject"):
            CheckpointDrill.parse(bad)


@pytest.mark.req("R13.5")
def test_the_slow_and_corrupt_checkpoint_drills_parse_with_their_options() -> None:
    slow = CheckpointDrill.parse("slow-checkpoint@epoch=6,seconds=2")
    assert (slow.name, slow.epoch, slow.seconds) == ("slow-checkpoint", 6, 2.0)
    assert CheckpointDrill.parse("slow-checkpoint@epoch=1").seconds == 3.0
    assert CheckpointDrill.parse("corrupt-checkpoint@epoch=2").name == "corrupt-checkpoint"
    for bad in (
        "slow-checkpoint@epoch=1,seconds=x",
        "slow-checkpoint@epoch=1,seconds=99",
        "corrupt-checkpoint@epoch=1,seconds=1",
        "checkpoint-io-error@epoch=1,seconds=1",
    ):
        with pytest.raises(ConfigInvalid, match="--inject"):
            CheckpointDrill.parse(bad)


@pytest.mark.req("R8.3")
def test_every_series_is_prefixed_in_base_units_and_touched_at_start() -> None:
    registry = CollectorRegistry()
    SidecarMetrics(registry)
    from prometheus_client.exposition import generate_latest

    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    names = {f.name for f in families}
    assert all(name.startswith("tolaria_sidecar_") for name in names)
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
    samples = {(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples}
    level = EmergencyLevel.Name(EmergencyLevel.EMERGENCY_LEVEL_CRITICAL)
    kind = AnomalyKind.Name(AnomalyKind.ANOMALY_KIND_STALLED_STEP)
    assert ("tolaria_sidecar_emergencies_total", (("kind", kind), ("level", level))) in samples
    for outcome in enum_names(CheckpointOutcome):
        assert (
            "tolaria_sidecar_checkpoint_writes_total",
            (("outcome", outcome),),
        ) in samples
    for condition in enum_names(SlotCondition):
        assert ("tolaria_sidecar_slots", (("condition", condition),)) in samples
    for tier in enum_names(RollbackTier):
        for outcome in enum_names(RollbackOutcome):
            key = (("outcome", outcome), ("tier", tier))
            assert ("tolaria_sidecar_rollbacks_total", key) in samples


class Wall:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.req("R8.3")
def test_snapshot_and_checkpoint_ages_grow_at_scrape_time_from_the_sidecars_start() -> None:
    """An age set on the event would freeze exactly when events stop coming."""
    wall, registry = Wall(), CollectorRegistry()
    SidecarMetrics(registry, wall=wall)
    wall.now += 90
    assert value(registry, "tolaria_sidecar_snapshot_age_seconds") == 90
    assert value(registry, "tolaria_sidecar_checkpoint_age_seconds") == 90


@pytest.mark.req("R8.3")
def test_the_snapshot_age_starts_over_at_each_accepted_commit() -> None:
    wall, registry = Wall(), CollectorRegistry()
    metrics = SidecarMetrics(registry, wall=wall)
    wall.now += 50
    metrics.snapshot_committed()
    wall.now += 7
    assert value(registry, "tolaria_sidecar_snapshot_age_seconds") == 7
    assert value(registry, "tolaria_sidecar_snapshot_commits_total") == 1


@pytest.mark.req("R8.3")
def test_the_checkpoint_age_counts_from_the_newest_commit_time_seen() -> None:
    """Records arrive out of order (a restarted sidecar reads older ones): the newest wins."""
    wall, registry = Wall(), CollectorRegistry()
    metrics = SidecarMetrics(registry, wall=wall)
    metrics.checkpoint_committed(wall.now - 30)
    metrics.checkpoint_committed(wall.now - 600)
    assert value(registry, "tolaria_sidecar_checkpoint_age_seconds") == 30


@pytest.mark.req("R8.3")
def test_the_run_phase_is_one_series_at_one_and_every_other_phase_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry)
    pending, succeeded = RunPhase.Name(RunPhase.Pending), RunPhase.Name(RunPhase.Succeeded)
    assert value(registry, "tolaria_sidecar_run_phase", phase=pending) == 1
    metrics.set_phase(succeeded)
    phases = {
        p: value(registry, "tolaria_sidecar_run_phase", phase=p) for p in enum_names(RunPhase)
    }
    assert phases == {p: float(p == succeeded) for p in enum_names(RunPhase)}


@pytest.mark.req("R6.5")
def test_a_missed_full_rollback_is_counted_once_as_deadline_missed_even_if_reported_later() -> None:
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry)
    full, missed = "ROLLBACK_TIER_FULL", "ROLLBACK_OUTCOME_DEADLINE_MISSED"
    metrics.rollback_deadline_missed()
    metrics.rollback_reported(full, "ROLLBACK_OUTCOME_SUCCEEDED", 20.0, deadline_missed=True)
    assert value(registry, "tolaria_sidecar_rollbacks_total", tier=full, outcome=missed) == 1
    succeeded = value(
        registry, "tolaria_sidecar_rollbacks_total", tier=full, outcome="ROLLBACK_OUTCOME_SUCCEEDED"
    )
    assert succeeded == 0
    assert value(registry, "tolaria_sidecar_rollback_duration_seconds_count", tier=full) == 1
    assert value(registry, "tolaria_sidecar_full_rollback_deadline_misses_total") == 1
