"""Incremental detokenization and stop strings, per sequence.

Decoding one token at a time is wrong for byte-level tokenizers: a character may span several
tokens (emoji, CJK) and a token's text depends on its neighbours (leading spaces, merges). The
prefix/read-offset method of vLLM and TGI decodes a short window of recent tokens twice, with
and without the newest ones, and emits the difference only when it does not end in an
incomplete UTF-8 sequence (which decodes to U+FFFD).

For fast tokenizers (the common case) that method runs inside the tokenizers library, as
`tokenizers.decoders.DecodeStream` (one call into Rust per token instead of two decodes: about
7 µs instead of 11-15 µs per token with SmolLM2's tokenizer on the 2-core machine). It gives
the same text, token by token, as the window method here, on the tiny test model's and
SmolLM2's byte-level tokenizers and on a SentencePiece-style byte-fallback tokenizer
(tests/inference/test_detokenization.py), with two exceptions that this module covers with its
own window method (_WindowDetokenizer), so that the text is always what that method gives:

- DecodeStream raises "Invalid prefix encountered" when the window's text stops starting with
  the text already emitted, which byte-fallback tokenizers do for invalid byte sequences (one
  U+FFFD per byte, fewer once a later byte completes a character; vLLM issue 17448). The request
  then continues on the window method from the same window (the tokens of the last emitted text
  and those since), which emits what the new text adds by length, as before;
- DecodeStream has no end: tokens still held back when generation stops (an incomplete character)
  are released by the window method (`flush`), as U+FFFD, as a full decode would show them.

Slow (Python) tokenizers, which DecodeStream cannot drive, use the window method throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers.decoders import DecodeStream

_REPLACEMENT_CHARACTER = "\ufffd"
# How many already-emitted tokens give the decoder enough context for the next ones.
_CONTEXT_TOKENS = 5
# The start of DecodeStream's error when the window's text no longer extends the emitted text.
_INVALID_PREFIX = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """One sequence's generated tokens to text, a delta per token, never splitting a character.

    tokenizer: a transformers tokenizer (fast: through DecodeStream; slow: the window method);
    prompt_ids: the prompt's token ids, whose last few give the first generated token its
    context (a leading space, a merge). Special tokens are skipped.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = _decoder(tokenizer, self._backend)
        self._stream: DecodeStream | None = None
        self._window: _WindowDetokenizer | None = None
        if self._backend is not None:
            self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        else:
            self._window = _WindowDetokenizer(self._decode, context)
        # DecodeStream's window, kept to hand over to the window method: the tokens whose text
        # was emitted last (context) and the tokens held back since.
        self._emitted_ids = context
        self._held_ids: list[int] = []

    def add_token(self, token_id: int) -> str:
        """Append a token and return the text it completes ("" while a character is still incomplete).

        Raises what the tokenizer raises for anything but DecodeStream's invalid-prefix error.
        """
        if self._stream is None:
            assert self._window is not None
            return self._window.add_token(token_id)
        self._held_ids.append(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            self._window = _WindowDetokenizer(self._decode, self._emitted_ids, self._held_ids[:-1])
            self._stream = None
            return self._window.add_token(token_id)
        if text is None:
            return ""
        self._emitted_ids, self._held_ids = self._held_ids, []
        return text

    def flush(self) -> str:
        """The text still held back at the end (it may end in U+FFFD: then the model wrote that)."""
        if self._stream is not None:
            if not self._held_ids:
                return ""
            self._window = _WindowDetokenizer(self._decode, self._emitted_ids, self._held_ids)
            self._stream = None
        assert self._window is not None
        return self._window.flush()


def _decoder(tokenizer: Any, backend: Any) -> Callable[[list[int]], str]:
    """ids -> text without special tokens; the Rust tokenizer behind a fast one when there is one."""
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _WindowDetokenizer:
    """The prefix/read-offset method over a window of token ids (see the module docstring).

    context: tokens whose text counts as emitted already; held: tokens after them whose text is
    not emitted yet.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], context: list[int], held: tuple[int, ...] | list[int] = ()
    ) -> None:
        self._decode = decode
        self.token_ids: list[int] = [*context, *held]
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add_token(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHARACTER):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
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
