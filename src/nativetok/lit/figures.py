"""Figures that training logs, drawn on `matplotlib.figure.Figure` directly: no pyplot, so importing or calling
this changes no global matplotlib state (backend, open figures) of the process that trains."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from matplotlib.figure import Figure


def position_curves(curves: Dict[str, Sequence[float]], ylabel: str, title: str = "",
                    positions: Optional[Sequence[int]] = None, xlabel: str = "token position") -> Figure:
    """One line per named curve over token positions 1..K (or the given positions, on a log2 axis)."""
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axis = figure.subplots()
    for label, values in curves.items():
        xs = list(positions) if positions is not None else range(1, len(values) + 1)
        axis.plot(xs, list(values), marker="o", markersize=3, label=label)
    if positions is not None:
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(positions), [str(k) for k in positions])
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend()
    figure.tight_layout()
    return figure
