"""`python -m bench engine`: the naive design (one model.generate at a time) against the engine, in process.

The same workload runs through both at each concurrency level: `concurrency` clients in a closed
loop, fixed prompt and output lengths (ignore_eos for the engine, min_new_tokens for generate, so
both do exactly the same work), greedy decoding, a fixed seed. The naive design serves requests
strictly one after another, like the original one-request-per-instance guide; its clients queue.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.metrics import RequestRecord, parse_slos, summarize
from bench.report import format_table, markdown_table, write_outputs
from bench.workload import make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    parser.add_argument(
        "--naive-concurrency",
        default=None,
        help="levels for the naive design (default: the same; 'none' skips it)",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per level (default: engine max(4, 2 x concurrency), naive max(4, concurrency))",
    )
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="engine sampling temperature (0: greedy; the chat page's defaults are 0.7 with --top-p 0.95)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="engine nucleus sampling threshold")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--goodput", nargs="*", default=["ttft:1000", "tpot:200"], help="SLOs, e.g. ttft:1000"
    )
    parser.add_argument("--copy-plot-to", type=Path, default=None, help="also copy the PNG here (docs/...)")
    parser.add_argument("--no-progress", action="store_true")


def _levels(text: str) -> list[int]:
    return [int(level) for level in text.split(",") if level.strip()]


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="req", disable=not enabled, dynamic_ncols=True)

    def describe(self, text: str) -> None:
        self._bar.set_description(text)

    def advance(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


async def _closed_loop(
    prompts: list[str],
    concurrency: int,
    progress: _Progress,
    send: Callable[[str, RequestRecord], Awaitable[None]],
) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending its next prompt when its previous request has finished."""
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> RequestRecord:
        async with slots:
            record = RequestRecord(sent_at=time.perf_counter())
            try:
                await send(prompt, record)
            except Exception as error:
                record.error = type(error).__name__
            progress.advance()
            return record

    started = time.perf_counter()
    records = await asyncio.gather(*(one(prompt) for prompt in prompts))
    return list(records), time.perf_counter() - started


async def _run_engine_level(
    engine: Any,
    prompts: list[str],
    output_len: int,
    concurrency: int,
    progress: _Progress,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[RequestRecord], float]:
    from app.inference import GenerationRequest, SamplingParams, TextDelta

    params = SamplingParams(max_tokens=output_len, temperature=temperature, top_p=top_p, ignore_eos=True)

    async def send(prompt: str, record: RequestRecord) -> None:
        async for item in engine.submit(GenerationRequest(prompt=prompt, params=params)):
            now = time.perf_counter()
            if isinstance(item, TextDelta):
                record.chunk_times.append(now)
            else:
                record.finished_at = now
                record.prompt_tokens = item.prompt_tokens
                record.output_tokens = item.completion_tokens
                if item.finish_reason not in ("length", "stop"):
                    record.error = item.finish_reason

    return await _closed_loop(prompts, concurrency, progress, send)


class _TimingStreamer:
    """A generate() streamer that timestamps every new token (the first put() is the prompt)."""

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._record.chunk_times.append(time.perf_counter())

    def end(self) -> None:
        self._record.finished_at = time.perf_counter()


def _generate_one(
    model: Any, prompt_ids: list[int], output_len: int, record: RequestRecord, threads: int
) -> None:
    import torch

    # The baseline runs as plain transformers would: all of torch's threads for its own products.
    torch.set_num_threads(threads)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            streamer=_TimingStreamer(record),
        )
    record.prompt_tokens = len(prompt_ids)
    record.output_tokens = output.shape[1] - len(prompt_ids)


async def _run_naive_level(
    engine: Any, prompts: list[str], output_len: int, concurrency: int, progress: _Progress, threads: int
) -> tuple[list[RequestRecord], float]:
    from app.inference import GenerationRequest

    one_at_a_time = asyncio.Lock()

    async def send(prompt: str, record: RequestRecord) -> None:
        prompt_ids = engine.render(GenerationRequest(prompt=prompt))
        async with one_at_a_time:
            await asyncio.to_thread(_generate_one, engine.model, prompt_ids, output_len, record, threads)

    return await _closed_loop(prompts, concurrency, progress, send)


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    from app.inference import EngineConfig, GenerationRequest, InferenceEngine, SamplingParams

    levels = _levels(arguments.concurrency)
    if arguments.naive_concurrency == "none":
        naive_levels: list[int] = []
    else:
        naive_levels = _levels(arguments.naive_concurrency) if arguments.naive_concurrency else levels
    slos = parse_slos(arguments.goodput)

    def prompts_for(level: int) -> int:
        return arguments.num_prompts or max(4, 2 * level)

    def naive_prompts_for(level: int) -> int:
        # The naive design serves one request at a time: one request per client shows its queueing,
        # and more would only repeat its (flat) throughput at great cost in time.
        return arguments.num_prompts or max(4, level)

    import torch

    torch_threads = arguments.threads or torch.get_num_threads()
    engine = InferenceEngine.load(
        EngineConfig(
            model_path=arguments.model,
            device=arguments.device,
            dtype=arguments.dtype,
            torch_threads=arguments.threads,
            max_batch_size=max(levels),
            max_queue=max(prompts_for(level) for level in levels),
            max_input_tokens=max(4096, arguments.input_len),
            max_new_tokens=max(1024, arguments.output_len),
        )
    )
    await engine.start()
    print(
        f"model {arguments.model} on {engine.device} ({engine.dtype}), "
        f"torch threads {torch_threads}, "
        f"input {arguments.input_len} / output {arguments.output_len} tokens, seed {arguments.seed}, "
        f"engine temperature {arguments.temperature}, top_p {arguments.top_p}",
        flush=True,
    )
    # Warm up both paths (first calls pay for allocator and kernel set-up).
    warm_prompts = make_prompts(max(levels), arguments.input_len, arguments.seed + 1, engine.tokenizer)
    warm = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    await asyncio.gather(
        *(engine.submit(GenerationRequest(prompt=p, params=warm)).result() for p in warm_prompts)
    )
    if naive_levels:
        warm_ids = engine.render(GenerationRequest(prompt=warm_prompts[0]))
        await asyncio.to_thread(
            _generate_one, engine.model, warm_ids, 8, RequestRecord(sent_at=0.0), torch_threads
        )

    total = sum(map(prompts_for, levels)) + sum(map(naive_prompts_for, naive_levels))
    progress = _Progress(total, enabled=not arguments.no_progress)
    rows: list[dict[str, Any]] = []
    try:
        for system, system_levels, count in (
            ("naive", naive_levels, naive_prompts_for),
            ("engine", levels, prompts_for),
        ):
            for level in system_levels:
                progress.describe(f"{system} c={level}")
                prompts = make_prompts(count(level), arguments.input_len, arguments.seed, engine.tokenizer)
                if system == "naive":
                    records, duration = await _run_naive_level(
                        engine, prompts, arguments.output_len, level, progress, torch_threads
                    )
                else:
                    records, duration = await _run_engine_level(
                        engine,
                        prompts,
                        arguments.output_len,
                        level,
                        progress,
                        temperature=arguments.temperature,
                        top_p=arguments.top_p,
                    )
                rows.append(
                    {"system": system, "concurrency": level, "metrics": summarize(records, duration, slos)}
                )
    finally:
        progress.close()
        await engine.shutdown(timeout_s=5)

    return {
        "mode": "engine",
        "title": f"{engine.model_name} on {engine.device} ({engine.dtype}), "
        f"{arguments.input_len} in / {arguments.output_len} out",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": _cpu_count(),
            "torch_threads": torch_threads,
            "engine_matmuls": "OpenBLAS (numpy)" if engine.uses_openblas else "torch",
        },
        "settings": {key: value for key, value in vars(arguments).items() if key != "handler"},
        "model": engine.model_name,
        "device": engine.device,
        "dtype": engine.dtype,
        "results": rows,
        "ratios": target_ratios(rows),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def target_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The issue's three targets, from one run (None when a needed level was not measured)."""

    def find(system: str, level: int) -> dict[str, Any] | None:
        return next(
            (row["metrics"] for row in rows if row["system"] == system and row["concurrency"] == level), None
        )

    engine_1, engine_8, naive_1 = find("engine", 1), find("engine", 8), find("naive", 1)
    naive_8 = find("naive", 8) or naive_1
    ratios: dict[str, float | None] = {
        "engine_c8_vs_naive_output_throughput": None,
        "engine_c1_vs_generate_decode_speed": None,
        "engine_tpot_p50_c8_vs_c1": None,
    }
    if engine_8 and naive_8:
        ratios["engine_c8_vs_naive_output_throughput"] = (
            engine_8["output_throughput"] / naive_8["output_throughput"]
        )
    if engine_1 and naive_1:
        # Decode speed = 1 / TPOT: the naive design at concurrency 1 is plain generate().
        ratios["engine_c1_vs_generate_decode_speed"] = (
            naive_1["tpot_ms"]["median"] / engine_1["tpot_ms"]["median"]
        )
    if engine_1 and engine_8:
        ratios["engine_tpot_p50_c8_vs_c1"] = engine_8["tpot_ms"]["median"] / engine_1["tpot_ms"]["median"]
    return ratios


def main(arguments: argparse.Namespace) -> int:
    record = asyncio.run(run(arguments))
    print()
    print(format_table(record["results"]))
    print()
    print(markdown_table(record["results"]))
    print()
    targets = {
        "engine_c8_vs_naive_output_throughput": ">= 5",
        "engine_c1_vs_generate_decode_speed": ">= 0.9",
        "engine_tpot_p50_c8_vs_c1": "<= 2.5",
    }
    for name, value in record["ratios"].items():
        shown = "not measured" if value is None else f"{value:.2f}"
        print(f"{name}: {shown} (target {targets[name]})")
    json_path, plot_path = write_outputs("engine", record, arguments.copy_plot_to)
    print(f"wrote {json_path} and {plot_path}")
    return 0
