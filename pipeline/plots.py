"""The charts of evaluations and reports, drawn with matplotlib as PNG bytes.

Figures are made with `matplotlib.figure.Figure`, which renders through the Agg backend to a
buffer: no display is needed and pyplot's global state is never touched.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

Series = Sequence[tuple[int, float]]
# Counts are written in the cells of a confusion matrix up to this many classes; beyond, the
# colour alone says it.
_ANNOTATED_CLASSES = 20


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def confusion_matrix_png(confusion: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Rows are true classes, columns predicted ones; each cell is coloured by its share of the
    row (0 to 1, whatever the class sizes), and holds its count when there are few classes."""
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    shares = confusion / rows
    # Grows with the classes so that 100 labels stay readable at 5 points.
    side = min(max(4.0 + 0.22 * n, 5.0), 26.0)
    font = 10.0 if n <= _ANNOTATED_CLASSES else max(5.0, 10.0 - (n - _ANNOTATED_CLASSES) / 16)
    figure = Figure(figsize=(side + 1.6, side), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    axes.set_xticks(range(n), labels=class_names, rotation=90, fontsize=font)
    axes.set_yticks(range(n), labels=class_names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if n <= _ANNOTATED_CLASSES:
        for (row, column), count in np.ndenumerate(confusion):
            axes.text(column, row, str(int(count)), ha="center", va="center", fontsize=font - 1,
                      color="white" if shares[row, column] > 0.5 else "black")
    return _png(figure)


def curves_png(title: str, series: Mapping[str, Series], log_scale: bool = False) -> bytes:
    """Line chart of each named series over the global step, on one set of axes; a series of a
    single point (a final evaluation) is drawn as a marker. `log_scale` (for a loss, whose first
    steps would flatten the rest) applies when every value is positive."""
    figure = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, points in series.items():
        steps, values = zip(*points)
        marker = "o" if len(points) <= 30 else None
        axes.plot(steps, values, marker=marker, markersize=4, linestyle="-" if len(points) > 1 else "none",
                  label=f"{name} (last {values[-1]:.4g})")
    if log_scale and all(value > 0 for points in series.values() for _, value in points):
        axes.set_yscale("log")
    axes.set_xlabel("global step")
    axes.set_ylabel(title)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)
