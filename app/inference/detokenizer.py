"""Incremental detokenization and stop strings, per sequence.

Decoding one token at a time is wrong for byte-level tokenizers: a character may span several
tokens (emoji, CJK) and a token's text depends on its neighbours (leading spaces, merges). The
prefix/read-offset method of vLLM and TGI decodes a short window of recent tokens twice, with
and without the newest ones, and emits the difference only when it does not end in an
incomplete UTF-8 sequence (which decodes to U+FFFD).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT_CHARACTER = "\ufffd"
# How many already-emitted tokens give the decoder enough context for the next ones.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        # The Rust tokenizer behind a fast HF tokenizer decodes the same text without the Python
        # wrapper's overhead, which matters at two decodes per token per sequence.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode_ids = (
            (lambda ids: backend.decode(ids, skip_special_tokens=True))
            if backend is not None
            else (
                lambda ids: tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
            )
        )
        self.token_ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids)

    def add_token(self, token_id: int) -> str:
        """Append a token and return the text it completes ("" while a character is still incomplete)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHARACTER):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end (it may end in U+FFFD: then the model wrote that)."""
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


class StopStringFilter:
    """Holds back text that could be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far: the final text of the sequence."""
        return self._text[: self._emitted]

    def feed(self, new_text: str) -> str:
        """Add decoded text; return what can be released now. Sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += new_text
        if not self._stop:
            return self._release(len(self._text))
        first_stop = min(
            (index for index in (self._text.find(s, search_from) for s in self._stop) if index >= 0),
            default=-1,
        )
        if first_stop >= 0:
            self.stopped = True
            return self._release(first_stop)
        return self._release(len(self._text) - self._held_suffix_length())

    def flush(self) -> str:
        """Release held text at the end of generation (it did not become a stop string)."""
        return "" if self.stopped else self._release(len(self._text))

    def _held_suffix_length(self) -> int:
        longest = min(self._longest - 1, len(self._text) - self._emitted)
        for length in range(longest, 0, -1):
            suffix = self._text[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return length
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._emitted)
        released = self._text[self._emitted : end]
        self._emitted = end
        return released
