"""Small matplotlib plots (headless) of quantities per token position."""

from __future__ import annotations

from typing import Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def position_curves(curves: Dict[str, Sequence[float]], ylabel: str, title: str = "") -> Figure:
    """One line per named curve over token positions 1..K."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, values in curves.items():
        axis.plot(range(1, len(values) + 1), list(values), marker="o", markersize=3, label=label)
    axis.set_xlabel("token position")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend()
    figure.tight_layout()
    return figure
