"""Serving metrics, defined as vLLM's `bench serve` defines them; shared by the engine and serve modes.

Per request, measured at the client over a streamed response:
- TTFT: send -> first streamed token (the first non-empty chunk).
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token.
- ITL: every gap between consecutive streamed chunks, pooled over all requests.
- E2EL: send -> last byte.
For each: mean, median and p99 over successful requests. Throughput over the run's wall time:
requests/s, output tokens/s, total (prompt + output) tokens/s. Goodput: requests/s that meet
every SLO given (TTFT, TPOT, E2EL in ms). Failed requests are counted by kind.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request as the client saw it; times are time.perf_counter() seconds."""

    sent_at: float
    chunk_times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # a short kind ("http_429", "timeout", ...) when the request failed
    # The streamed content, kept when a workload needs it (the chat workload resends its history).
    text: str = ""
    # The instance that answered (Zeus's X-Zeus-Instance header), when the server names one.
    instance: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.finished_at is not None and bool(self.chunk_times)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times[0] - self.sent_at

    @property
    def e2el_s(self) -> float:
        assert self.finished_at is not None
        return self.finished_at - self.sent_at

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return [
            later - earlier for earlier, later in zip(self.chunk_times, self.chunk_times[1:], strict=False)
        ]


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _distribution_ms(values_s: list[float]) -> dict[str, float]:
    values = [value * 1000 for value in values_s]
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {
        "mean": statistics.fmean(values),
        "median": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
    }


def parse_slos(specs: list[str]) -> dict[str, float]:
    """["ttft:1000", "tpot:200"] -> {"ttft": 1000.0, "tpot": 200.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"SLO {spec!r}: use ttft:MS, tpot:MS or e2el:MS")
        slos[name] = float(value)
    return slos


def _meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2el_s}
    return all(measured[name] * 1000 <= limit for name, limit in slos.items())


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float]) -> dict[str, Any]:
    done = [record for record in records if record.succeeded]
    failures = Counter(record.error or "incomplete" for record in records if not record.succeeded)
    output_tokens = sum(record.output_tokens for record in done)
    prompt_tokens = sum(record.prompt_tokens for record in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "goodput": sum(_meets_slos(record, slos) for record in done) / duration_s if slos else None,
        "slos_ms": slos,
        "ttft_ms": _distribution_ms([record.ttft_s for record in done]),
        "tpot_ms": _distribution_ms([tpot for record in done if (tpot := record.tpot_s) is not None]),
        "itl_ms": _distribution_ms([gap for record in done for gap in record.itls_s]),
        "e2el_ms": _distribution_ms([record.e2el_s for record in done]),
    }
