"""PNG plots of a privacy report (matplotlib, Agg backend: no display needed). Each returns PNG bytes."""

from __future__ import annotations

import io
import itertools
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

_DPI = 100


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def epsilon_histogram(report: dict[str, Any]) -> bytes | None:
    """Histogram of example-level epsilon over clients, with the budget as a vertical line."""
    example = report["example_level"]
    if example is None or example["histogram"] is None:
        return None
    hist = example["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4c72b0", edgecolor="white")
    budget = report["run"]["client_epsilon_budget"]
    if budget is not None:
        ax.axvline(budget, color="#c44e52", linestyle="--", label=f"budget {budget:g}")
        ax.legend()
    ax.set_xlabel(f"example-level epsilon (delta = {report['run']['delta']:g})")
    ax.set_ylabel("clients")
    ax.set_title("Epsilon per client")
    return _png(fig)


def epsilon_by_round(report: dict[str, Any]) -> bytes | None:
    """Max, median and min example-level epsilon over clients, and user-level epsilon, after each round."""
    fig = epsilon_by_round_figure(report)
    return _png(fig) if fig is not None else None


def epsilon_by_round_figure(report: dict[str, Any]) -> Any:
    """The figure of :func:`epsilon_by_round` (None when there is nothing to plot).

    Rounds are whole numbers on the x axis; the median is drawn last and thickest, so a best or worst
    client with the same epsilon cannot hide it.
    """
    timeline = report["epsilon_by_round"]
    if not timeline["round"]:
        return None
    rounds = timeline["round"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plotted = False
    # (key, label, colour, line style, line width, z-order): the median on top of the others.
    styles = [
        ("example_max", "example level, worst client", "#c44e52", "-", 1.2, 2),
        ("example_min", "example level, best client", "#55a868", ":", 1.2, 2),
        ("user_level", "user level (DP-FedAvg)", "#8172b2", "--", 1.2, 2),
        ("example_median", "example level, median client", "#4c72b0", "-", 2.4, 3),
    ]
    for key, label, color, style, width, zorder in styles:
        values = timeline[key]
        if values and any(v is not None for v in values):
            points = [(r, v) for r, v in zip(rounds, values) if v is not None]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                color=color,
                label=label,
                marker=".",
                linewidth=width,
                zorder=zorder,
            )
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    run = report["run"]
    for budget, label in (
        (run["client_epsilon_budget"], "client budget"),
        (run["user_epsilon_budget"], "user budget"),
    ):
        if budget is not None:
            ax.axhline(budget, color="grey", linestyle=":", label=f"{label} {budget:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (delta = {run['delta']:g})")
    ax.set_title("Epsilon against rounds")
    ax.legend(fontsize=8)
    return fig


def utility_vs_epsilon(comparison: dict[str, Any]) -> bytes | None:
    """One point per run: headline epsilon against utility; kinds of epsilon get different markers."""
    rows = [r for r in comparison["runs"] if r["utility"] is not None and r["epsilon"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"user-level": "s", "example-level, worst client": "o"}
    for kind in sorted({r["epsilon_kind"] for r in rows}):
        subset = [r for r in rows if r["epsilon_kind"] == kind]
        ax.scatter(
            [r["epsilon"] for r in subset],
            [r["utility"] for r in subset],
            marker=markers.get(kind, "^"),
            label=kind,
        )
        for r in subset:
            ax.annotate(
                _short(r["logdir"]),
                (r["epsilon"], r["utility"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.ticklabel_format(axis="y", useOffset=False)  # show utility values as they are, not as offsets
    metrics = sorted({r["utility_metric"] for r in rows})
    ax.set_xlabel(f"epsilon (delta = {comparison['delta']:g})")
    ax.set_ylabel(", ".join(metrics))
    ax.set_title("Utility against epsilon")
    ax.legend(fontsize=8)
    return _png(fig)


def _short(path: str) -> str:
    parts = path.rstrip("/").split("/")
    return "/".join(parts[-2:])
