"""Load a Hugging Face format model folder for the engine: local files only, one clear line on failure."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.inference.types import ModelLoadError

# Never reach for a model hub: a missing file must fail here, not trigger a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any  # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    context_length: int
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this host")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} requested but this host has {torch.cuda.device_count()} CUDA device(s)"
            )
        return resolved
    raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def _weights_bytes(path: Path) -> int:
    return sum(file.stat().st_size for pattern in _WEIGHT_PATTERNS for file in path.glob(pattern))


def check_model_folder(path: Path) -> None:
    """Raise ModelLoadError naming the first thing missing from `path` (before anything heavy is loaded)."""
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json: not a Hugging Face format model")
    if _weights_bytes(path) == 0:
        raise ModelLoadError(f"model folder {path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    # CUDA says "out of memory"; the CPU allocator says "can't allocate memory"; mmap says "cannot".
    return any(sign in text for sign in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def _needed_gib(path: Path, dtype: torch.dtype) -> float:
    # Checkpoints are usually stored in 16-bit; loading them as fp32 doubles their size in memory.
    stored = _weights_bytes(path)
    factor = 2.0 if dtype == torch.float32 else 1.0
    return stored * factor / 2**30


def load_model(model_path: str | os.PathLike[str], device: str = "auto", dtype: str = "auto") -> LoadedModel:
    path = Path(model_path).expanduser()
    check_model_folder(path)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {_one_line(error)}") from error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=resolved_dtype,
            # Straight onto the GPU: a detour through host memory would need the weights twice.
            device_map=str(resolved_device) if resolved_device.type == "cuda" else None,
        )
    except Exception as error:
        if _is_out_of_memory(error):
            raise ModelLoadError(
                f"out of memory while loading {path} on {resolved_device}: "
                f"needs about {_needed_gib(path, resolved_dtype):.1f} GiB for the weights alone"
            ) from error
        raise ModelLoadError(f"cannot load the model from {path}: {_one_line(error)}") from error
    model.eval()

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    context_length = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=resolved_device,
        dtype=resolved_dtype,
        eos_token_ids=eos_ids,
        context_length=context_length,
        name=path.name,
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
