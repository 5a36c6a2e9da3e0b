"""Model-independent inference engine.

Request bookkeeping, KV cache blocks, continuous batching and detokenizing.
The package imports neither torch nor jax, because a ModelRunner
implementation supplies the model.
"""

from services.common.engine.batch_scheduler import BatchConfig
from services.common.engine.engine import EngineObserver, EngineStats, InferenceEngine, StepStats
from services.common.engine.errors import (
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    RequestFailedError,
    WaitingQueueFullError,
)
from services.common.engine.model_runner import ModelInput, ModelRunner, SequenceInput
from services.common.engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from services.common.engine.stream import RequestStream

__all__ = [
    "BatchConfig",
    "EngineError",
    "EngineObserver",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "InferenceEngine",
    "InvalidRequestError",
    "ModelInput",
    "ModelRunner",
    "Request",
    "RequestFailedError",
    "RequestOutput",
    "RequestStatus",
    "RequestStream",
    "SamplingParams",
    "SequenceInput",
    "StepStats",
    "WaitingQueueFullError",
]
