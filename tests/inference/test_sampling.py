"""The batched sampler against a plain-torch reference of vLLM's semantics, on the same logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from app.inference import sampling
from app.inference.sampling import INVALID_TOKEN, Sampler, make_generator
from app.inference.types import SamplingParams

VOCAB = 1000
DEVICE = torch.device("cpu")


@dataclass(eq=False)
class Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


def reference_probabilities(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """vLLM's v1 sampler for one row, written plainly: bias, penalties, temperature, min_p, top_k, top_p.

    Returns the distribution the row samples from, [vocab] (one-hot for greedy).
    """
    params = row.params
    scores = logits.double().clone()
    for token, bias in params.logit_bias:
        scores[token] += bias
    counts = torch.zeros_like(scores)
    for token in row.output_ids:
        counts[token] += 1
    seen = counts > 0
    for token in row.prompt_ids:
        seen[token] = True
    if params.repetition_penalty != 1.0:
        penalised = torch.where(
            scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
        )
        scores = torch.where(seen, penalised, scores)
    scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).double()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(scores.argmax(), scores.shape[0]).double()
    scores = scores / max(params.temperature, 0.01)
    probabilities = torch.softmax(scores, dim=-1)
    if params.min_p > 0:
        scores = scores.masked_fill(probabilities < params.min_p * probabilities.max(), -math.inf)
    if 0 < params.top_k < scores.shape[0]:
        kth = scores.sort(descending=True).values[params.top_k - 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        # vLLM: sort ascending, drop tokens while the mass below them stays within 1 - top_p.
        ascending, order = scores.sort()
        below = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
        drop = below <= 1 - params.top_p
        drop[-1] = False
        scores = scores.scatter(0, order, ascending.masked_fill(drop, -math.inf))
    return torch.softmax(scores, dim=-1)


def peaked_logits(seed: int, rows: int = 1) -> torch.Tensor:
    """Logits shaped like a chat model's: a few likely tokens, a long tail."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=generator) * 2
    logits[:, :12] += torch.linspace(9, 4, 12)
    return logits[:, torch.randperm(VOCAB, generator=generator)]


def flat_logits(seed: int) -> torch.Tensor:
    """Nearly uniform: the nucleus holds most of the vocabulary (the sampler's sorted path)."""
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 0.05


def empirical(logits: torch.Tensor, row: Row, draws: int) -> torch.Tensor:
    """Token frequencies from one batched call with `draws` copies of the row."""
    tokens = Sampler(VOCAB, DEVICE)(logits.expand(draws, -1), [row] * draws).tokens
    return torch.bincount(tokens, minlength=VOCAB).double() / draws


CASES = {
    "temperature": SamplingParams(temperature=0.8),
    "chat defaults": SamplingParams(temperature=0.7, top_p=0.95),
    "top_k": SamplingParams(temperature=1.0, top_k=5),
    "top_k beyond the candidates": SamplingParams(temperature=1.0, top_k=400),
    "min_p": SamplingParams(temperature=1.0, min_p=0.05),
    "everything": SamplingParams(temperature=1.2, top_p=0.8, top_k=20, min_p=0.01),
    "tiny top_p": SamplingParams(temperature=1.0, top_p=1e-9),
    "tiny temperature": SamplingParams(temperature=0.01, top_p=0.9),
    # top_p's normaliser is over the 400 best, not the whole row (which would keep too many).
    "top_k beyond the candidates with top_p": SamplingParams(temperature=1.0, top_k=400, top_p=0.6),
}


def two_level_logits(seed: int, high: int) -> torch.Tensor:
    """`high` likely tokens (+3) over a tail of equal ones: the nucleus ends past the first candidates."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, VOCAB, generator=generator) * 0.01
    logits[:, :high] += 3
    return logits[:, torch.randperm(VOCAB, generator=generator)]


LOGITS = {
    "peaked": lambda: peaked_logits(1),
    "flat": lambda: flat_logits(2),
    # 300 tokens hold 95% of the mass: past the first 256 candidates, within the wider ones.
    "two-level": lambda: two_level_logits(3, 300),
}


@pytest.fixture
def wider_candidates_within_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wider top-k is 4096 (more than VOCAB): 500 here, so that the tests go through it."""
    monkeypatch.setattr(sampling, "_WIDER_CANDIDATES", 500)


@pytest.mark.parametrize("logits_kind", list(LOGITS))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("wider_candidates_within_vocab")
def test_sampled_frequencies_follow_the_reference(name: str, logits_kind: str) -> None:
    logits = LOGITS[logits_kind]()
    row = Row(CASES[name])
    expected = reference_probabilities(logits[0], row)
    draws = 4000
    observed = empirical(logits, row, draws)
    # Nothing outside the reference's support, ever.
    assert observed[expected == 0].sum() == 0
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 2 / draws
    assert bool(((observed - expected).abs() <= tolerance).all()), name


def test_penalties_and_logit_bias_match_the_reference_exactly() -> None:
    logits = peaked_logits(3, rows=4)
    rows = [
        Row(SamplingParams(temperature=0, repetition_penalty=1.3), prompt_ids=[1, 2, 3], output_ids=[4]),
        Row(SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=1.5), output_ids=[7, 7, 9]),
        Row(SamplingParams(temperature=0, logit_bias=((11, 100.0), (12, -100.0)))),
        Row(SamplingParams(temperature=0)),
    ]
    # The greedy choice of each row exposes its processed logits' best token.
    for source in range(8):
        logits = peaked_logits(source, rows=4)
        for row, row_logits in zip(rows, logits, strict=True):
            row.output_ids.append(int(row_logits.argmax()))  # penalise the current favourite
        tokens = Sampler(VOCAB, DEVICE)(logits, rows).tokens.tolist()
        expected = [
            int(reference_probabilities(row_logits, row).argmax())
            for row, row_logits in zip(rows, logits, strict=True)
        ]
        assert tokens == expected
    assert tokens[2] == 11


def test_greedy_rows_take_the_argmax_whatever_shares_the_batch() -> None:
    logits = peaked_logits(4, rows=6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9)] * 3
    tokens = Sampler(VOCAB, DEVICE)(logits, [Row(p) for p in params]).tokens
    assert tokens[0::2].tolist() == logits[0::2].argmax(dim=-1).tolist()


def test_logprobs_are_the_raw_distribution() -> None:
    logits = peaked_logits(5, rows=3)
    rows = [
        Row(SamplingParams(temperature=0, logprobs=3)),
        Row(SamplingParams(temperature=0.5, top_p=0.5)),
        Row(SamplingParams(temperature=1.0, logprobs=0, logit_bias=((0, 50.0),))),
    ]
    output = Sampler(VOCAB, DEVICE)(logits, rows)
    assert output.logprobs is not None
    assert output.logprobs.rows == [0, 2]
    reference = torch.log_softmax(logits.double(), dim=-1)
    for position, row in enumerate(output.logprobs.rows):
        token = int(output.tokens[row])
        assert float(output.logprobs.chosen[position]) == pytest.approx(
            float(reference[row, token]), abs=1e-5
        )
        best = reference[row].topk(3)
        assert output.logprobs.top_ids[position, :3].tolist() == best.indices.tolist()
        assert output.logprobs.top_values[position, :3].tolist() == pytest.approx(
            best.values.tolist(), abs=1e-5
        )


@pytest.mark.parametrize("seed", [0, 7, -1, -(2**63), 2**64 - 1, 2**63])
def test_seeded_rows_repeat_whatever_else_is_in_the_batch(seed: int) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    flat_params = SamplingParams(temperature=1.0, top_p=0.99, seed=seed)

    def run(companions: list[SamplingParams], position: int) -> list[int]:
        rows = [Row(p) for p in companions]
        seeded = [
            Row(params, make_generator(params, DEVICE)),
            Row(flat_params, make_generator(flat_params, DEVICE)),
        ]
        rows[position:position] = seeded
        sampler = Sampler(VOCAB, DEVICE)
        chosen = []
        for step in range(6):
            logits = torch.cat([peaked_logits(100 + step, rows=len(rows))])
            logits[position + 1] = flat_logits(200 + step)[0]
            # Same logits for the seeded rows in every run, whatever the companions' are.
            logits[position] = peaked_logits(300 + step)[0]
            tokens = sampler(logits, rows).tokens.tolist()
            chosen.append((tokens[position], tokens[position + 1]))
        return chosen

    alone = run([], 0)
    assert run([SamplingParams(temperature=0)], 1) == alone
    assert run([SamplingParams(temperature=1.5), SamplingParams(temperature=0.3, top_k=3)], 2) == alone
    assert run([SamplingParams(temperature=0.7, top_p=0.95)] * 5, 0) == alone


def test_a_row_with_broken_logits_is_flagged_alone() -> None:
    logits = peaked_logits(6, rows=4)
    logits[1, 17] = float("nan")
    logits[3] = float("-inf")
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9)):
        tokens = Sampler(VOCAB, DEVICE)(logits, [Row(params) for _ in range(4)]).tokens.tolist()
        assert tokens[1] == INVALID_TOKEN and tokens[3] == INVALID_TOKEN
        assert 0 <= tokens[0] < VOCAB and 0 <= tokens[2] < VOCAB


def test_extreme_settings_stay_finite() -> None:
    logits = peaked_logits(7, rows=4) * 50
    rows = [
        Row(SamplingParams(temperature=0.01, repetition_penalty=1e-30), prompt_ids=list(range(VOCAB))),
        Row(SamplingParams(temperature=1e6)),
        Row(SamplingParams(temperature=1.0, min_p=1.0)),
        Row(SamplingParams(temperature=1.0, top_k=10**9, top_p=1.0, logit_bias=((5, -100.0),) * 3)),
    ]
    tokens = Sampler(VOCAB, DEVICE)(logits, rows).tokens.tolist()
    assert all(0 <= token < VOCAB for token in tokens)
    assert tokens[2] == int(logits[2].argmax())
