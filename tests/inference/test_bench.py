"""The benchmark's metric definitions, and an end-to-end `python -m bench engine` on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.metrics import RequestRecord, parse_slos, percentile, summarize

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_metrics_follow_the_vllm_definitions() -> None:
    fast = RequestRecord(
        sent_at=0.0, chunk_times=[0.1, 0.2, 0.4], finished_at=0.5, prompt_tokens=10, output_tokens=5
    )
    slow = RequestRecord(
        sent_at=0.0, chunk_times=[2.0, 3.0], finished_at=3.0, prompt_tokens=10, output_tokens=2
    )
    failed = RequestRecord(sent_at=0.0, error="http_429")
    summary = summarize([fast, slow, failed], duration_s=4.0, slos=parse_slos(["ttft:1000", "tpot:200"]))

    assert fast.ttft_s == pytest.approx(0.1)
    assert fast.tpot_s == pytest.approx((0.5 - 0.1) / 4)
    assert fast.itls_s == pytest.approx([0.1, 0.2])
    assert summary["completed"] == 2
    assert summary["failures"] == {"http_429": 1}
    assert summary["output_throughput"] == pytest.approx(7 / 4.0)
    assert summary["total_token_throughput"] == pytest.approx(27 / 4.0)
    assert summary["request_throughput"] == pytest.approx(0.5)
    assert summary["goodput"] == pytest.approx(1 / 4.0)  # only `fast` meets both SLOs
    assert summary["ttft_ms"]["median"] == pytest.approx(1050.0)
    assert summary["itl_ms"]["p99"] == pytest.approx(percentile([100.0, 200.0, 1000.0], 0.99))
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)


def test_bench_engine_runs_end_to_end(tiny_model_path: Path, tmp_path: Path) -> None:
    plot_copy = tmp_path / "plot.png"
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench", "engine",
            "--model", str(tiny_model_path), "--dtype", "float32", "--threads", "1",
            "--concurrency", "1,2", "--num-prompts", "2", "--input-len", "8", "--output-len", "6",
            "--no-progress", "--copy-plot-to", str(plot_copy),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "engine_c1_vs_generate_decode_speed" in completed.stdout
    json_path = Path(completed.stdout.strip().splitlines()[-1].split()[1])
    record = json.loads(json_path.read_text())
    systems = {(row["system"], row["concurrency"]) for row in record["results"]}
    assert systems == {("naive", 1), ("naive", 2), ("engine", 1), ("engine", 2)}
    for row in record["results"]:
        assert row["metrics"]["completed"] == 2
        assert row["metrics"]["output_tokens"] == 12
    assert plot_copy.read_bytes().startswith(b"\x89PNG")
    json_path.unlink()
    json_path.with_suffix(".png").unlink()


@pytest.mark.slow
def test_gpu_check_runs_its_steps_on_the_cpu(tmp_path: Path) -> None:
    """The GPU check runs only where a GPU is lent, for minutes: its CPU dry run keeps it working."""
    output = tmp_path / "gpu-check.json"
    completed = subprocess.run(
        [
            sys.executable, "bench/gpu_check", "--cpu-dry-run", "--shapes", "SmolLM2-135M",
            "--variants", "graphs,graphs-serial", "--prompt-len", "8", "--output-len", "4",
            "--concurrency", "2", "--output", str(output),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    [row] = json.loads(output.read_text())["rows"]
    assert row["shape"] == "SmolLM2-135M"
    for variant in ("graphs", "graphs-serial"):
        assert row[variant]["batch1_decode_tok_s"] > 0 and row[variant]["concurrent_tok_s"] > 0
    for label in ("exact", "fused"):
        assert row[f"runner_{label}"]["decode_call_ms"] > 0, completed.stdout
        assert row[f"runner_{label}"]["overlapped_call_ms"] > 0, completed.stdout
    assert "| SmolLM2-135M | fused |" in completed.stdout
