"""Streamed text never splits a multi-byte character and never shows a stop string.

The detokenizer runs on tokenizers' DecodeStream for fast tokenizers; its text must be, delta by
delta, what the prefix/read-offset window method gives (the engine's method before it, kept as
the fallback): on the tiny model's and SmolLM2's byte-level tokenizers and on a SentencePiece-style
byte-fallback tokenizer, where DecodeStream raises on invalid byte sequences.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.inference import TextDelta
from app.inference.detokenizer import IncrementalDetokenizer, StopStringFilter, _decoder, _WindowDetokenizer
from app.inference.outputs import RequestOutput
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat

MULTILINGUAL = "Grüße aus München 😀🎉 こんにちは, 你好世界! 👍🏽 déjà vu → ∞ 한국어"
_BYTE_TOKENS = 256


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" pieces, and any other character as its UTF-8 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(_BYTE_TOKENS))]
    pieces += ["▁", "▁Hello", "▁world", "a", "b", "▁a"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tokenizer(name: str, request: pytest.FixtureRequest) -> Any:
    if name == "byte-fallback":
        return _byte_fallback_tokenizer()
    fixture = "tiny_model_path" if name == "tiny" else "smollm2_path"
    return AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))


def _deltas(detokenizer: Any, token_ids: list[int]) -> list[str]:
    return [detokenizer.add_token(token_id) for token_id in token_ids] + [detokenizer.flush()]


def _window_deltas(tokenizer: Any, prompt_ids: list[int], token_ids: list[int]) -> list[str]:
    """The prefix/read-offset method alone, as the engine ran it before DecodeStream."""
    window = _WindowDetokenizer(_decoder(tokenizer, tokenizer.backend_tokenizer), prompt_ids[-5:])
    return _deltas(window, token_ids)


@pytest.mark.parametrize("name", ["tiny", "smollm2", "byte-fallback"])
def test_decode_stream_gives_the_window_methods_text_delta_by_delta(
    name: str, request: pytest.FixtureRequest
) -> None:
    """Texts (multi-byte characters, spaces after a special token) and random token sequences
    (incomplete and invalid byte sequences, special tokens anywhere, ends mid-character)."""
    tokenizer = _tokenizer(name, request)
    special = tokenizer.eos_token
    texts = [MULTILINGUAL, f"Hello{special} after a special token", f"{special}  two spaces", "a\n\n  b\t😀"]
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 14))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(tokenizer.all_special_ids))
        sequences.append(ids)
    prompt_ids = tokenizer("Hello:", add_special_tokens=False)["input_ids"]
    for token_ids in sequences:
        expected = _window_deltas(tokenizer, prompt_ids, token_ids)
        assert _deltas(IncrementalDetokenizer(tokenizer, prompt_ids), token_ids) == expected, token_ids
    # With the prompt as context, the byte-fallback tokenizer keeps the text's leading "▁" as a space.
    assert (
        "".join(_deltas(IncrementalDetokenizer(tokenizer, prompt_ids), sequences[0])).lstrip() == MULTILINGUAL
    )


def test_byte_fallback_characters_come_whole_and_invalid_bytes_do_not_raise() -> None:
    tokenizer = _byte_fallback_tokenizer()
    emoji = tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert sum(1 for token in emoji if 3 <= token < 3 + _BYTE_TOKENS) == 4, (
        "four byte tokens, or this proves nothing"
    )
    assert _deltas(IncrementalDetokenizer(tokenizer, [1]), emoji) == ["", "", "", "", "😀", ""]
    # Bytes that are no UTF-8, then a word: DecodeStream raises "Invalid prefix" here (its window's
    # text shrinks from three U+FFFD to two); the detokenizer carries on with the window method.
    byte = {value: 3 + value for value in range(_BYTE_TOKENS)}
    invalid = [
        byte[0x1E],
        byte[0x6C],
        byte[0x27],
        byte[0xD5],
        byte[0x3F],
        tokenizer.convert_tokens_to_ids("▁Hello"),
    ]
    stream = DecodeStream(ids=[1], skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for token_id in invalid:
            stream.step(tokenizer.backend_tokenizer, token_id)
    deltas = _deltas(IncrementalDetokenizer(tokenizer, [1]), invalid)
    assert deltas == _window_deltas(tokenizer, [1], invalid)
    assert deltas[:3] == ["\x1e", "l", "'"] and deltas[-2].endswith(" Hello")


@pytest.mark.parametrize("name", ["tiny", "smollm2", "byte-fallback"])
def test_an_incomplete_character_at_the_end_is_released_as_a_full_decode_shows_it(
    name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(name, request)
    token_ids = tokenizer("ok 😀", add_special_tokens=False)["input_ids"][:-1]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = _deltas(detokenizer, token_ids)
    assert deltas[-1].endswith("\ufffd"), deltas
    assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_a_stop_string_across_tokens_cuts_the_text(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = _tokenizer(name, request)
    token_ids = tokenizer("Hello world, 😀 and more", add_special_tokens=False)["input_ids"]
    output = RequestOutput("r", tokenizer, [], stop=("o wor", "never"))
    for token_id in token_ids:
        output.add_token(token_id, None, is_eos=False)
        if output.stopped:
            break
    assert output.stopped and output.text == "Hell"


def test_a_slow_tokenizer_runs_on_the_window_method(tiny_model_path: Path) -> None:
    """DecodeStream needs the Rust tokenizer; a tokenizer without one decodes in Python."""
    fast = AutoTokenizer.from_pretrained(tiny_model_path)

    class SlowTokenizer:
        def decode(self, ids: list[int], **options: Any) -> str:
            return fast.decode(ids, **options)

    token_ids = fast(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(SlowTokenizer(), [])
    assert _deltas(detokenizer, token_ids) == _deltas(IncrementalDetokenizer(fast, []), token_ids)
    assert "".join(_deltas(IncrementalDetokenizer(SlowTokenizer(), []), token_ids)) == MULTILINGUAL


def test_incremental_detokenizer_never_breaks_multibyte_characters(tiny_model_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    token_ids = tokenizer(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    single_token_texts = [tokenizer.decode([token_id]) for token_id in token_ids]
    assert any("\ufffd" in text for text in single_token_texts), (
        "the sample must contain characters split across tokens, or this test proves nothing"
    )

    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("Hello:")["input_ids"])
    deltas = [detokenizer.add_token(token_id) for token_id in token_ids]
    deltas.append(detokenizer.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas, "some tokens complete no character and must emit nothing"
    assert "".join(deltas) == MULTILINGUAL


def test_stop_filter_holds_back_possible_stop_prefixes() -> None:
    stop_filter = StopStringFilter(("END", "###"))
    assert stop_filter.feed("Hello E") == "Hello "
    assert stop_filter.feed("N") == ""
    assert stop_filter.feed("joy #") == "ENjoy "
    assert stop_filter.feed("## tail") == ""
    assert stop_filter.stopped
    assert stop_filter.text == "Hello ENjoy "
    assert stop_filter.feed("more") == ""


def test_stop_filter_releases_held_text_at_the_end() -> None:
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.feed("almost ST") == "almost "
    assert stop_filter.flush() == "ST"
    assert stop_filter.text == "almost ST"
    assert not stop_filter.stopped


async def test_engine_streams_cjk_and_emoji_whole(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    for question in ("Say hello in Japanese.", "Say hello in Chinese.", "Send a happy emoji."):
        deltas: list[str] = []
        async for item in engine.submit(chat(question, max_tokens=40, temperature=0)):
            if isinstance(item, TextDelta):
                assert item.text and item.token_count >= 1
                deltas.append(item.text)
            else:
                result = item
        assert "".join(deltas) == result.text
        assert all("\ufffd" not in delta for delta in deltas)
        assert any(ord(character) > 0x2FFF for character in result.text), result.text
        assert result.finish_reason == "stop"
