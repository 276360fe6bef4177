"""bench capacity: the level search, the sizing arithmetic and one real run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import capacity
from bench.__main__ import main as bench_main


@pytest.mark.parametrize(
    ("highest_passing", "maximum", "expected_probes"),
    [
        (5, 64, [1, 2, 4, 8, 6, 5]),
        (0, 64, [1]),
        (64, 64, [1, 2, 4, 8, 16, 32, 64]),
        (40, 48, [1, 2, 4, 8, 16, 32, 48, 40, 44, 42, 41]),
    ],
)
def test_search_finds_the_highest_passing_level(
    highest_passing: int, maximum: int, expected_probes: list[int]
) -> None:
    probes: list[int] = []

    def passes(level: int) -> bool:
        probes.append(level)
        return level <= highest_passing

    assert capacity.search_levels(maximum, passes) == highest_passing
    assert probes == expected_probes


def test_sizing_rounds_up_and_says_when_targets_cannot_be_met() -> None:
    rows = capacity.sizing([10, 25], capacity=4, active_fraction=0.5, instances_per_host=2)
    assert rows == [
        {"analysts": 10, "streams": 5, "instances": 2, "hosts": 1},
        {"analysts": 25, "streams": 13, "instances": 4, "hosts": 2},
    ]
    assert capacity.sizing([10], capacity=0, active_fraction=1, instances_per_host=2)[0]["instances"] is None


def test_bad_arguments_are_named(capsys: pytest.CaptureFixture[str], tiny_model_path: Path) -> None:
    code = bench_main(["capacity", "--model", str(tiny_model_path), "--attainment", "1.5"])
    assert code == 2
    assert "--attainment must be in (0, 1]; got 1.5" in capsys.readouterr().out


@pytest.mark.slow
def test_capacity_run_on_the_tiny_model(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(capacity, "RESULTS_DIR", tmp_path)
    # Generous targets: the tiny model meets them at every level on any machine.
    argv = ["capacity", "--model", str(tiny_model_path), "--max-concurrency", "4", "--input-len", "16"]
    argv += [
        "--output-len",
        "4",
        "--ttft-ms",
        "60000",
        "--tpot-ms",
        "60000",
        "--analysts",
        "9",
        "--no-progress",
    ]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "Capacity of one instance: **4 concurrent streams**" in out, out
    record = json.loads(next(tmp_path.glob("capacity-*.json")).read_text())
    assert [row["concurrency"] for row in record["results"]] == [1, 2, 4]
    assert all(row["passes"] and row["metrics"]["failed"] == 0 for row in record["results"])
    assert record["sizing"][0]["instances"] == 3  # ceil(9 / 4)
    assert record["memory"]["peak_rss_mib"] > record["memory"]["weights_in_memory_mib"] > 0
