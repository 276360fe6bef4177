"""Streamed text never splits a multi-byte character and never shows a stop string."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from app.inference import TextDelta
from app.inference.detokenizer import IncrementalDetokenizer, StopStringFilter
from tests.inference.conftest import EngineFactory
from tests.inference.helpers import chat

MULTILINGUAL = "Grüße aus München 😀🎉 こんにちは, 你好世界! 👍🏽 déjà vu → ∞ 한국어"


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
