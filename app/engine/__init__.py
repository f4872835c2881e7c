"""The engine, the one owner of what is served: its public names, all the front doors import.

Everything else under app/engine (the model table, the batcher, a batch's run) is its inside.
"""

from app.engine.batcher import BatchObserver
from app.engine.batches import (
    BatchingError,
    BatchKey,
    DeadlineExceededError,
    InferenceError,
    NotServedError,
    Output,
    OverloadedError,
    Refused,
    RolloutMap,
    ShuttingDownError,
    first_error_or_all,
    softmax,
)
from app.engine.engine import (
    BUSY_MESSAGE,
    LOADING_MESSAGE,
    Description,
    Engine,
    EngineClient,
    EngineResult,
    Job,
    ModelDescription,
    Permit,
    Readiness,
    ServedVersion,
    VersionDescription,
    check_rollout,
)
from app.engine.host import EngineHost
from app.engine.remote import RemoteEngine
from app.engine.table import ModelTable, ReloadReport

__all__ = [
    "BUSY_MESSAGE",
    "LOADING_MESSAGE",
    "BatchKey",
    "BatchObserver",
    "BatchingError",
    "DeadlineExceededError",
    "Description",
    "Engine",
    "EngineClient",
    "EngineHost",
    "EngineResult",
    "InferenceError",
    "Job",
    "ModelDescription",
    "ModelTable",
    "NotServedError",
    "Output",
    "OverloadedError",
    "Permit",
    "Readiness",
    "Refused",
    "ReloadReport",
    "RemoteEngine",
    "RolloutMap",
    "ServedVersion",
    "ShuttingDownError",
    "VersionDescription",
    "check_rollout",
    "first_error_or_all",
    "softmax",
]
