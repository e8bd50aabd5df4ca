"""The results of ``pacs-loadtest compare``: one :class:`Cell` per (receiver, size,
associations), as a text table, Markdown, JSON and an optional bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .units import format_bytes

__all__ = ["PNG_NEEDS", "Cell", "markdown", "ratios", "text_table", "write_png"]


@dataclass
class Cell:
    receiver: str
    size: int
    associations: int
    instances: int = 0
    failed: int = 0
    elapsed: float = 0.0
    instances_per_second: float = 0.0
    megabytes_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    generator_cpu_seconds: float = 0.0
    ratio: float | None = None
    error: str = ""
    failures: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "size_bytes": self.size,
            "associations": self.associations,
            "instances": self.instances,
            "failed": self.failed,
            "elapsed_seconds": self.elapsed,
            "instances_per_second": self.instances_per_second,
            "megabytes_per_second": self.megabytes_per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "receiver_cpu_seconds": self.cpu_seconds,
            "receiver_peak_rss_bytes": self.peak_rss,
            "generator_cpu_seconds": self.generator_cpu_seconds,
            "ratio_to_pacs_receiver": self.ratio,
            "error": self.error,
            "failures": self.failures,
        }


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


HEADERS = (
    "receiver",
    "size",
    "assocs",
    "inst/s",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "rx CPU s",
    "rx peak RSS",
    "gen CPU s",
    "ratio",
    "failed",
)


def _rows(cells: Sequence[Cell]) -> list[list[str]]:
    rows = []
    for c in cells:
        rows.append(
            [
                c.receiver,
                format_bytes(c.size),
                str(c.associations),
                f"{c.instances_per_second:.1f}",
                f"{c.megabytes_per_second:.1f}",
                f"{c.p50_ms:.2f}",
                f"{c.p99_ms:.2f}",
                f"{c.cpu_seconds:.2f}",
                format_bytes(c.peak_rss),
                f"{c.generator_cpu_seconds:.2f}",
                _fmt_ratio(c.ratio),
                str(c.failed) + (f" ({c.error})" if c.error else ""),
            ]
        )
    return rows


def text_table(cells: Sequence[Cell]) -> str:
    rows = [list(HEADERS), *_rows(cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(cells: Sequence[Cell], meta: dict[str, Any]) -> str:
    out = ["# pacs-loadtest compare", ""]
    out.append(
        f"{meta['count']} instances per cell, generator: {meta['processes']} process(es)"
        + (f", async ops {meta['async_ops']}" if meta.get("async_ops") is not None else "")
        + f"; machine: {meta['cpus']} CPUs, {meta['machine']}; load average before "
        f"{meta['load_before']}, after {meta['load_after']}."
    )
    out.append("")
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|")
    for row in _rows(cells):
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append(
        "inst/s and MB/s (10^6 bytes) over the cell's run; p50, p99: C-STORE latency (from "
        "starting to send the request to its response); rx CPU s: CPU seconds of the "
        "receiver's whole process tree during the cell; rx peak RSS: peak of the summed "
        "RSS of the tree; gen CPU s: CPU seconds of the load generator's processes; "
        "ratio: inst/s relative to pacs-receiver in the same cell."
    )
    out.append("")
    for name, note in meta["receivers"].items():
        out.append(f"- **{name}**: {note}")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


#: What --png says when matplotlib is missing (one line, before anything runs).
PNG_NEEDS = "--png needs matplotlib, which is not installed: pip install 'pacs-receiver[plot]'"


def _matplotlib_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is None


def write_png(path: str, cells: Sequence[Cell]) -> str | None:
    """A bar chart of instances/s per cell; None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PNG_NEEDS
    keys = sorted({(c.size, c.associations) for c in cells})
    names = list(dict.fromkeys(c.receiver for c in cells))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys)), 4))
    for i, name in enumerate(names):
        values = []
        for key in keys:
            found = [c for c in cells if c.receiver == name and (c.size, c.associations) == key]
            values.append(found[0].instances_per_second if found else 0.0)
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=name)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{format_bytes(s)} x{a}" for s, a in keys])
    ax.set_ylabel("instances/s")
    ax.set_title("pacs-loadtest compare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def ratios(cells: Sequence[Cell]) -> None:
    """Each cell's instances/s relative to pacs-receiver's in the same (size,
    associations); None without such a cell."""
    ref = {
        (c.size, c.associations): c.instances_per_second
        for c in cells
        if c.receiver == "pacs-receiver"
    }
    for c in cells:
        base = ref.get((c.size, c.associations))
        c.ratio = c.instances_per_second / base if base else None
