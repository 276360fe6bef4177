"""`python -m bench affinity`'s verdict and plot, from a record of the shape its runs write (the
runs themselves need two vLLM instances and take minutes: docs/performance.md has their output)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import affinity


def record(affinity_hit: float | None, least_conn_hit: float | None) -> dict[str, Any]:
    def row(mode: str, hit: float | None, ttft: list[float]) -> dict[str, Any]:
        return {
            "mode": mode,
            "system": f"nginx {mode}/chat",
            "metrics": {"prefix_cache_hit_rate": hit, "ttft_p50_ms_by_turn": ttft},
        }

    return {
        "title": "nginx balancing and the prefix cache, 2 x tiny",
        "results": [
            row("affinity", affinity_hit, [900.0, 300.0, 320.0]),
            row("least_conn", least_conn_hit, [880.0, 700.0, 1200.0]),
        ],
    }


def test_the_verdict_compares_the_ratio_with_the_floor() -> None:
    assert affinity.ratio_line(record(0.87, 0.58)["results"]) == (
        "prefix-cache hit rate, affinity / least_conn: 87.0% / 58.0% = 1.50x (meets the floor 1.5x)"
    )
    assert "= 1.25x (MISSES the floor 1.5x)" in affinity.ratio_line(record(0.80, 0.64)["results"])
    # A mode whose instances exported no prefix-cache counters (the built-in engine) has no ratio.
    assert affinity.ratio_line(record(0.80, None)["results"]) is None


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "affinity.png"
    run = record(0.87, 0.58)
    affinity.plot(run["results"], path, run["title"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # two panels drawn, not an empty canvas
