"""A missing or broken model folder fails at load with one line naming the path and what is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.inference import EngineConfig, InferenceEngine, ModelLoadError


def _copy_without(source: Path, target: Path, *patterns: str) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*patterns))
    return target


def _load_error(path: Path, **settings: object) -> str:
    with pytest.raises(ModelLoadError) as failure:
        InferenceEngine.load(EngineConfig(model_path=path, device="cpu", dtype="float32", **settings))
    message = str(failure.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = _load_error(missing)
    assert str(missing) in message and "does not exist" in message


def test_folder_without_config(tmp_path: Path, tiny_model_path: Path) -> None:
    broken = _copy_without(tiny_model_path, tmp_path / "model", "config.json")
    message = _load_error(broken)
    assert str(broken) in message and "config.json" in message


def test_folder_without_weights(tmp_path: Path, tiny_model_path: Path) -> None:
    broken = _copy_without(tiny_model_path, tmp_path / "model", "*.safetensors")
    message = _load_error(broken)
    assert str(broken) in message and "weights" in message


def test_folder_without_tokenizer(tmp_path: Path, tiny_model_path: Path) -> None:
    broken = _copy_without(tiny_model_path, tmp_path / "model", "tokenizer*")
    message = _load_error(broken)
    assert str(broken) in message and "tokenizer" in message


def test_truncated_weights(tmp_path: Path, tiny_model_path: Path) -> None:
    broken = _copy_without(tiny_model_path, tmp_path / "model")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = _load_error(broken)
    assert str(broken) in message and "cannot load the model" in message


def test_unknown_device_and_dtype(tiny_model_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        InferenceEngine.load(EngineConfig(model_path=tiny_model_path, device="tpu"))
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        InferenceEngine.load(EngineConfig(model_path=tiny_model_path, device="cpu", dtype="int3"))


def test_loaded_engine_describes_itself(tiny_model_path: Path) -> None:
    engine = InferenceEngine.load(EngineConfig(model_path=tiny_model_path, device="cpu", dtype="float32"))
    assert engine.model_name == tiny_model_path.name
    assert engine.device == "cpu"
    assert engine.dtype == "float32"
    assert engine.context_length == 2048
    assert not engine.stats().accepting
