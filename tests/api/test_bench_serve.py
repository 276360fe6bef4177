"""`python -m bench serve` against a running Zeus: the single-turn levels and the chat workload."""

from __future__ import annotations

import argparse

from bench import serve_bench
from tests.api.conftest import Zeus


def bench_arguments(zeus: Zeus, api_key: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_bench.add_arguments(parser)
    return parser.parse_args(
        ["--base-url", zeus.base_url, "--api-key", api_key, "--input-len", "8", "--output-len", "4",
         "--no-progress", "--timeout", "120", *extra]
    )  # fmt: skip


async def test_chat_workload_resends_the_growing_history_each_turn(zeus: Zeus) -> None:
    member = zeus.member()
    arguments = bench_arguments(
        zeus, member.api_key, "--workload", "chat", "--users", "2", "--turns", "3",
        "--system-prompt-len", "24", "--metrics-urls", f"{zeus.base_url}/metrics",
    )  # fmt: skip
    record = await serve_bench.run(arguments)

    [row] = record["results"]
    metrics = row["metrics"]
    assert (row["system"], row["concurrency"]) == ("chat", 2)
    assert (metrics["completed"], metrics["failed"]) == (6, 0)
    assert metrics["output_tokens"] == 6 * 4  # ignore_eos: every reply is exactly --output-len
    by_turn = metrics["prompt_tokens_by_turn"]
    # Each turn resends the system prompt, every earlier question and reply, and a new question.
    assert by_turn[0] > 24 and by_turn[0] < by_turn[1] < by_turn[2], by_turn
    assert len(metrics["ttft_p50_ms_by_turn"]) == 3 and all(v > 0 for v in metrics["ttft_p50_ms_by_turn"])
    # The built-in engine has no prefix cache: its /metrics carry no vLLM prefix-cache counters.
    assert metrics["prefix_cache_hit_rate"] is None
    # One instance answered every turn, and named itself (X-Zeus-Instance).
    assert metrics["same_instance_share"] == 1.0
    assert list(metrics["requests_by_instance"].values()) == [6], metrics["requests_by_instance"]


async def test_single_turn_levels(zeus: Zeus) -> None:
    member = zeus.member()
    record = await serve_bench.run(bench_arguments(zeus, member.api_key, "--concurrency", "1,2"))

    assert [row["concurrency"] for row in record["results"]] == [1, 2]
    for row in record["results"]:
        assert row["metrics"]["failed"] == 0
        assert row["metrics"]["output_tokens"] == row["metrics"]["completed"] * 4
