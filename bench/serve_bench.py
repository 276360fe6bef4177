"""`python -m bench serve`: the serving metrics against any OpenAI-compatible streaming endpoint.

Point it at Zeus through nginx, at one instance, or at a peer server (vLLM, llama.cpp). Each
concurrency level runs `--num-prompts` chat completions with `stream: true`,
`stream_options.include_usage` (token counts from the server) and `ignore_eos` (fixed output
length), either all at once (closed loop, at most `concurrency` in flight) or arriving as a
Poisson process at `--request-rate` requests/s (still capped at `concurrency` in flight).

`--workload chat` is the multi-turn chat workload instead: `--users` U analysts each hold one
conversation of `--turns` T turns behind the same system prompt of `--system-prompt-len` tokens
(a deployment's default system prompt), each turn resending the whole history (system prompt,
every earlier question and reply, the new question), as a chat client does. The users run at
once, each turn after the previous reply (and, with `--think-time S`, a pause drawn from an
exponential distribution of mean S seconds, seeded per user: people read the reply and type, so
turns of different conversations do not go out in lockstep). It reports the usual metrics over
all turns, TTFT p50 by turn (what prefix caching changes: later turns resend ever longer
histories), the share of turns the balancer sent to the instance of the conversation's previous
turn (from the X-Zeus-Instance header), and, with
`--metrics-urls` (the instances' /metrics), the prefix-cache hit rate over the run from vLLM's
`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` counters (tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import random
import time
import uuid
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
    parser.add_argument(
        "--workload", choices=("single", "chat"), default="single", help="single-turn prompts or chat"
    )
    parser.add_argument("--users", type=int, default=4, help="chat: conversations held at once")
    parser.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    parser.add_argument("--system-prompt-len", type=int, default=400, help="chat: system prompt tokens")
    parser.add_argument(
        "--think-time", type=float, default=0.0, help="chat: mean seconds between a reply and the next turn"
    )
    parser.add_argument(
        "--api-keys",
        default=None,
        help="chat: comma-separated keys, one per user in turn (default: --api-key for all)",
    )
    parser.add_argument(
        "--metrics-urls",
        default=None,
        help="chat: comma-separated /metrics URLs of the instances, for the prefix-cache hit rate",
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _discover_model(client: Any, arguments: argparse.Namespace) -> str:
    models_path = arguments.endpoint.rsplit("/chat/completions", 1)[0] + "/models"
    response = await client.get(models_path, headers=_headers(arguments.api_key))
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _one_request(
    client: Any,
    arguments: argparse.Namespace,
    model: str,
    prompt: str | list[dict[str, str]],
    *,
    api_key: str | None = None,
    user: str | None = None,
) -> RequestRecord:
    """One streamed chat completion: `prompt` is the user's message, or the whole message list."""
    import httpx

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": arguments.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if user is not None:
        body["user"] = user
    record = RequestRecord(sent_at=time.perf_counter())
    chunks = 0
    texts: list[str] = []
    try:
        async with client.stream(
            "POST", arguments.endpoint, json=body, headers=_headers(api_key or arguments.api_key)
        ) as response:
            record.instance = response.headers.get("x-zeus-instance")
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
                if choices and (content := (choices[0].get("delta") or {}).get("content")):
                    record.chunk_times.append(time.perf_counter())
                    texts.append(content)
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
    record.text = "".join(texts)
    return record


# Counters read from the instances' /metrics before and after a chat run (summed over instances):
# the prefix cache (tokens) and vLLM's TTFT histogram, whose mean is the time from the engine's
# arrival to the first token (vLLM: after the server rendered and tokenized the prompt; Zeus: from
# its submit, after authentication and admission). Client TTFT minus it is the serving layer's.
SCRAPED = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
)


async def _scrape(client: Any, urls: list[str]) -> dict[str, float]:
    """SCRAPED's series summed over the instances (labels ignored); absent ones are left out."""
    totals: dict[str, float] = {}
    for url in urls:
        response = await client.get(url)
        response.raise_for_status()
        for line in response.text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in SCRAPED:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


async def _scrape_prefix_cache(client: Any, urls: list[str]) -> tuple[float, float] | None:
    """(hits, queries) in tokens, summed over the instances; None when no instance reports them."""
    totals = await _scrape(client, urls)
    if "vllm:prefix_cache_queries_total" not in totals:
        return None
    return totals.get("vllm:prefix_cache_hits_total", 0.0), totals["vllm:prefix_cache_queries_total"]


def _delta_ratio(
    before: dict[str, float], after: dict[str, float], numerator: str, denominator: str
) -> float | None:
    """(after - before) of numerator over that of denominator; None when one is missing or unchanged."""
    if not all(name in series for name in (numerator, denominator) for series in (before, after)):
        return None
    change = after[denominator] - before[denominator]
    return (after[numerator] - before[numerator]) / change if change > 0 else None


async def _run_chat(
    client: Any, arguments: argparse.Namespace, model: str, tokenizer: Any, progress: Any
) -> dict[str, Any]:
    """U conversations at once, T turns each, every turn resending the history; one result row."""
    keys = [key for key in (arguments.api_keys or "").split(",") if key] or [arguments.api_key]
    metrics_urls = [url for url in (arguments.metrics_urls or "").split(",") if url]
    [system_prompt] = make_prompts(1, arguments.system_prompt_len, arguments.seed + 1, tokenizer)
    system_prompt = "You are the research assistant of a team of analysts. " + system_prompt
    questions = make_prompts(
        arguments.users * arguments.turns, arguments.input_len, arguments.seed, tokenizer
    )
    by_turn: list[list[RequestRecord]] = [[] for _ in range(arguments.turns)]
    before = await _scrape(client, metrics_urls) if metrics_urls else {}

    # The OpenAI `user` field of each simulated user: an opaque id, as clients send (a UUID or a
    # hashed account), drawn from the run's seed.
    names = random.Random(arguments.seed)
    user_ids = [
        f"bench-{uuid.UUID(int=names.getrandbits(128), version=4).hex}" for _ in range(arguments.users)
    ]

    async def conversation(user: int) -> list[RequestRecord]:
        messages = [{"role": "system", "content": system_prompt}]
        records = []
        pauses = random.Random(arguments.seed * 1000 + user)
        for turn in range(arguments.turns):
            if turn and arguments.think_time > 0:
                await asyncio.sleep(pauses.expovariate(1 / arguments.think_time))
            messages.append({"role": "user", "content": questions[user * arguments.turns + turn]})
            record = await _one_request(
                client, arguments, model, list(messages), api_key=keys[user % len(keys)], user=user_ids[user]
            )
            progress.update(1)
            records.append(record)
            by_turn[turn].append(record)
            if not record.succeeded:
                break  # the conversation cannot go on without the reply
            messages.append({"role": "assistant", "content": record.text})
        return records

    started = time.perf_counter()
    per_user = await asyncio.gather(*(conversation(user) for user in range(arguments.users)))
    duration = time.perf_counter() - started
    after = await _scrape(client, metrics_urls) if metrics_urls else {}
    slos = parse_slos(arguments.goodput)
    every = [record for records in per_user for record in records]
    metrics = summarize(every, duration, slos)
    metrics["ttft_p50_ms_by_turn"] = [
        summarize(records, duration, slos)["ttft_ms"]["median"] if records else None for records in by_turn
    ]
    # The mean prompt each turn sent: it grows with the history that every turn resends.
    metrics["prompt_tokens_by_turn"] = [
        sum(record.prompt_tokens for record in records) / len(records) if records else None
        for records in by_turn
    ]
    # Turns 2..T that the balancer sent to the instance that served the conversation's turn before
    # (where its history is cached); None when the server names no instance.
    followed = [
        (earlier.instance, later.instance)
        for records in per_user
        for earlier, later in itertools.pairwise(records)
        if earlier.instance and later.instance
    ]
    metrics["same_instance_share"] = (
        sum(earlier == later for earlier, later in followed) / len(followed) if followed else None
    )
    # Requests per instance: consistent hashing splits a few users unevenly (each instance's cache
    # then holds a different number of conversations), which explains a hit rate.
    served = collections.Counter(record.instance for record in every if record.instance)
    metrics["requests_by_instance"] = dict(sorted(served.items()))
    metrics["prefix_cache_hit_rate"] = _delta_ratio(
        before, after, "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
    )
    server_ttft_s = _delta_ratio(
        before, after, "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count"
    )
    metrics["server_ttft_mean_ms"] = None if server_ttft_s is None else server_ttft_s * 1000
    return {"system": "chat", "concurrency": arguments.users, "request_rate": None, "metrics": metrics}


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
        total = (
            arguments.users * arguments.turns
            if arguments.workload == "chat"
            else sum(prompts_for(level) for level in levels)
        )
        progress = tqdm(total=total, unit="req", disable=arguments.no_progress)
        try:
            if arguments.workload == "chat":
                progress.set_description(f"chat U={arguments.users} T={arguments.turns}")
                rows.append(await _run_chat(client, arguments, model, tokenizer, progress))
                levels = []
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
    if arguments.workload == "chat":
        rate = (
            f"chat: {arguments.users} users x {arguments.turns} turns, "
            f"system prompt {arguments.system_prompt_len}"
        )
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
            f"{row['system']} c={row['concurrency']}: output {metrics['output_throughput']:.1f} tok/s, "
            f"total {metrics['total_token_throughput']:.1f} tok/s, {extra}, failures {failures}"
        )
        if "ttft_p50_ms_by_turn" in metrics:
            turns = ", ".join(
                "-" if value is None else f"{value:.0f}" for value in metrics["ttft_p50_ms_by_turn"]
            )
            print(f"chat TTFT p50 by turn (ms): {turns}")
            rate = metrics["prefix_cache_hit_rate"]
            print("prefix-cache hit rate: " + ("not reported" if rate is None else f"{rate:.1%}"))
            server = metrics["server_ttft_mean_ms"]
            if server is not None:
                client_mean = metrics["ttft_ms"]["mean"]
                print(
                    f"TTFT mean {client_mean:.0f} ms at the client, {server:.0f} ms in the engine "
                    f"(arrival to first token): {client_mean - server:.0f} ms in the serving layer"
                )
    json_path, plot_path = write_outputs("serve", record, arguments.copy_plot_to)
    print(f"wrote {json_path} and {plot_path}")
    return 0 if all(row["metrics"]["failed"] == 0 for row in record["results"]) else 1
