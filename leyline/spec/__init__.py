"""The `TolariaRun` manifest model: one spec for `tolaria run` and the CRD.

Each manifest section is one pydantic model (`TrainingSpec`, `BudgetsSpec`,
`BreakerSpec`, ...). Field defaults are the only place a budget number is
written (R12); attribute docstrings are the CRD's descriptions.
"""

from leyline.spec.base import ProtoEnum, Rule, RuleViolation, SpecModel
from leyline.spec.cluster import (
    CheckpointVolumeSpec,
    EscalationSpec,
    FailurePolicySpec,
    PodSpec,
    ResourcesSpec,
    TolerationSpec,
)
from leyline.spec.control import RebuildSpec, TamiyoSpec
from leyline.spec.digest import TrainingIdentity, training_differences, training_identity
from leyline.spec.errors import FieldError, field_errors
from leyline.spec.guards import BreakerSpec, BudgetsSpec, ConservativeSpec
from leyline.spec.loader import ManifestInvalid, load_manifest, parse_document, validate_manifest
from leyline.spec.observe import ProfilerSpec, TelemetrySpec
from leyline.spec.resilience import (
    CheckpointSpec,
    DetectionSpec,
    EmergencySpec,
    RestartSpec,
    RollbackSpec,
    SnapshotSpec,
)
from leyline.spec.run import (
    API_GROUP,
    API_VERSION,
    KIND,
    ObjectMeta,
    TolariaRun,
    TolariaRunSpec,
)
from leyline.spec.status import (
    Condition,
    TolariaIncidentSpec,
    TolariaIncidentStatus,
    TolariaRunStatus,
)
from leyline.spec.training import (
    BUILTIN_TASKS,
    DataSpec,
    GroupScheduleSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    TrainingSpec,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "BUILTIN_TASKS",
    "KIND",
    "BreakerSpec",
    "BudgetsSpec",
    "CheckpointSpec",
    "CheckpointVolumeSpec",
    "Condition",
    "ConservativeSpec",
    "DataSpec",
    "DetectionSpec",
    "EmergencySpec",
    "EscalationSpec",
    "FailurePolicySpec",
    "FieldError",
    "GroupScheduleSpec",
    "ManifestInvalid",
    "ModelSpec",
    "ObjectMeta",
    "OptimizerSpec",
    "PodSpec",
    "ProfilerSpec",
    "ProtoEnum",
    "RebuildSpec",
    "ResourcesSpec",
    "RestartSpec",
    "RollbackSpec",
    "Rule",
    "RuleViolation",
    "ScheduleSpec",
    "SnapshotSpec",
    "SpecModel",
    "TamiyoSpec",
    "TelemetrySpec",
    "TolariaIncidentSpec",
    "TolariaIncidentStatus",
    "TolariaRun",
    "TolariaRunSpec",
    "TolariaRunStatus",
    "TolerationSpec",
    "TrainingIdentity",
    "TrainingSpec",
    "field_errors",
    "load_manifest",
    "parse_document",
    "training_differences",
    "training_identity",
    "validate_manifest",
]
