"""The figures of RESULTS.md beyond safeconf.evaluation.plots': the learning curve, accuracy by data set, the SFT
targets' confidence."""

from __future__ import annotations

import io as bytes_io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safeconf import io
from safeconf.evaluation.report import METRIC_NAMES

from results_facts import DPI


def png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def scores_of(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    gold = [r for r in rows if r["answer"] is not None]
    return (np.array([r["confidence"] for r in gold], dtype=float),
            np.array([int(r["choice"] == r["answer"]) for r in gold], dtype=int))


def learning_curve_figure(points_: list[dict], references: dict) -> bytes:
    """Accuracy and ECE of each method against the training questions, bootstrap intervals as error bars;
    dashed: the best baseline's accuracy and the best-calibrated baseline's ECE."""
    figure = Figure(figsize=(8.4, 3.4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "ece")):
        methods = sorted({m for p in points_ for m in p["methods"]})
        for method in methods:
            xs, ys, lows, highs = [], [], [], []
            for p in points_:
                entry = ((p["methods"].get(method) or {}).get("overall") or {}).get(metric) or {}
                if entry.get("value") is None:
                    continue
                ci = entry.get("ci") or [entry["value"]] * 2
                xs.append(p["questions"])
                ys.append(entry["value"])
                # a bootstrap percentile interval can miss its own point estimate (ECE is biased); draw from the point
                lows.append(max(0.0, entry["value"] - ci[0]))
                highs.append(max(0.0, ci[1] - entry["value"]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=method)
        name, value = references.get(metric, (None, None))
        if value is not None:
            ax.axhline(value, linestyle="--", color="gray", linewidth=1, label=f"{name} (base)")
        ax.set(xlabel="training questions", ylabel=METRIC_NAMES[metric],
               title=f"{METRIC_NAMES[metric]} vs training size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(figure)


def by_source_figure(sources: list[str], series: dict[str, dict]) -> bytes:
    """Per data set, accuracy and ECE of each series (label -> by_source entries), with their intervals."""
    figure = Figure(figsize=(max(6.0, 1.3 * len(sources) + 2), 3.4), layout="constrained")
    axes = figure.subplots(1, 2)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(sources))
    for ax, metric in zip(axes, ("accuracy", "ece")):
        for i, (label, by_source) in enumerate(series.items()):
            values, errors = [], [[], []]
            for s in sources:
                entry = (by_source.get(s) or {}).get(metric) or {}
                v, ci = entry.get("value"), entry.get("ci")
                values.append(np.nan if v is None else v)
                errors[0].append(0 if v is None or not ci else max(0.0, v - ci[0]))  # as in the curve figure
                errors[1].append(0 if v is None or not ci else max(0.0, ci[1] - v))
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=errors, capsize=2, label=label)
        ax.set_xticks(x, sources, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=METRIC_NAMES[metric], title=f"{METRIC_NAMES[metric]} per data set", ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return png(figure)


def sft_figure(confidences: dict[str, list[float]]) -> bytes:
    """Histogram of the confidence in each model's SFT targets."""
    figure = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = figure.subplots()
    edges = np.linspace(0, 1, 11)
    for i, (model, values) in enumerate(confidences.items()):
        ax.hist(values, bins=edges, histtype="bar" if i == 0 else "step", linewidth=1.5, alpha=0.6 if i == 0 else 1,
                label=f"{model} ({len(values)})")
    ax.set(xlim=(0, 1), xlabel="confidence in the SFT target", ylabel="training examples",
           title="What the confidence labels looked like")
    ax.legend(fontsize=7)
    return png(figure)
