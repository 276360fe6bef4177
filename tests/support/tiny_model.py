"""Build the tiny test model: a 4-layer Llama with a 1k byte-level BPE tokenizer and a ChatML template.

It is generated (fixed seed, deterministic training on one thread) instead of committed: about
0.9 M parameters, a few MB on disk, built in seconds, and fast enough that engine tests can run
hundreds of decode steps. A short training on synthetic questions and answers makes it emit real
words (and end-of-sequence) instead of noise, which exercises stop handling and detokenization.

`build_tiny_model(directory)` reuses a folder that already holds the same RECIPE_VERSION.
CLI: `python -m tests.support.tiny_model OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Bump whenever anything below changes what gets written, so cached folders are rebuilt.
RECIPE_VERSION = 2
# The same weights on every x86 CPU: torch's own kernels at their baseline instruction set (not
# AVX2 / AVX-512, whose vector code rounds differently) and MKL in its conditional bitwise
# reproducible mode. Without them a model trained on an AVX-512 Xeon differed from one trained on
# an AVX2 EPYC and answered the tests' prompts differently (no emoji for "Send a happy emoji.").
# Both are read when torch starts, so the training runs in a child process that has them.
REPRODUCIBLE_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
MARKER_FILE = "zeus-tiny-model.json"
SEED = 1234
VOCAB_SIZE = 1024
TRAINING_STEPS = 200
SEQUENCES_PER_STEP = 16

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# SmolLM2's template, with a shorter default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Peru": "Lima",
}
_COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow"}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# Multi-byte text so that the tokenizer learns merges across UTF-8 continuation bytes.
_GREETINGS = {
    "Say hello in Japanese.": "こんにちは! That is hello in Japanese.",
    "Say hello in Chinese.": "你好! That is hello in Chinese.",
    "Send a happy emoji.": "Here you go: 😀🎉",
    "Say thank you in French.": "Merci beaucoup, très bien.",
}
# Extra text for the tokenizer only, so that its vocabulary reaches about 1k entries.
_TOKENIZER_TEXT = """
The quick brown fox jumps over the lazy dog. A market report describes prices, volumes, interest
rates, inflation, bonds, equities, currencies and commodities. Analysts read quarterly earnings,
balance sheets, cash flow statements and guidance before they write a summary for their clients.
Every morning the team checks overnight news from Asia, Europe and America, then discusses risks,
opportunities, forecasts and the probability of a recession. Models answer questions, write
paragraphs, translate sentences and explain definitions with examples. Numbers: 0 1 2 3 4 5 6 7 8
9 10 12 25 50 100 250 1000 3.14 2.5% -7 +42. Punctuation: (a, b); [c]: {d} "e" 'f' ... ! ? - _ / @ #.
Grüße aus München, déjà vu, naïve café, smörgåsbord, Ελληνικά, русский язык, 日本語のテキスト, 中文文本,
한국어 문장, emoji 🌍🚀✨👍🏽 and symbols € £ ¥ © ™ → ∑ √ ∞.
"""


def _conversations(rng: random.Random) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for country, city in _CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for thing, colour in _COLOURS.items():
        pairs.append((f"What colour is {thing}?", f"The colour of {thing} is {colour}."))
    for left in range(6):
        for right in range(5):
            pairs.append(
                (
                    f"What is {_NUMBER_WORDS[left]} plus {_NUMBER_WORDS[right]}?",
                    f"{_NUMBER_WORDS[left].capitalize()} plus {_NUMBER_WORDS[right]} is "
                    f"{_NUMBER_WORDS[left + right]}.",
                )
            )
    pairs.extend(_GREETINGS.items())
    pairs.append(("Tell me a story.", "Once upon a time a small model learned to talk. The end."))
    rng.shuffle(pairs)
    return pairs


def _train_tokenizer(corpus: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _train_model(model, token_sequences: list[list[int]], pad_id: int, rng: random.Random) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(TRAINING_STEPS):
        batch = rng.sample(token_sequences, SEQUENCES_PER_STEP)
        width = max(len(sequence) for sequence in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(batch):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _is_current(directory: Path) -> bool:
    marker = directory / MARKER_FILE
    if not marker.exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("recipe_version") == RECIPE_VERSION and all(
        (directory / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


def build_tiny_model(directory: Path) -> Path:
    """Write the tiny model into `directory` (reused when already built by this recipe) and return it.
    The training runs in a child process with REPRODUCIBLE_ENVIRONMENT (seconds)."""
    directory = Path(directory)
    if _is_current(directory):
        return directory
    if any(os.environ.get(name) != value for name, value in REPRODUCIBLE_ENVIRONMENT.items()):
        subprocess.run(
            [sys.executable, "-m", "tests.support.tiny_model", str(directory)],
            env={**os.environ, **REPRODUCIBLE_ENVIRONMENT},
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        )
        if not _is_current(directory):
            raise RuntimeError(f"the tiny model was not written to {directory}")
        return directory
    return _train(directory)


def _train(directory: Path) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    rng = random.Random(SEED)
    pairs = _conversations(rng)
    messages_list = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]

    corpus_lines = [q for q, _ in pairs] + [a for _, a in pairs] + [DEFAULT_SYSTEM_PROMPT]
    tokenizer = _train_tokenizer(corpus_lines * 4 + _TOKENIZER_TEXT.splitlines())
    token_sequences = [
        list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        for messages in messages_list
    ]

    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )

    # One thread: CPU kernels may split reductions differently with another thread count, and the
    # weights must come out bit-identical on every machine and run.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        _train_model(model, token_sequences, pad_id=eos_id, rng=rng)
    finally:
        torch.set_num_threads(previous_threads)

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    # Build next to the target and rename, so an interrupted build never leaves a half folder
    # that a later run would mistake for a finished one.
    staging = directory.with_name(directory.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    build_record = {"recipe_version": RECIPE_VERSION, "seed": SEED, "seconds": time.monotonic() - started}
    (staging / MARKER_FILE).write_text(json.dumps(build_record))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    started = time.monotonic()
    path = build_tiny_model(Path(argv[0]))
    print(f"tiny model ready in {path} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
