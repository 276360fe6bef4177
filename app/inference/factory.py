"""Build the engine that `ZEUS_ENGINE` names (`builtin`, the default, or `vllm`) from the settings.

The API only sees the Engine protocol (contract.py); this is the one place that imports an
implementation. The vLLM module is imported only when asked for: builtin hosts need no vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.inference.contract import Engine

if TYPE_CHECKING:
    from app.config import Settings

ENGINE_KINDS = ("builtin", "vllm")


def create_engine(settings: Settings) -> Engine:
    """Load the model with the engine `settings.engine` names; blocking (seconds to minutes).

    Raises ModelLoadError (one line naming the model, setting or missing package at fault) and
    whatever the loading libraries raise for broken folders (the caller turns those into one line).
    """
    from app.inference.types import ModelLoadError

    assert settings.model_path is not None
    if settings.engine == "vllm":
        from app.inference.vllm_engine import VLLMEngine, VLLMEngineConfig

        return VLLMEngine.load(
            VLLMEngineConfig(
                model_path=str(settings.model_path),
                device=settings.device,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_input_tokens=settings.max_input_tokens,
                max_new_tokens=settings.max_new_tokens,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                kv_cache_gb=settings.kv_cache_gb,
                max_model_len=settings.max_model_len,
                tool_call_parser=settings.tool_call_parser,
                enforce_eager=settings.enforce_eager,
            )
        )
    if settings.engine == "builtin":
        from app.inference.engine import EngineConfig, InferenceEngine

        return InferenceEngine.load(
            EngineConfig(
                model_path=str(settings.model_path),
                device=settings.device,
                torch_threads=settings.torch_threads,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
                max_input_tokens=settings.max_input_tokens,
                max_new_tokens=settings.max_new_tokens,
            )
        )
    raise ModelLoadError(
        f"unknown engine {settings.engine!r}: ZEUS_ENGINE must be one of {', '.join(ENGINE_KINDS)}"
    )
