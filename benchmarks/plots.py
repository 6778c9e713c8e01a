"""Plots of the benchmark tables on the Performance page, as PNGs the page shows.

The figures are the ones in docs/performance.md (pasted there from the benchmark scripts' output);
this script reads the Markdown tables back and draws them, so a plot never disagrees with its table.
Run it after updating a table:

    python benchmarks/plots.py            # writes docs/performance/*.png

Needs matplotlib (the ``examples`` and ``test`` extras have it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
OUT = ROOT / "docs" / "performance"


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of ``text`` as (header, rows), cells stripped of ``*`` emphasis."""
    found = []
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.M):
        lines = [[c.strip().strip("*") for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
        if len(lines) >= 3 and set(lines[1][0]) <= set("-: "):
            found.append((lines[0], lines[2:]))
    return found


def table(all_tables: list[tuple[list[str], list[list[str]]]], *header: str) -> list[list[str]]:
    """The rows of the first table whose header starts with ``header``."""
    for head, rows in all_tables:
        if tuple(head[: len(header)]) == header:
            return rows
    raise KeyError(f"no table with header {header} in {PAGE}")


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def attention(t, ax_time, ax_mem) -> None:
    rows = table(t, "T", "funcnet ms", "jax.nn autodiff ms")
    T = [int(r[0]) for r in rows]
    ax_time.loglog(T, [number(r[1]) for r in rows], "o-", label="funcnet (hand FlashAttention-2 backward)")
    ax_time.loglog(T, [number(r[2]) for r in rows], "s--", label="jax.nn + autodiff")
    ax_time.set(xlabel="sequence length T", ylabel="forward + backward, ms", title="Causal attention: time")
    ax_mem.loglog(T, [number(r[4]) for r in rows], "o-", label="funcnet")
    ax_mem.loglog(T, [number(r[5]) for r in rows], "s--", label="jax.nn + autodiff")
    ax_mem.set(xlabel="sequence length T", ylabel="gradient's temporary memory, MiB", title="Causal attention: memory")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(T, [str(v) for v in T])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)


def barh(ax, labels: list[str], values: list[float], xlabel: str, title: str, reference: float | None = None) -> None:
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    if reference is not None:
        ax.axvline(reference, color="k", lw=0.8, ls="--")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:g}", va="center", fontsize=8)


def main() -> None:
    t = tables(PAGE.read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    written = []

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    attention(t, a, b)
    written.append(save(fig, "attention.png"))

    rows = table(t, "workload A", "ms / epoch")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    barh(ax, [r[0] for r in rows], [number(r[1]) for r in rows], "ms / epoch (log scale)", "Training, workload A")
    ax.set_xscale("log")
    ax.set_xlim(1, 200)
    ax.xaxis.set_minor_formatter(NullFormatter())
    written.append(save(fig, "fit.png"))

    ops = table(t, "op", "custom_vjp ms", "autodiff ms", "ratio")
    bptt = table(t, "cell", "hand-derived BPTT ms")
    mlp = table(t, "version", "median ms / step", "ratio to autodiff")
    labels = ["MLP 512-1024-10"] + [r[0] for r in ops] + [f"{r[0]} (BPTT)" for r in bptt]
    ratios = [number(mlp[0][2])] + [number(r[3]) for r in ops] + [number(r[3]) for r in bptt]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    barh(
        ax, labels, ratios, "time of the hand-derived backward / autodiff (< 1: faster)", "custom_vjp vs autodiff", 1.0
    )
    written.append(save(fig, "custom_vjp.png"))

    rows = table(t, "variant", "net.init s", "first fit s")
    fig, ax = plt.subplots(figsize=(8, 3))
    barh(
        ax, [r[0] for r in rows], [number(r[3]) for r in rows], "net.init + first fit, s", "A fresh process's first fit"
    )
    written.append(save(fig, "first_fit.png"))
    print("\n".join(str(p.relative_to(ROOT)) for p in written), file=sys.stdout)


def save(fig, name: str) -> Path:
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
