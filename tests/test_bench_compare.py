"""`python -m bench compare`'s floor lines, from rows of the shape its runs write."""

from __future__ import annotations

from typing import Any

from bench import compare


def row(server: str, tok_s: float, ttft_ms: float) -> dict[str, Any]:
    return {
        "server": server,
        "system": f"{server}/server",
        "concurrency": 8,
        "metrics": {"output_throughput": tok_s, "ttft_ms": {"median": ttft_ms}},
    }


def test_alternating_runs_are_compared_pair_by_pair() -> None:
    # The machine drifted between the pairs: each Zeus run is compared with the bare vLLM run just
    # before it, not with the first one.
    rows = [row("vllm-serve", 100, 1000), row("zeus-vllm", 120, 990), row("vllm-serve", 160, 900),
            row("zeus-vllm", 152, 950)]  # fmt: skip
    assert compare._ratios(rows) == [
        "server c=8: zeus-vllm / vllm-serve output tok/s 1.20x (floor 0.95x), TTFT p50 990 vs 1000 ms "
        "(-10 ms; allowed +120)",
        "server c=8: zeus-vllm / vllm-serve output tok/s 0.95x (floor 0.95x), TTFT p50 950 vs 900 ms "
        "(+50 ms; allowed +110)",
    ]


def test_zeus_run_first_is_compared_with_the_bare_run_after_it() -> None:
    rows = [row("zeus-vllm", 90, 500), row("vllm-serve", 100, 400)]
    [line] = compare._ratios(rows)
    assert "0.90x" in line and "500 vs 400 ms (+100 ms; allowed +60)" in line
    assert compare._ratios([row("zeus-vllm", 90, 500)]) == []
