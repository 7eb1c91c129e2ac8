"""The report's figures as PNG bytes: reliability diagrams, risk-coverage curves, confidence histograms.

matplotlib's object API with the Agg canvas: no pyplot, no global backend state, safe in any process.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safeconf.evaluation.metrics import ece, reliability_table, risk_curve

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (confidence, correct) of gold-labelled questions


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _grid(count: int, width: float = 3.4, height: float = 3.2):
    """A figure with one square-ish panel per method, up to three across."""
    columns = min(3, max(count, 1))
    rows = math.ceil(max(count, 1) / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")  # no overlapping labels
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes


def reliability_diagrams(scores: Scores, bins: int = 10) -> bytes:
    """Per method: accuracy per confidence bin against the diagonal, bin sizes written on the bars."""
    figure, axes = _grid(len(scores))
    for ax, (method, (conf, right)) in zip(axes, scores.items()):
        table = reliability_table(conf, right, bins)
        centres = [(b["low"] + b["high"]) / 2 for b in table]
        accuracy = [b["accuracy"] or 0.0 for b in table]
        ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", color="tab:blue", alpha=0.75, label="accuracy")
        for b, x in zip(table, centres):
            if b["count"]:
                ax.plot([b["low"], b["high"]], [b["confidence"]] * 2, color="tab:red", linewidth=2)
                ax.text(x, (b["accuracy"] or 0) + 0.02, str(b["count"]), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        title = f"{method}\nECE {ece(conf, right, bins):.3f}, n = {len(conf)}"
        ax.set(xlim=(0, 1), ylim=(0, 1.08), title=title, xlabel="confidence", ylabel="accuracy")
    figure.suptitle("Reliability (bars: accuracy per bin; red: mean confidence; numbers: questions)", fontsize=10)
    return _png(figure)


def risk_coverage_curves(scores: Scores) -> bytes:
    """Error rate of the answers kept when only the most confident share is answered; lower is better."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    for method, (conf, right) in scores.items():
        coverage, risk = risk_curve(conf, right)
        if coverage.size:
            ax.plot(coverage, risk, label=f"{method} (AURC {risk.mean():.3f})", linewidth=1.6)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="coverage (share of questions answered)", ylabel="risk (share wrong)",
           title="Risk-coverage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(figure)


def confidence_histograms(scores: Scores, bins: int = 10) -> bytes:
    """Per method: how confidences spread, right and wrong answers stacked."""
    figure, axes = _grid(len(scores))
    edges = np.linspace(0, 1, bins + 1)
    for ax, (method, (conf, right)) in zip(axes, scores.items()):
        right = np.asarray(right, dtype=bool)
        ax.hist([conf[right], conf[~right]], bins=edges, stacked=True, color=["tab:green", "tab:red"],
                label=["right", "wrong"], edgecolor="black")
        ax.set(xlim=(0, 1), title=method, xlabel="confidence", ylabel="questions")
        ax.legend(fontsize=7)
    figure.suptitle("Confidence histograms", fontsize=10)
    return _png(figure)
