"""Zeus's inference engine: continuous batching of a Hugging Face causal LM. Imports no FastAPI."""

from app.inference.contract import Engine, EngineCapabilities, EngineInfo
from app.inference.engine import EngineConfig, InferenceEngine
from app.inference.stream import RequestStream
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
    StructuredOutput,
    TextDelta,
    TokenLogprob,
)

__all__ = [
    "Engine",
    "EngineCapabilities",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "EngineFullError",
    "EngineInfo",
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
    "StructuredOutput",
    "TextDelta",
    "TokenLogprob",
]
