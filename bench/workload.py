"""Deterministic prompts of a fixed token length, so runs are comparable."""

from __future__ import annotations

import random
from typing import Any

_WORD_LIST = """
    market price rate bond equity yield growth risk inflation report quarter earnings revenue margin
    cash flow debt credit spread currency dollar euro policy central bank forecast demand supply
    energy oil gas metal copper gold index volume trade export import labour wage consumer retail
    housing mortgage loan deposit capital fund asset portfolio hedge option future swap liquidity
    volatility analyst summary outlook guidance dividend share buyback merger acquisition sector
    industry company board strategy cost investment return profit loss tax budget deficit surplus
    government election the a of and to in for on with as by at from that this which will would
    could should may might rise fall increase decrease stable strong weak higher lower expected
    unexpected sharp modest
"""
_WORDS = tuple(_WORD_LIST.split())


def make_prompts(count: int, input_len: int, seed: int, tokenizer: Any | None = None) -> list[str]:
    """`count` different prompts; with a tokenizer each encodes to exactly about `input_len` tokens."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        # A distinct opening per prompt: no two requests share a prefix.
        words = [f"Report {index}:"] + [rng.choice(_WORDS) for _ in range(input_len * 2)]
        text = " ".join(words)
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:input_len]
            text = tokenizer.decode(ids)
        else:
            # Without a tokenizer: English words average about 1.3 tokens.
            text = " ".join(words[: max(1, int(input_len / 1.3))])
        prompts.append(text)
    return prompts
