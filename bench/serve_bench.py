"""`python -m bench serve`: the serving metrics against any OpenAI-compatible streaming endpoint.

Point it at Zeus through nginx, at one instance, or at a peer server (vLLM, llama.cpp). Each
concurrency level runs `--num-prompts` chat completions with `stream: true`,
`stream_options.include_usage` (token counts from the server) and `ignore_eos` (fixed output
length), either all at once (closed loop, at most `concurrency` in flight) or arriving as a
Poisson process at `--request-rate` requests/s (still capped at `concurrency` in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from bench.metrics import RequestRecord, parse_slos, summarize
from bench.report import format_table, markdown_table, write_outputs
from bench.workload import make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--endpoint", default="/api/v1/chat/completions")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET .../v1/models)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="requests per level (default: 4 x level)"
    )
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (exact with --tokenizer)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="model folder whose tokenizer sizes prompts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument(
        "--goodput", nargs="*", default=["ttft:1000", "tpot:200"], help="SLOs, e.g. ttft:1000"
    )
    parser.add_argument("--copy-plot-to", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _discover_model(client: Any, arguments: argparse.Namespace) -> str:
    models_path = arguments.endpoint.rsplit("/chat/completions", 1)[0] + "/models"
    response = await client.get(models_path, headers=_headers(arguments.api_key))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _one_request(client: Any, arguments: argparse.Namespace, model: str, prompt: str) -> RequestRecord:
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": arguments.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    record = RequestRecord(sent_at=time.perf_counter())
    chunks = 0
    try:
        async with client.stream(
            "POST", arguments.endpoint, json=body, headers=_headers(arguments.api_key)
        ) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"http_{response.status_code}"
                return record
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if event.get("error"):
                    record.error = "stream_error"
                    return record
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    record.chunk_times.append(time.perf_counter())
                    chunks += 1
                usage = event.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens", 0)
                    record.output_tokens = usage.get("completion_tokens", 0)
            record.finished_at = time.perf_counter()
            if not done:
                record.error = "incomplete_stream"
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.TransportError:
        record.error = "connection"
    except ValueError:
        record.error = "bad_json"
    if record.output_tokens == 0:
        # A server without usage reporting: one token per content chunk is the best estimate.
        record.output_tokens = chunks
    return record


async def _run_level(
    client: Any,
    arguments: argparse.Namespace,
    model: str,
    prompts: list[str],
    concurrency: int,
    progress: Any,
) -> tuple[list[RequestRecord], float]:
    slots = asyncio.Semaphore(concurrency)
    arrivals = random.Random(arguments.seed)

    async def limited(prompt: str) -> RequestRecord:
        async with slots:
            record = await _one_request(client, arguments, model, prompt)
            progress.update(1)
            return record

    started = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(limited(prompt)))
        if arguments.request_rate != float("inf"):
            await asyncio.sleep(arrivals.expovariate(arguments.request_rate))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - started


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    levels = [int(level) for level in arguments.concurrency.split(",") if level.strip()]
    slos = parse_slos(arguments.goodput)
    tokenizer = None
    if arguments.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(arguments.tokenizer, local_files_only=True)

    def prompts_for(level: int) -> int:
        return arguments.num_prompts or 4 * level

    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    timeout = httpx.Timeout(arguments.timeout, connect=10.0)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=arguments.base_url, limits=limits, timeout=timeout) as client:
        model = arguments.model or await _discover_model(client, arguments)
        progress = tqdm(
            total=sum(prompts_for(level) for level in levels), unit="req", disable=arguments.no_progress
        )
        try:
            for level in levels:
                progress.set_description(f"c={level}")
                prompts = make_prompts(prompts_for(level), arguments.input_len, arguments.seed, tokenizer)
                records, duration = await _run_level(client, arguments, model, prompts, level, progress)
                rows.append(
                    {
                        "system": "server",
                        "concurrency": level,
                        "request_rate": arguments.request_rate,
                        "metrics": summarize(records, duration, slos),
                    }
                )
        finally:
            progress.close()
    rate = "closed loop" if arguments.request_rate == float("inf") else f"Poisson {arguments.request_rate}/s"
    return {
        "mode": "serve",
        "title": f"{model} at {arguments.base_url} ({rate}), "
        f"{arguments.input_len} in / {arguments.output_len} out",
        "settings": {
            key: str(value) for key, value in vars(arguments).items() if key not in ("handler", "api_key")
        },
        "model": model,
        "results": rows,
    }


def main(arguments: argparse.Namespace) -> int:
    record = asyncio.run(run(arguments))
    print()
    print(format_table(record["results"]))
    print()
    print(markdown_table(record["results"]))
    for row in record["results"]:
        metrics = row["metrics"]
        extra = f"goodput {metrics['goodput']:.2f} req/s" if metrics["goodput"] is not None else ""
        failures = ", ".join(f"{kind}: {count}" for kind, count in metrics["failures"].items()) or "none"
        print(
            f"c={row['concurrency']}: total {metrics['total_token_throughput']:.1f} tok/s, {extra}, "
            f"failures {failures}"
        )
    json_path, plot_path = write_outputs("serve", record, arguments.copy_plot_to)
    print(f"wrote {json_path} and {plot_path}")
    return 0 if all(row["metrics"]["failed"] == 0 for row in record["results"]) else 1
