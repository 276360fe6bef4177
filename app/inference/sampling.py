"""Choose the next token of every row of a batch in one pass on the device, each row with its own settings.

The order and meaning of every step follow vLLM's v1 sampler (vllm/v1/sample/sampler.py,
ops/penalties.py, ops/topk_topp_sampler.py):

1. logprobs (when asked) are the model's raw distribution: log_softmax of the logits, before
   any of the steps below;
2. logit_bias is added (float32);
3. penalties: repetition_penalty divides positive and multiplies negative logits of tokens seen
   in the prompt or the output; frequency_penalty subtracts per occurrence in the output,
   presence_penalty once per token present in the output;
4. greedy rows (temperature 0) take the argmax here;
5. sampled rows: divided by their temperature, then min_p (drop tokens whose probability is
   below min_p times the best one's), top_k, top_p (keep the smallest set of best tokens whose
   probability reaches top_p; the best token always stays), then one draw.

The draw is the exponential race vLLM uses (argmax of p / q with q ~ Exp(1), which picks token i
with probability p_i), computed as argmax(logit - log q): it needs no softmax, no cumulative sum
and no normalisation. Seeded rows draw their q from their own generator, a fixed number of draws
per step that depends only on the row itself, so a seeded request gives the same tokens whatever
else shares the batch.

No full sort in the common case: the best `_CANDIDATES` tokens of each sampled row (one top-k
over the batch) hold the whole nucleus whenever top_k is at most that, or min_p or top_p already
cut inside them (a chat model at temperature 0.7 / top_p 0.95 keeps a few dozen tokens). On the
CPU a row whose nucleus reaches past them (a flat distribution) tries the best
`_WIDER_CANDIDATES` the same way, and only past those is sorted in full (on a GPU such rows are
sorted at once); rows with no truncating filter draw over the whole vocabulary without sorting.

Rows whose logits are not finite (a NaN or an infinity out of the model) get the token id -1:
the caller ends that request alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from app.inference.types import SamplingParams

# How many of each sampled row's best tokens the common path looks at (see the module docstring).
_CANDIDATES = 256
# On the CPU, rows whose kept set reaches past those try this many before a full sort: a top-k of
# 4096 out of SmolLM2's 49152 costs about a fifth of sorting the row.
_WIDER_CANDIDATES = 4096
# vLLM raises smaller temperatures to this (sampling_params.py: _MAX_TEMP... "maxed it out to 0.01"):
# dividing logits by less overflows float32 to infinity, and the probabilities become NaN.
MIN_TEMPERATURE = 0.01
# Penalised logits are kept inside this range, so that dividing by MIN_TEMPERATURE stays finite.
_LOGIT_LIMIT = 1e30
INVALID_TOKEN = -1


class SamplingRow(Protocol):
    """What the sampler needs of one row: its settings, its random stream, the tokens so far."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream for seeded requests, so that other requests cannot shift its draws.

    seed: any integer in [-2**63, 2**64) (a negative seed is taken modulo 2**64, as torch does).
    """
    if params.seed is None or params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


@dataclass
class Logprobs:
    """Raw log-probabilities for the rows that asked: `rows` index the batch.

    chosen: [n] the chosen token's; top_ids / top_values: [n, k] the k best (k = the most any row
    asked for; a row uses its own first `params.logprobs` columns).
    """

    rows: list[int]
    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor


@dataclass
class SampleOutput:
    """tokens: [batch] on the device (INVALID_TOKEN where the row's logits were not finite)."""

    tokens: torch.Tensor
    logprobs: Logprobs | None = None


@dataclass
class _Group:
    """Sampled rows that take the same path, with their settings as tensors."""

    index: torch.Tensor  # their rows in the batch
    rows: list[int]
    temperature: torch.Tensor  # [n, 1]
    top_p: torch.Tensor  # [n, 1]
    top_k: torch.Tensor  # [n, 1]: 0 (off) or the row's k, below the vocabulary size
    min_p_log: torch.Tensor  # [n, 1]: log(min_p), -inf where off
    any_top_p: bool
    any_top_k: bool
    any_min_p: bool
    # Every row's top_k keeps at most the candidates (so they hold its whole kept set).
    all_within_candidates: bool


@dataclass
class _BatchSettings:
    """Per-row settings as tensors, built once for a given list of rows (the batch changes rarely)."""

    greedy_only: bool  # every row greedy, no bias, no penalties: one argmax
    any_greedy: bool
    # Sampled rows without top_k / top_p race over the whole vocabulary; the others over their
    # best candidates. Which path a row takes depends on its own settings only (seeded rows).
    plain: _Group | None
    truncated: _Group | None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, values
    penalty_rows: list[int]
    logprob_rows: list[int]
    max_logprobs: int


class Sampler:
    """Samples a batch of rows; reuses its per-row tensors while the rows stay the same."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._key: tuple[int, ...] = ()
        self._settings: _BatchSettings | None = None

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        """logits: [batch, vocab] of the last position -> the chosen ids [batch], on the same device.

        Nothing waits for the device: the caller reads the ids when it needs them (on a GPU,
        while the next step runs).
        """
        settings = self._settings_for(rows)
        if settings.greedy_only:
            tokens = logits.argmax(dim=-1)
            # argmax prefers NaN and +inf; a row of -inf gives an -inf: all three mean broken output.
            chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
            tokens = torch.where(torch.isfinite(chosen), tokens, INVALID_TOKEN)
            return SampleOutput(tokens, _logprobs(logits, tokens, settings))
        scores = logits.float()
        if scores is logits and (settings.bias is not None or settings.penalty_rows):
            scores = scores.clone()  # changed in place below; the caller's logits stay raw
        broken = ~torch.isfinite(scores.amax(dim=-1))
        if settings.bias is not None:
            bias_rows, bias_ids, bias_values = settings.bias
            scores.index_put_((bias_rows, bias_ids), bias_values, accumulate=True)
        if settings.penalty_rows:
            _apply_penalties(scores, rows, settings.penalty_rows, self.vocab_size)
        # Greedy rows' tokens; every row is sampled at the chat page's defaults, so skip the pass then.
        tokens = scores.argmax(dim=-1) if settings.any_greedy else None
        for group, sample in ((settings.plain, _sample_plain), (settings.truncated, _sample_truncated)):
            if group is None:
                continue
            if len(group.rows) == len(rows):  # the whole batch, in order: no copy of its logits
                tokens = sample(scores, rows, group)
                continue
            chosen = sample(scores.index_select(0, group.index), [rows[i] for i in group.rows], group)
            if tokens is None:
                tokens = torch.zeros(len(rows), dtype=torch.long, device=scores.device)
            tokens = tokens.index_copy(0, group.index, chosen)
        assert tokens is not None  # every row is greedy or in a group
        tokens = torch.where(broken, INVALID_TOKEN, tokens)
        return SampleOutput(tokens, _logprobs(logits, tokens, settings))

    def _settings_for(self, rows: Sequence[SamplingRow]) -> _BatchSettings:
        key = tuple(id(row.params) for row in rows) + tuple(id(row.generator) for row in rows)
        if self._settings is None or key != self._key:
            self._settings = self._build(rows)
            self._key = key
        return self._settings

    def _build(self, rows: Sequence[SamplingRow]) -> _BatchSettings:
        params = [row.params for row in rows]
        sampled = [index for index, p in enumerate(params) if p.temperature > 0]
        truncated = [i for i in sampled if params[i].top_p < 1.0 or 0 < params[i].top_k < self.vocab_size]
        plain = [i for i in sampled if i not in truncated]
        penalty_rows = [
            index
            for index, p in enumerate(params)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        ]
        bias_entries = [
            (index, token, value) for index, p in enumerate(params) for token, value in p.logit_bias
        ]
        logprob_rows = [index for index, p in enumerate(params) if p.logprobs is not None]
        bias = None
        if bias_entries:
            columns = list(zip(*bias_entries, strict=True))
            bias = (
                torch.tensor(columns[0], device=self.device),
                torch.tensor(columns[1], device=self.device),
                torch.tensor(columns[2], dtype=torch.float32, device=self.device),
            )
        return _BatchSettings(
            greedy_only=not sampled and not penalty_rows and not bias_entries,
            any_greedy=len(sampled) < len(params),
            plain=self._group(plain, params),
            truncated=self._group(truncated, params),
            bias=bias,
            penalty_rows=penalty_rows,
            logprob_rows=logprob_rows,
            max_logprobs=max((params[i].logprobs or 0 for i in logprob_rows), default=0),
        )

    def _group(self, indices: list[int], params: list[SamplingParams]) -> _Group | None:
        if not indices:
            return None
        chosen = [params[i] for i in indices]
        top_k = [p.top_k if 0 < p.top_k < self.vocab_size else 0 for p in chosen]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device).unsqueeze(1)

        return _Group(
            index=torch.tensor(indices, device=self.device),
            rows=indices,
            temperature=column([max(p.temperature, MIN_TEMPERATURE) for p in chosen]),
            top_p=column([p.top_p for p in chosen]),
            top_k=column(top_k, torch.long),
            min_p_log=column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in chosen]),
            any_top_p=any(p.top_p < 1.0 for p in chosen),
            any_top_k=any(top_k),
            any_min_p=any(p.min_p > 0 for p in chosen),
            all_within_candidates=all(0 < k <= min(_CANDIDATES, self.vocab_size) for k in top_k),
        )


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, settings: _BatchSettings) -> Logprobs | None:
    """The model's raw log-probabilities (before bias, penalties, temperature and filters), as vLLM."""
    if not settings.logprob_rows:
        return None
    index = torch.tensor(settings.logprob_rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    top_values, top_ids = logprobs.topk(max(settings.max_logprobs, 1), dim=-1)
    chosen = tokens.index_select(0, index).clamp(min=0)
    return Logprobs(
        settings.logprob_rows, logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1), top_ids, top_values
    )


def _apply_penalties(
    scores: torch.Tensor, rows: Sequence[SamplingRow], penalty_rows: list[int], vocab_size: int
) -> None:
    """vLLM's apply_penalties on the rows that have any, in place."""
    device = scores.device
    index = torch.tensor(penalty_rows, device=device)
    chosen = scores.index_select(0, index)
    count = len(penalty_rows)

    def padded(lists: list[list[int]]) -> torch.Tensor:
        # Padded with an extra column (id vocab_size) that is dropped afterwards.
        width = max((len(ids) for ids in lists), default=0)
        return torch.tensor(
            [ids + [vocab_size] * (width - len(ids)) for ids in lists], dtype=torch.long, device=device
        ).view(count, width)

    output_ids = padded([rows[i].output_ids for i in penalty_rows])
    counts = torch.zeros(count, vocab_size + 1, device=device)
    counts.scatter_add_(1, output_ids, torch.ones(output_ids.shape, device=device))
    counts = counts[:, :vocab_size]
    in_output = counts > 0
    prompt_ids = padded([rows[i].prompt_ids for i in penalty_rows])
    in_prompt = torch.zeros(count, vocab_size + 1, dtype=torch.bool, device=device)
    in_prompt.scatter_(1, prompt_ids, True)
    seen = in_prompt[:, :vocab_size] | in_output

    params = [rows[i].params for i in penalty_rows]
    repetition = torch.tensor([[p.repetition_penalty] for p in params], device=device)
    frequency = torch.tensor([[p.frequency_penalty] for p in params], device=device)
    presence = torch.tensor([[p.presence_penalty] for p in params], device=device)
    penalised = torch.where(chosen > 0, chosen / repetition, chosen * repetition)
    chosen = torch.where(seen, penalised, chosen)
    chosen -= frequency * counts + presence * in_output
    # A tiny repetition_penalty could push a logit past float32 once divided by a small temperature.
    chosen.clamp_(-_LOGIT_LIMIT, _LOGIT_LIMIT)
    scores.index_copy_(0, index, chosen)


def _noise(shape: tuple[int, int], rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
    """-log(q), q ~ Exp(1) (Gumbel noise): each seeded row draws from its own generator."""
    noise = torch.empty(shape, device=device)
    noise.exponential_()
    for index, row in enumerate(rows):
        if row.generator is not None:
            noise[index].exponential_(generator=row.generator)
    # exponential_ may return exactly 0 on some devices: -log(0) would beat every masked -inf.
    return noise.clamp_(min=1e-30).log_().neg_()


def _sample_plain(scores: torch.Tensor, rows: Sequence[SamplingRow], group: _Group) -> torch.Tensor:
    """Rows without top_k / top_p: the whole vocabulary races, min_p masks elementwise."""
    scores = scores / group.temperature
    if group.any_min_p:
        floor = scores.amax(dim=-1, keepdim=True) + group.min_p_log
        scores = scores.masked_fill(scores < floor, -math.inf)
    return (scores + _noise(tuple(scores.shape), rows, scores.device)).argmax(dim=-1)


def _sample_truncated(scores: torch.Tensor, rows: Sequence[SamplingRow], group: _Group) -> torch.Tensor:
    """Rows with top_k or top_p: the race runs over each row's best candidates (module docstring)."""
    return _sample_candidates(scores / group.temperature, rows, group, _CANDIDATES)


def _sample_candidates(
    scores: torch.Tensor,
    rows: Sequence[SamplingRow],
    group: _Group,
    candidates: int,
    full_normaliser: torch.Tensor | None = None,
) -> torch.Tensor:
    """scores: [n, vocab], temperature applied; the race over each row's best `candidates` tokens.

    A row whose kept set reaches past them goes on to _WIDER_CANDIDATES, then to a full sort.
    full_normaliser: [n, 1] the rows' log-normaliser over their min_p-masked row, when known.
    """
    count, vocab = scores.shape
    device = scores.device
    candidates = min(candidates, vocab)
    values, ids = scores.topk(candidates, dim=-1)
    ranks = torch.arange(candidates, device=device)
    within_candidates = (group.top_k > 0) & (group.top_k <= candidates)
    keep = torch.ones_like(values, dtype=torch.bool)
    if group.any_top_k:
        keep &= (group.top_k == 0) | (ranks < group.top_k)
    floor = values[:, :1] + group.min_p_log
    if group.any_min_p:
        keep &= values >= floor
    if group.any_top_p:
        # Probabilities need the normaliser over every token the earlier filters keep: the
        # candidates alone when top_k kept no more, else the whole (min_p-masked) row.
        kept_values = values.masked_fill(~keep, -math.inf)
        normaliser = torch.logsumexp(kept_values, dim=-1, keepdim=True)
        if not group.all_within_candidates:
            if full_normaliser is None:
                full_normaliser = _log_normaliser(scores, values[:, :1], floor if group.any_min_p else None)
            normaliser = torch.where(within_candidates, normaliser, full_normaliser)
        probabilities = (kept_values - normaliser).exp()
        before = probabilities.cumsum(dim=-1) - probabilities
        keep &= (before < group.top_p) | (ranks == 0)
    # The candidates hold the whole kept set when top_k kept no more, or their last one is dropped
    # with the right normaliser: not so for a top_k past them, whose normaliser above was the
    # whole row's (too large: top_p would keep too many), so such a row goes on.
    covered = (within_candidates | (~keep[:, -1:] & (group.top_k == 0))).squeeze(1)
    race = values.masked_fill(~keep, -math.inf) + _noise((count, candidates), rows, device)
    tokens = ids.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
    if group.all_within_candidates:
        return tokens
    if scores.device.type == "cuda":
        # Reading `covered` would make the host wait for this step, which the engine overlaps with
        # the next one; a GPU sorts the rows in no time, so they all take both paths.
        return torch.where(covered, tokens, _sample_sorted(scores, rows, group))
    if bool(covered.all()):
        return tokens
    # On the CPU: a row whose kept set reaches past the candidates (a flat distribution: with
    # made-up prompts at temperature 0.7 / top_p 0.95, about one step in two has one) tries a
    # wider top-k, which costs a fraction of a full sort, and is sorted only if that is not enough.
    # Each try drew from the row's generator; whether a row goes on depends on that row alone, so
    # a seeded row still draws the same sequence every time.
    uncovered = torch.nonzero(~covered).flatten()
    top_k = group.top_k.index_select(0, uncovered)
    wider = _WIDER_CANDIDATES if candidates < _WIDER_CANDIDATES < vocab else 0
    subset = dataclasses.replace(
        group,
        temperature=group.temperature.index_select(0, uncovered),
        top_p=group.top_p.index_select(0, uncovered),
        top_k=top_k,
        min_p_log=group.min_p_log.index_select(0, uncovered),
        all_within_candidates=bool(((top_k > 0) & (top_k <= wider)).all()),
    )
    subset_scores = scores.index_select(0, uncovered)
    subset_rows = [rows[i] for i in uncovered.tolist()]
    if wider:
        if full_normaliser is not None:
            full_normaliser = full_normaliser.index_select(0, uncovered)
        chosen = _sample_candidates(subset_scores, subset_rows, subset, wider, full_normaliser)
    else:
        chosen = _sample_sorted(subset_scores, subset_rows, subset)
    return tokens.index_copy(0, uncovered, chosen)


def _log_normaliser(scores: torch.Tensor, row_max: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """log(sum(exp(scores))) per row over the tokens at or above `floor`: [n, vocab] -> [n, 1].

    row_max: [n, 1] the rows' largest score (the top-k already has it). torch.logsumexp would
    find it again and allocate at every step; on the CPU this costs half as much.
    """
    shifted = scores - row_max
    if floor is not None:
        shifted.masked_fill_(scores < floor, -math.inf)
    return shifted.exp_().sum(dim=-1, keepdim=True).log_().add_(row_max)


def _sample_sorted(scores: torch.Tensor, rows: Sequence[SamplingRow], group: _Group) -> torch.Tensor:
    """Rows (temperature applied) over their whole vocabulary, filtered after a full sort.

    scores: [n, vocab]; group: the rows' settings (its tensors [n, 1]). Returns the ids [n].
    """
    vocab = scores.shape[1]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device)
    top_k = torch.where(group.top_k > 0, group.top_k, vocab)
    keep = (sorted_scores >= sorted_scores[:, :1] + group.min_p_log) & (ranks < top_k)
    probabilities = torch.softmax(sorted_scores.masked_fill(~keep, -math.inf), dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities
    keep &= (before < group.top_p) | (ranks == 0)
    race = sorted_scores.masked_fill(~keep, -math.inf) + _noise((scores.shape[0], vocab), rows, scores.device)
    return order.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
