"""What one request's client sees of its tokens: text deltas (detokenized, cut at stop strings) and logprobs.

Apart from the scheduler and the device: one RequestOutput per request, fed the chosen tokens on
the scheduler thread. An exception raised here concerns that request alone (the engine ends it
with an error and carries on with the others).
"""

from __future__ import annotations

from typing import Any

from app.inference.detokenizer import IncrementalDetokenizer, StopStringFilter
from app.inference.types import TextDelta, TokenLogprob


class TokenTexts:
    """Each token id's own text (logprobs name their tokens this way, as vLLM does), cached."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = (
            (lambda ids: backend.decode(ids, skip_special_tokens=False))
            if backend is not None
            else (lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        )
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode([token_id])
        return text


class RequestOutput:
    """Turns one request's tokens into TextDelta items and its final text.

    add_token() returns a delta when the token completes text (a delta may hold several tokens
    while a multi-byte character is incomplete); `stopped` turns true at a stop string.
    """

    def __init__(self, request_id: str, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.request_id = request_id
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_filter = StopStringFilter(stop)
        self.logprobs: list[TokenLogprob] = []
        self._pending_tokens = 0
        self._pending_logprobs: list[TokenLogprob] = []

    @property
    def stopped(self) -> bool:
        return self.stop_filter.stopped

    @property
    def text(self) -> str:
        return self.stop_filter.text

    def add_token(self, token_id: int, logprob: TokenLogprob | None, is_eos: bool) -> TextDelta | None:
        """Record a generated token; an end-of-sequence token adds no text."""
        self._pending_tokens += 1
        if logprob is not None:
            self.logprobs.append(logprob)
            self._pending_logprobs.append(logprob)
        if is_eos:
            return None
        return self._delta(self._check_stop(self.detokenizer.add_token(token_id)))

    def finish(self) -> TextDelta | None:
        """At the end by length or end-of-sequence: release the text held back."""
        if self.stop_filter.stopped:
            return None
        tail = self._check_stop(self.detokenizer.flush())
        return self._delta(tail + self.stop_filter.flush())

    def _check_stop(self, text: str) -> str:
        return self.stop_filter.feed(text)

    def _delta(self, text: str) -> TextDelta | None:
        if not text:
            return None
        delta = TextDelta(text=text, token_count=self._pending_tokens, logprobs=tuple(self._pending_logprobs))
        self._pending_tokens = 0
        self._pending_logprobs = []
        return delta
