"""`python -m bench capacity`: how many concurrent analysts one instance serves within latency targets,
and how many instances and hosts a given number of analysts needs.

One instance's engine runs in this process on this machine (as `bench engine` runs it), with the
web stack imported so the resident memory is an instance's. Concurrency levels 1, 2, 4, ... run
`concurrency` closed-loop clients (fixed prompt and output lengths, greedy, ignore_eos); a level
passes when no request failed and at least `--attainment` of the requests met both targets
(TTFT <= --ttft-ms and TPOT <= --tpot-ms: vLLM's goodput definition). Doubling stops at the first
level that fails; the levels between the last pass and that failure are then bisected. The highest
passing level is the instance's capacity C.

Sizing: N concurrent analysts (each with one reply streaming; `--active-fraction` scales N down
when only part of them generate at once) need ceil(N x fraction / C) instances; a host takes
min(CPUs // threads per instance, (RAM - reserve) // resident memory per instance) of them on a
CPU, or one per GPU with --gpus-per-host. The resident memory measured here, minus the weights in
memory (the model's size on disk, doubled when bf16/fp16 weights are held in fp32), is the engine's
per-instance overhead that roles/zeus_api's preflight uses (zeus_api_instance_overhead_mb).

Output: the levels table, the capacity, the memory figures and the sizing table, as text, as
Markdown (for docs/performance.md) and as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import _cpu_count, _levels, _Progress, _run_engine_level
from bench.metrics import RequestRecord, summarize
from bench.report import RESULTS_DIR
from bench.workload import make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument("--ttft-ms", type=float, default=1000.0, help="time-to-first-token target (ms)")
    parser.add_argument("--tpot-ms", type=float, default=100.0, help="time-per-output-token target (ms)")
    parser.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet both targets for a level to pass (0-1]",
    )
    parser.add_argument("--max-concurrency", type=int, default=64, help="highest level tried")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="requests per level (default: max(8, 2 x level))"
    )
    parser.add_argument(
        "--analysts", default="10,25,50,100,250", help="comma-separated counts of concurrent analysts to size"
    )
    parser.add_argument(
        "--active-fraction",
        type=float,
        default=1.0,
        help="share of those analysts with a reply streaming at the same moment (0-1]",
    )
    parser.add_argument(
        "--host-cpus", type=int, default=None, help="CPUs of a model host (default: this one's)"
    )
    parser.add_argument(
        "--host-memory-gib", type=float, default=None, help="RAM of a model host (default: this one's)"
    )
    parser.add_argument("--memory-reserve-gib", type=float, default=1.0, help="RAM kept for the OS")
    parser.add_argument(
        "--gpus-per-host", type=int, default=0, help="GPU hosts: one instance per GPU, this many per host"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the instance (default: every CPU)"
    )
    parser.add_argument("--no-progress", action="store_true")


def check_arguments(arguments: argparse.Namespace) -> None:
    """Raises ValueError naming the argument and what is allowed."""
    if not arguments.ttft_ms > 0 or not arguments.tpot_ms > 0:
        raise ValueError(
            f"--ttft-ms and --tpot-ms must be above 0; got {arguments.ttft_ms}, {arguments.tpot_ms}"
        )
    if not 0 < arguments.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1]; got {arguments.attainment}")
    if not 0 < arguments.active_fraction <= 1:
        raise ValueError(f"--active-fraction must be in (0, 1]; got {arguments.active_fraction}")
    if arguments.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1; got {arguments.max_concurrency}")
    if not _levels(arguments.analysts) or min(_levels(arguments.analysts)) < 1:
        raise ValueError(f"--analysts must list counts of at least 1; got {arguments.analysts!r}")


def attained(records: list[RequestRecord], ttft_ms: float, tpot_ms: float) -> float:
    """Share of all requests (failed ones count as missing) that met both targets."""
    if not records:
        return 0.0
    met = sum(
        1
        for record in records
        if record.succeeded and record.ttft_s * 1000 <= ttft_ms and (record.tpot_s or 0.0) * 1000 <= tpot_ms
    )
    return met / len(records)


def level_passes(metrics: dict[str, Any], attainment: float, needed: float) -> bool:
    return metrics["failed"] == 0 and attainment >= needed


def search_levels(max_concurrency: int, passes: Any) -> int:
    """Highest level in 1..max_concurrency for which `passes(level)` holds (0 if not even 1).

    Doubles from 1 until a level fails or the maximum is reached, then bisects between the last
    passing level and the failing one; assumes passing is monotone in the level.
    """
    best, failed = 0, None
    level = 1
    while level <= max_concurrency:
        if passes(level):
            best = level
            if level == max_concurrency:
                return best
            level = min(level * 2, max_concurrency)
        else:
            failed = level
            break
    if failed is None:
        return best
    low, high = best, failed
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def weights_in_memory_bytes(model_dir: Path, dtype: str) -> int:
    """The model's weight files on disk, doubled when 16-bit weights are held in fp32."""
    on_disk = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    stored = json.loads((model_dir / "config.json").read_text()).get("torch_dtype", "bfloat16")
    factor = 2 if "float32" in str(dtype) and stored in ("bfloat16", "float16") else 1
    return on_disk * factor


def sizing(
    analysts: list[int],
    capacity: int,
    active_fraction: float,
    instances_per_host: int,
) -> list[dict[str, int | None]]:
    """Instances and hosts for each analyst count (capacity: concurrent streams per instance).

    None where no count of instances meets the targets: one instance missed them even alone
    (capacity 0), or no instance fits a host.
    """
    rows: list[dict[str, int | None]] = []
    for count in analysts:
        streams = math.ceil(count * active_fraction)
        instances = math.ceil(streams / capacity) if capacity else None
        hosts = (
            math.ceil(instances / instances_per_host)
            if instances is not None and instances_per_host
            else None
        )
        rows.append({"analysts": count, "streams": streams, "instances": instances, "hosts": hosts})
    return rows


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    # An instance imports the web stack too: its memory counts in the instance's overhead. A GPU
    # machine with torch alone still measures the engine (the record says which).
    try:
        import app.main  # noqa: F401

        web_stack = True
    except ImportError:
        web_stack = False
    from app.inference import EngineConfig, GenerationRequest, InferenceEngine, SamplingParams

    def prompts_for(level: int) -> int:
        return arguments.num_prompts or max(8, 2 * level)

    engine = InferenceEngine.load(
        EngineConfig(
            model_path=arguments.model,
            device=arguments.device,
            dtype=arguments.dtype,
            torch_threads=arguments.threads,
            max_batch_size=arguments.max_concurrency,
            max_queue=prompts_for(arguments.max_concurrency),
            max_input_tokens=max(4096, arguments.input_len),
            max_new_tokens=max(1024, arguments.output_len),
        )
    )
    await engine.start()
    threads = arguments.threads or _cpu_count()
    print(
        f"model {arguments.model} on {engine.device} ({engine.dtype}), threads {threads}, "
        f"input {arguments.input_len} / output {arguments.output_len} tokens; targets TTFT <= "
        f"{arguments.ttft_ms:g} ms, TPOT <= {arguments.tpot_ms:g} ms "
        f"for {arguments.attainment:.0%} of requests",
        flush=True,
    )
    warm = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    warm_prompts = make_prompts(4, arguments.input_len, arguments.seed + 1, engine.tokenizer)
    await asyncio.gather(
        *(engine.submit(GenerationRequest(prompt=p, params=warm)).result() for p in warm_prompts)
    )

    slos = {"ttft": arguments.ttft_ms, "tpot": arguments.tpot_ms}
    rows: list[dict[str, Any]] = []
    progress = _Progress(0, enabled=not arguments.no_progress)
    loop = asyncio.get_running_loop()

    async def measure(level: int) -> bool:
        prompts = make_prompts(prompts_for(level), arguments.input_len, arguments.seed, engine.tokenizer)
        progress.describe(f"c={level}")
        records, duration = await _run_engine_level(engine, prompts, arguments.output_len, level, progress)
        metrics = summarize(records, duration, slos)
        share = attained(records, arguments.ttft_ms, arguments.tpot_ms)
        ok = level_passes(metrics, share, arguments.attainment)
        rows.append(
            {"system": "engine", "concurrency": level, "attained": share, "passes": ok, "metrics": metrics}
        )
        print(
            f"c={level:<3} attained {share:6.1%}  goodput {metrics['goodput']:.2f} req/s  "
            f"TTFT p99 {metrics['ttft_ms']['p99']:.0f} ms  TPOT p99 {metrics['tpot_ms']['p99']:.1f} ms  "
            f"{'pass' if ok else 'FAIL'}",
            flush=True,
        )
        return ok

    # search_levels is synchronous; each probe runs on the event loop of this coroutine's thread.
    def passes(level: int) -> bool:
        return asyncio.run_coroutine_threadsafe(measure(level), loop).result()

    gpu_in_use = None
    try:
        capacity = await asyncio.to_thread(search_levels, arguments.max_concurrency, passes)
        if engine.device.startswith("cuda"):
            import torch

            # The whole GPU's memory in use while the engine is up: CUDA context included.
            free, total = torch.cuda.mem_get_info()
            gpu_in_use = total - free
    finally:
        progress.close()
        await engine.shutdown(timeout_s=5)

    gpu_peak = None
    if engine.device.startswith("cuda"):
        import torch

        gpu_peak = torch.cuda.max_memory_reserved()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = weights_in_memory_bytes(Path(arguments.model), engine.dtype)
    overhead = max(0, peak_rss - weights)
    host_cpus = arguments.host_cpus or _cpu_count()
    host_memory = (arguments.host_memory_gib * 2**30) if arguments.host_memory_gib else _host_memory_bytes()
    usable = max(0.0, host_memory - arguments.memory_reserve_gib * 2**30)
    if arguments.gpus_per_host:
        per_host = arguments.gpus_per_host
        per_host_reason = f"{arguments.gpus_per_host} GPUs per host, one instance each"
    else:
        by_cpu = max(1, host_cpus // max(1, threads))
        by_memory = int(usable // peak_rss) if peak_rss else by_cpu
        per_host = max(0, min(by_cpu, by_memory))
        per_host_reason = (
            f"min({host_cpus} CPUs // {threads} threads = {by_cpu}, "
            f"{usable / 2**30:.1f} GiB // {peak_rss / 2**30:.2f} GiB = {by_memory})"
        )
    return {
        "mode": "capacity",
        "title": f"{engine.model_name} on {engine.device} ({engine.dtype}), "
        f"{arguments.input_len} in / {arguments.output_len} out",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": _cpu_count(),
            "memory_gib": round(_host_memory_bytes() / 2**30, 1),
            "threads": threads,
        },
        "settings": {key: value for key, value in vars(arguments).items() if key != "handler"},
        "model": engine.model_name,
        "device": engine.device,
        "dtype": engine.dtype,
        "results": sorted(rows, key=lambda row: row["concurrency"]),
        "capacity": capacity,
        "memory": {
            "peak_rss_mib": round(peak_rss / 2**20),
            "weights_in_memory_mib": round(weights / 2**20),
            "overhead_mib": round(overhead / 2**20),
            "web_stack_imported": web_stack,
            # torch's peak reserved GPU memory (weights, KV cache, activations), without the CUDA
            # context; None on a CPU.
            "gpu_peak_reserved_mib": None if gpu_peak is None else round(gpu_peak / 2**20),
            # Device memory in use on the GPU at the end, CUDA context included (one process).
            "gpu_in_use_mib": None if gpu_in_use is None else round(gpu_in_use / 2**20),
        },
        "instances_per_host": per_host,
        "instances_per_host_reason": per_host_reason,
        "sizing": sizing(_levels(arguments.analysts), capacity, arguments.active_fraction, per_host),
    }


def markdown(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        f"{record['title']}; targets TTFT <= {settings['ttft_ms']:g} ms and "
        f"TPOT <= {settings['tpot_ms']:g} ms for {settings['attainment']:.0%} of requests.",
        "",
        "| concurrency | met targets | goodput (req/s) | out tok/s | TTFT p50 / p99 (ms) "
        "| TPOT p50 / p99 (ms) | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["results"]:
        metrics, ttft, tpot = row["metrics"], row["metrics"]["ttft_ms"], row["metrics"]["tpot_ms"]
        lines.append(
            f"| {row['concurrency']} | {row['attained']:.0%} | {metrics['goodput']:.2f} | "
            f"{metrics['output_throughput']:.1f} | {ttft['median']:.0f} / {ttft['p99']:.0f} | "
            f"{tpot['median']:.1f} / {tpot['p99']:.1f} | {'pass' if row['passes'] else 'fail'} |"
        )
    memory = record["memory"]
    lines += [
        "",
        f"Capacity of one instance: **{record['capacity']} concurrent streams**. Resident memory "
        f"{memory['peak_rss_mib']} MiB = weights {memory['weights_in_memory_mib']} MiB + overhead "
        f"{memory['overhead_mib']} MiB; {record['instances_per_host']} instances per host "
        f"({record['instances_per_host_reason']}).",
        "",
        f"| concurrent analysts (x {settings['active_fraction']:g} streaming) "
        "| streams | instances | hosts |",
        "|---|---|---|---|",
    ]
    for row in record["sizing"]:
        instances = "targets not met" if row["instances"] is None else row["instances"]
        hosts = "-" if row["hosts"] is None else row["hosts"]
        lines.append(f"| {row['analysts']} | {row['streams']} | {instances} | {hosts} |")
    return "\n".join(lines)


def main(arguments: argparse.Namespace) -> int:
    try:
        check_arguments(arguments)
    except ValueError as error:
        print(f"python -m bench capacity: {error}")
        return 2
    record = asyncio.run(run(arguments))
    print()
    print(markdown(record))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return 0
