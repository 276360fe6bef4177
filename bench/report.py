"""Print a results table, write the JSON record and the PNG plot (tok/s, p50/p99 TTFT vs concurrency)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

_COLUMNS = [
    ("system", "{:<8}", lambda row: row["system"]),
    ("conc", "{:>5}", lambda row: row["concurrency"]),
    ("done", "{:>5}", lambda row: row["metrics"]["completed"]),
    ("fail", "{:>5}", lambda row: row["metrics"]["failed"]),
    ("req/s", "{:>7.2f}", lambda row: row["metrics"]["request_throughput"]),
    ("out tok/s", "{:>9.1f}", lambda row: row["metrics"]["output_throughput"]),
    ("TTFT p50", "{:>9.0f}", lambda row: row["metrics"]["ttft_ms"]["median"]),
    ("TTFT p99", "{:>9.0f}", lambda row: row["metrics"]["ttft_ms"]["p99"]),
    ("TPOT p50", "{:>9.1f}", lambda row: row["metrics"]["tpot_ms"]["median"]),
    ("TPOT p99", "{:>9.1f}", lambda row: row["metrics"]["tpot_ms"]["p99"]),
    ("ITL p50", "{:>8.1f}", lambda row: row["metrics"]["itl_ms"]["median"]),
    ("E2EL p50", "{:>9.0f}", lambda row: row["metrics"]["e2el_ms"]["median"]),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table (times in ms); also valid Markdown when piped through `markdown_table`."""
    header = " | ".join(name for name, _, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(" | ".join(fmt.format(get(row)) for _, fmt, get in _COLUMNS))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = [
        name + (" (ms)" if "TTFT" in name or "TPOT" in name or "ITL" in name or "E2EL" in name else "")
        for name, _, _ in _COLUMNS
    ]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(get(row)).strip() for _, fmt, get in _COLUMNS) + " |")
    return "\n".join(lines)


def write_outputs(
    mode: str,
    record: dict[str, Any],
    copy_plot_to: Path | None = None,
    draw: Callable[[list[dict[str, Any]], Path, str], None] | None = None,
) -> tuple[Path, Path]:
    """bench/results/MODE-STAMP.json and .png (drawn by `draw(rows, path, title)`, by default
    `plot`: tok/s and TTFT against concurrency), and the PNG copied to `copy_plot_to` if given."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS_DIR / f"{mode}-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    plot_path = RESULTS_DIR / f"{mode}-{stamp}.png"
    (draw or plot)(record["results"], plot_path, record.get("title", mode))
    if copy_plot_to is not None:
        copy_plot_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot_path, copy_plot_to)
    return json_path, plot_path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    systems = list(dict.fromkeys(row["system"] for row in rows))
    all_levels = sorted({row["concurrency"] for row in rows})
    figure, (throughput_axes, ttft_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for index, system in enumerate(systems):
        colour = f"C{index}"
        points = sorted((row for row in rows if row["system"] == system), key=lambda row: row["concurrency"])
        levels = [row["concurrency"] for row in points]
        throughput_axes.plot(
            levels,
            [row["metrics"]["output_throughput"] for row in points],
            marker="o",
            color=colour,
            label=system,
        )
        for stat, style in (("median", "-"), ("p99", "--")):
            values = [row["metrics"]["ttft_ms"][stat] for row in points]
            if not all(math.isnan(value) for value in values):
                label = f"{system} {'p50' if stat == 'median' else 'p99'}"
                ttft_axes.plot(levels, values, style, marker="o", color=colour, label=label)
    for axes in (throughput_axes, ttft_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(all_levels, [str(level) for level in all_levels])
        axes.minorticks_off()
        axes.set_xlabel("concurrency")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    throughput_axes.set_ylabel("output tokens/s")
    throughput_axes.set_title("aggregate output throughput")
    ttft_axes.set_ylabel("TTFT (ms)")
    ttft_axes.set_yscale("log")
    ttft_axes.set_title("time to first token")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
