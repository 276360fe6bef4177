"""Choose the next token of every row of a batch, each row with its own settings."""

from __future__ import annotations

import torch

from app.inference.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream for seeded requests, so that other requests cannot shift its draws."""
    if params.seed is None or params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the best token always stays.
        outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(outside, float("-inf")))
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator)


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """logits: [batch, vocab] of the last position -> the chosen token ids [batch], on the same device.

    Greedy rows share one argmax. Nothing waits for the device: the caller reads the ids when it
    needs them (on a GPU, while the next step runs).
    """
    chosen = logits.argmax(dim=-1)
    for row, row_params in enumerate(params):
        if row_params.temperature > 0:
            chosen[row : row + 1] = _sample_row(logits[row], row_params, generators[row])
    return chosen
