"""Small matplotlib plots (headless) of quantities per token position: drawn without pyplot in
`nativetok.lit.figures` (training logs them too, and evaluation may import training, not the reverse)."""

from __future__ import annotations

from nativetok.lit.figures import position_curves

__all__ = ["position_curves"]
