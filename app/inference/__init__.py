"""Zeus's inference engine: continuous batching of a Hugging Face causal LM. Imports no FastAPI."""

from app.inference.engine import EngineConfig, InferenceEngine, RequestStream
from app.inference.types import (
    EngineClosedError,
    EngineError,
    EngineFullError,
    EngineObserver,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    SamplingParams,
    TextDelta,
)

__all__ = [
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineFullError",
    "EngineObserver",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "InvalidRequestError",
    "ModelLoadError",
    "PromptTooLongError",
    "RequestStream",
    "SamplingParams",
    "TextDelta",
]
