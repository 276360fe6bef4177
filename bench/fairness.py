"""`python -m bench fairness`: one heavy user against one light user on the same deployment.

Issue 16's floor: while user A keeps `--a-streams` streams open (each A client sends its next
request as soon as one ends, and honours Retry-After when refused), user B's requests, one at a
time, are never refused, and B's TTFT p50 stays within `--max-ttft-ratio` (2x) of B's TTFT on the
idle deployment, measured first in the same run. Point it at nginx in front of the instances
(or at one instance) with API keys of two different users, or let it start the deployment on this
machine: `--instances N --model PATH --database-url URL` starts N instances of engine builtin
(bench/compare.py's settings, `--threads` torch threads each) behind a real nginx rendered from
the nginx role's templates with its defaults (`--balancing`: affinity, as deployed), creates the
two users and their keys in that (migrated here) database, and stops it all at the end.

Prints one table and PASS/FAIL per condition, writes JSON to bench/results/; exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.metrics import RequestRecord, percentile
from bench.report import RESULTS_DIR
from bench.workload import make_prompts

RETRY_AFTER_CAP_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="e.g. http://127.0.0.1:8081 (nginx); or --instances")
    parser.add_argument("--endpoint", default="/api/v1/chat/completions")
    parser.add_argument("--api-key-a", help="the heavy user's key")
    parser.add_argument("--api-key-b", help="the light user's key (another user)")
    parser.add_argument(
        "--model", default=None, help="default: the first of GET .../v1/models; with --instances: the folder"
    )
    parser.add_argument("--instances", type=int, default=0, help="start this many instances and nginx here")
    parser.add_argument(
        "--database-url", default=os.environ.get("ZEUS_DATABASE_URL"), help="with --instances"
    )
    parser.add_argument("--threads", type=int, default=1, help="with --instances: torch threads each")
    parser.add_argument("--max-batch-size", type=int, default=8, help="with --instances: ZEUS_MAX_BATCH_SIZE")
    parser.add_argument("--balancing", default="affinity", help="with --instances: nginx_balancing")
    parser.add_argument("--a-streams", type=int, default=100, help="streams A keeps open")
    parser.add_argument("--a-output-len", type=int, default=256)
    parser.add_argument("--b-requests", type=int, default=30, help="B's sequential requests per phase")
    parser.add_argument("--b-output-len", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64, help="prompt length (words-based)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of A's load before B starts")
    parser.add_argument("--max-ttft-ratio", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }


async def _stream(
    client: Any, endpoint: str, key: str, body: dict[str, Any]
) -> tuple[RequestRecord, float | None]:
    """One streamed completion: its record (error "http_429" etc.) and Retry-After when refused."""
    import httpx

    record = RequestRecord(sent_at=time.perf_counter())
    retry_after: float | None = None
    try:
        async with client.stream("POST", endpoint, json=body, headers=_headers(key)) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"http_{response.status_code}"
                header = response.headers.get("retry-after")
                retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
                return record, retry_after
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    record.finished_at = time.perf_counter()
                    break
                event = json.loads(payload)
                if event.get("error"):
                    record.error = "stream_error"
                    break
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    record.chunk_times.append(time.perf_counter())
                    record.output_tokens += 1
            if record.finished_at is None and record.error is None:
                record.error = "incomplete_stream"
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.TransportError:
        record.error = "connection"
    return record, retry_after


async def _b_phase(
    client: Any, arguments: argparse.Namespace, model: str, prompts: list[str], label: str = ""
) -> list[RequestRecord]:
    records = []
    for prompt in prompts:
        record, _ = await _stream(
            client, arguments.endpoint, arguments.api_key_b, _body(model, prompt, arguments.b_output_len)
        )
        records.append(record)
        if label:
            ttft = f"{record.ttft_s * 1000:.0f} ms" if record.succeeded else record.error
            print(f"{label} {len(records)}/{len(prompts)}: TTFT {ttft}", file=sys.stderr, flush=True)
    return records


class HeavyUser:
    """A's clients: each keeps one request in flight, retrying refusals after Retry-After."""

    def __init__(self, client: Any, arguments: argparse.Namespace, model: str, prompt: str) -> None:
        self.client, self.arguments, self.model, self.prompt = client, arguments, model, prompt
        self.outcomes: Counter[str] = Counter()
        self.tokens = 0
        self.open_streams = 0
        self.max_open = 0
        self.stopping = False

    async def client_loop(self) -> None:
        body = _body(self.model, self.prompt, self.arguments.a_output_len)
        while not self.stopping:
            self.open_streams += 1
            self.max_open = max(self.max_open, self.open_streams)
            try:
                record, retry_after = await _stream(
                    self.client, self.arguments.endpoint, self.arguments.api_key_a, body
                )
            finally:
                self.open_streams -= 1
            self.outcomes[record.error or "ok"] += 1
            self.tokens += record.output_tokens
            if record.error:
                await asyncio.sleep(min(retry_after or 1.0, RETRY_AFTER_CAP_S))


def _ttft_summary(records: list[RequestRecord]) -> dict[str, Any]:
    ok = [record for record in records if record.succeeded]
    ttfts = [record.ttft_s * 1000 for record in ok]
    return {
        "requests": len(records),
        "succeeded": len(ok),
        "refused_or_failed": dict(Counter(record.error for record in records if not record.succeeded)),
        "ttft_p50_ms": round(percentile(ttfts, 0.5), 1) if ttfts else None,
        "ttft_p90_ms": round(percentile(ttfts, 0.9), 1) if ttfts else None,
        "ttft_max_ms": round(max(ttfts), 1) if ttfts else None,
    }


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(
        max_connections=arguments.a_streams + 8, max_keepalive_connections=arguments.a_streams + 8
    )
    timeout = httpx.Timeout(arguments.timeout, connect=10.0)
    prompts = make_prompts(arguments.b_requests * 2 + 1, arguments.input_len, arguments.seed)
    async with (
        httpx.AsyncClient(base_url=arguments.base_url, limits=limits, timeout=timeout) as heavy_client,
        httpx.AsyncClient(base_url=arguments.base_url, timeout=timeout) as light_client,
    ):
        models_path = arguments.endpoint.rsplit("/chat/completions", 1)[0] + "/models"
        if arguments.model:
            model = arguments.model
        else:
            listed = await light_client.get(models_path, headers=_headers(arguments.api_key_b))
            listed.raise_for_status()
            model = listed.json()["data"][0]["id"]
        # One request first, so that neither phase pays a cold start.
        await _b_phase(light_client, arguments, model, prompts[:1])
        idle = await _b_phase(light_client, arguments, model, prompts[1 : 1 + arguments.b_requests], "B idle")

        heavy = HeavyUser(heavy_client, arguments, model, prompts[0])
        loops = [asyncio.create_task(heavy.client_loop()) for _ in range(arguments.a_streams)]
        await asyncio.sleep(arguments.warmup)
        loaded_started = time.perf_counter()
        tokens_before = heavy.tokens
        loaded = await _b_phase(
            light_client, arguments, model, prompts[1 + arguments.b_requests :], "B loaded"
        )
        loaded_s = time.perf_counter() - loaded_started
        a_tokens = heavy.tokens - tokens_before
        heavy.stopping = True
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    idle_summary, loaded_summary = _ttft_summary(idle), _ttft_summary(loaded)
    ratio = None
    if idle_summary["ttft_p50_ms"] and loaded_summary["ttft_p50_ms"]:
        ratio = round(loaded_summary["ttft_p50_ms"] / idle_summary["ttft_p50_ms"], 2)
    checks = {
        "b_never_refused": loaded_summary["succeeded"] == loaded_summary["requests"],
        "b_ttft_p50_within_ratio": ratio is not None and ratio <= arguments.max_ttft_ratio,
    }
    return {
        "mode": "fairness",
        "title": f"{model} at {arguments.base_url}: A keeps {arguments.a_streams} streams, B 1 at a time",
        "settings": {
            key: str(value)
            for key, value in vars(arguments).items()
            if key not in ("handler", "api_key_a", "api_key_b")
        },
        "model": model,
        "b_idle": idle_summary,
        "b_loaded": loaded_summary,
        "b_ttft_ratio": ratio,
        "a": {
            "client_loops": arguments.a_streams,
            "outcomes": dict(heavy.outcomes),
            "output_tokens_per_s_during_b": round(a_tokens / loaded_s, 1) if loaded_s else None,
        },
        "checks": checks,
    }


def _deploy(arguments: argparse.Namespace) -> tuple[Callable[[], None], str]:
    """Starts --instances instances and nginx, sets base_url and both keys; returns (stop, model name)."""
    from bench import compare
    from tests.deploy.nginx import start_nginx

    model = Path(arguments.model)
    settings = argparse.Namespace(
        model=model, database_url=arguments.database_url, max_batch_size=arguments.max_batch_size,
        max_model_len=2048, output_len=max(arguments.a_output_len, arguments.b_output_len),
        kv_cache_gb=2.0, enforce_eager=False, threads=arguments.threads, ready_timeout=600.0,
        max_concurrent_per_user=0,  # Zeus's own default: the limit under test
    )  # fmt: skip
    arguments.api_key_a, arguments.api_key_b = compare._api_key(settings), compare._api_key(settings)
    instances = compare.start_instances(settings, "zeus-builtin", arguments.instances, "fairness")
    prefix = tempfile.TemporaryDirectory(prefix="zeus-bench-nginx-")
    nginx = start_nginx(
        Path(prefix.name),
        nginx_upstream_servers=[address for _, address, _ in instances],
        nginx_balancing=arguments.balancing,
    )
    arguments.base_url = nginx.base_url

    def stop() -> None:
        nginx.stop()
        prefix.cleanup()
        for process, _, _ in instances:
            compare._stop(process)

    return stop, model.name


def main(arguments: argparse.Namespace) -> int:
    stop = None
    if arguments.instances:
        if not arguments.model or not arguments.database_url:
            raise SystemExit("--instances needs --model (a model folder) and --database-url")
        stop, arguments.model = _deploy(arguments)
    elif not (arguments.base_url and arguments.api_key_a and arguments.api_key_b):
        raise SystemExit(
            "give --base-url, --api-key-a and --api-key-b, or --instances N to start a deployment"
        )
    try:
        record = asyncio.run(run(arguments))
    finally:
        if stop is not None:
            stop()
    idle, loaded = record["b_idle"], record["b_loaded"]
    print()
    print(f"{'':24}{'requests':>9}{'ok':>5}{'TTFT p50 ms':>13}{'p90 ms':>9}{'max ms':>9}  refused/failed")
    for label, summary in (("B alone (idle)", idle), (f"B with A x{record['a']['client_loops']}", loaded)):
        print(
            f"{label:24}{summary['requests']:>9}{summary['succeeded']:>5}{summary['ttft_p50_ms']!s:>13}"
            f"{summary['ttft_p90_ms']!s:>9}{summary['ttft_max_ms']!s:>9}  "
            f"{summary['refused_or_failed'] or 'none'}"
        )
    print(
        f"A: {record['a']['outcomes']} (ok: finished streams; http_429: refusals, retried after "
        f"Retry-After), {record['a']['output_tokens_per_s_during_b']} output tokens/s while B ran"
    )
    print(f"B's TTFT p50 loaded / idle: {record['b_ttft_ratio']}x (floor: <= {arguments.max_ttft_ratio}x)")
    for name, passed in record["checks"].items():
        print(f"{'PASS' if passed else 'FAIL'} {name}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"fairness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {json_path}")
    return 0 if all(record["checks"].values()) else 1
