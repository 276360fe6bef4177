"""python -m bench {engine,serve,compare,affinity,fairness,capacity} ...: see bench/engine_bench.py,
serve_bench.py, compare.py, affinity.py, fairness.py and capacity.py."""

from __future__ import annotations

import argparse
import os
import sys

from bench import affinity, capacity, compare, engine_bench, fairness, serve_bench


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    engine_parser = modes.add_parser("engine", help="naive generate() vs the engine, in process")
    engine_bench.add_arguments(engine_parser)
    engine_parser.set_defaults(handler=engine_bench.main)
    serve_parser = modes.add_parser("serve", help="serving metrics of an OpenAI-compatible endpoint")
    serve_bench.add_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve_bench.main)
    fairness_parser = modes.add_parser("fairness", help="one heavy user against one light user (issue 16)")
    fairness.add_arguments(fairness_parser)
    fairness_parser.set_defaults(handler=fairness.main)
    capacity_parser = modes.add_parser(
        "capacity", help="one instance's concurrency within TTFT/TPOT targets, and instances for N analysts"
    )
    capacity.add_arguments(capacity_parser)
    capacity_parser.set_defaults(handler=capacity.main)
    compare_parser = modes.add_parser(
        "compare", help="bare vllm serve, Zeus engine vllm and Zeus engine builtin, one after the other"
    )
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(handler=compare.main)
    affinity_parser = modes.add_parser(
        "affinity", help="prefix-cache hit rate through nginx: affinity vs least_conn (engine vllm)"
    )
    affinity.add_arguments(affinity_parser)
    affinity_parser.set_defaults(handler=affinity.main)
    arguments = parser.parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
