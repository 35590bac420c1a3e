"""Leyline messages round-trip and keep their size budgets (L §2.1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from leyline import (
    SCHEMA_VERSION,
    AdaptationCommand,
    CommandOptimizerAdjustment,
    CommandType,
    EmergencyLevel,
    EmergencySignal,
    HardwareContext,
    MessagePriority,
    RunPhase,
    RunReport,
    SeedLifecycleStage,
    SeedState,
    SnapshotManifest,
    SystemStatePacket,
    TelemetryPacket,
    TensorDtype,
    TensorEntry,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
names = st.text(min_size=0, max_size=24)


def one_seed_state() -> SystemStatePacket:
    """A realistic one-seed packet as the hook assembles it."""
    return SystemStatePacket(
        version=SCHEMA_VERSION,
        current_epoch=12,
        validation_accuracy=0.8123,
        validation_loss=0.4567,
        timestamp_ns=1_764_000_000_123_456_789,
        hardware_context=HardwareContext(
            device_type="cuda",
            device_id="0",
            total_memory_gb=79.6,
            available_memory_gb=61.2,
            temperature_celsius=63.0,
            utilization_percent=97.0,
            compute_capability=90,
        ),
        training_metrics={"train_seconds": 41.7, "steps": 1536.0},
        seed_states=[
            SeedState(
                seed_id="seed-0",
                stage=SeedLifecycleStage.SEED_STAGE_BLENDING,
                gradient_norm=0.31,
                learning_rate=0.0003,
                layer_depth=4,
                metrics={"alpha": 0.42},
                age_epochs=3,
                risk_score=0.1,
            )
        ],
        packet_id="quickstart-state-12",
        global_step=1536,
        training_loss=0.4412,
        source_subsystem="tolaria",
        training_run_id="quickstart",
        experiment_name="quickstart",
    )


def test_one_seed_state_packet_serializes_under_280_bytes() -> None:
    size = len(one_seed_state().SerializeToString())
    assert size < 280, f"{size} B"


def test_state_packet_round_trips_bit_for_bit() -> None:
    # deterministic: map entries (training_metrics, metrics) in key order; protobuf leaves
    # the order of map entries unspecified otherwise, which made this test flaky
    wire = one_seed_state().SerializeToString(deterministic=True)
    assert SystemStatePacket.FromString(wire).SerializeToString(deterministic=True) == wire


@given(
    epoch=st.integers(0, 2**32 - 1),
    loss=finite,
    step=st.integers(0, 2**64 - 1),
    run=names,
    stage=st.sampled_from(SeedLifecycleStage.values()),
)
def test_state_packet_round_trips_for_any_values(
    epoch: int, loss: float, step: int, run: str, stage: int
) -> None:
    pkt = SystemStatePacket(
        version=SCHEMA_VERSION,
        current_epoch=epoch,
        validation_loss=loss,
        global_step=step,
        training_run_id=run,
        seed_states=[SeedState(seed_id=run, stage=stage)],
    )
    assert SystemStatePacket.FromString(pkt.SerializeToString()) == pkt


@given(factor=finite, reason=names, kind=st.sampled_from(CommandType.values()))
def test_adaptation_command_round_trips(factor: float, reason: str, kind: int) -> None:
    cmd = AdaptationCommand(
        version=SCHEMA_VERSION,
        command_type=kind,
        annotations={"risk_reason": reason},
        optimizer_adjustment=CommandOptimizerAdjustment(
            optimizer_id="host", hyperparameters={"lr_scale": factor}
        ),
    )
    assert AdaptationCommand.FromString(cmd.SerializeToString()) == cmd


@given(
    level=st.sampled_from(EmergencyLevel.values()),
    generation=st.integers(0, 2**64 - 1),
    reason=names,
)
def test_emergency_signal_round_trips(level: int, generation: int, reason: str) -> None:
    sig = EmergencySignal(version=SCHEMA_VERSION, level=level, generation=generation, reason=reason)
    assert EmergencySignal.FromString(sig.SerializeToString()) == sig


@given(
    shapes=st.lists(st.lists(st.integers(0, 4096), max_size=4), max_size=8),
    dtype=st.sampled_from(TensorDtype.values()),
)
def test_snapshot_manifest_round_trips(shapes: list[list[int]], dtype: int) -> None:
    manifest = SnapshotManifest(
        version=SCHEMA_VERSION,
        tensors=[
            TensorEntry(name=f"t{i}", dtype=dtype, shape=s, offset=i * 64)
            for i, s in enumerate(shapes)
        ],
    )
    assert SnapshotManifest.FromString(manifest.SerializeToString()) == manifest


def test_telemetry_packet_carries_a_typed_priority() -> None:
    pkt = TelemetryPacket(priority=MessagePriority.MESSAGE_PRIORITY_CRITICAL)
    assert (
        TelemetryPacket.FromString(pkt.SerializeToString()).priority
        == MessagePriority.MESSAGE_PRIORITY_CRITICAL
    )


def test_run_phase_names_are_the_kubernetes_phase_strings() -> None:
    assert [RunPhase.Name(v) for v in RunPhase.values() if v] == [
        "Pending",
        "Running",
        "Succeeded",
        "Failed",
        "Halted",
        "Suspended",
        "Restarting",
        "RollingBack",
        "Stopped",
    ]


def test_every_enum_reserves_zero_for_unspecified() -> None:
    from tests.leyline.test_enum_mirrors import ENUMS

    for enum in ENUMS.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith(("UNSPECIFIED", "UNKNOWN")), f"{enum.name}: value 0 is {zero}"


def test_run_report_round_trips() -> None:
    report = RunReport(version=SCHEMA_VERSION, run_id="q", status=RunPhase.Succeeded, exit_code=0)
    assert RunReport.FromString(report.SerializeToString()) == report
