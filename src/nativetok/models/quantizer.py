"""Vector quantizer with an l2-normalised codebook (ViT-VQGAN style) and a straight-through estimator.

Vectors and codes live on the unit sphere, so the nearest code is the one with the largest dot product.
Codes that go unused for a while can be moved onto recent encoder outputs (dead-code restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEVER = -(2**40)


@dataclass
class Quantized:
    codes: Tensor  # [..., dim] the chosen codes, with straight-through gradients to the input
    ids: Tensor  # [...] long
    loss: Tensor  # scalar: codebook loss + commitment * commitment loss
    inputs: Tensor  # [..., dim] the normalised inputs (what dead codes restart onto)


class Snapped(NamedTuple):
    """Vectors matched to their nearest codes, before any loss or straight-through gradient."""

    normalised: Tensor  # [..., dim] the inputs on the unit sphere (float)
    ids: Tensor  # [...] long
    codes: Tensor  # [..., dim] the chosen codes (float)


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, commitment: float = 0.25):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment = commitment
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        # Step at which each code was last chosen in training (for dead-code restart). It starts far in
        # the past, so with restarts on, the first training step moves every unused code onto encoder
        # outputs: a data-dependent initialisation of the codebook.
        self.register_buffer("last_used", torch.full((codebook_size,), NEVER, dtype=torch.long))

    def normalized_codebook(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1)

    def lookup(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.normalized_codebook())

    def forward(self, vectors: Tensor) -> Quantized:
        return self.finish(self.snap(vectors, self.normalized_codebook().float()), vectors.dtype)

    def snap(self, vectors: Tensor, codebook: Tensor) -> Snapped:
        """The nearest codes of `codebook` (normalised, float) to `vectors` [..., dim]. Callers that quantize
        token by token normalise the codebook once and call `finish` once on all tokens."""
        z = F.normalize(vectors.float(), dim=-1)
        ids = (z @ codebook.t()).argmax(dim=-1)
        return Snapped(z, ids, F.embedding(ids, codebook))

    def finish(self, snapped: Snapped, dtype: torch.dtype) -> Quantized:
        """Codebook and commitment losses over all of `snapped`, and codes with straight-through gradients."""
        z, codes = snapped.normalised, snapped.codes
        loss = F.mse_loss(codes, z.detach()) + self.commitment * F.mse_loss(z, codes.detach())
        return Quantized(straight_through(z, codes).to(dtype), snapped.ids, loss, z.detach())

    @torch.no_grad()
    def note_usage(self, ids: Tensor, step: int) -> None:
        self.last_used.index_fill_(0, ids.flatten(), step)  # no data-dependent shapes: no host sync

    @torch.no_grad()
    def maintain(
        self,
        ids: Tensor,
        vectors: Tensor,
        step: int,
        after: int,
        seed: int,
        gather: Callable[[Tensor], Tensor] = lambda t: t,
        allowed: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        """Dead-code restart after a training step, decided on the device: note the codes `ids` used, and
        every after/4 steps (and at step 0: the data-dependent initialisation of the codebook) restart the
        codes unused for more than `after` steps onto the step's `vectors`. Off while `after` <= 0 or the
        codebook is frozen.

        `gather` collects a tensor from every DDP rank (Lightning's `all_gather`), so that all ranks see the
        same candidates and, from the generator seeded by (seed, step), draw the same picks. Returns how many
        codes moved (a device count) on the steps that restart, else None.
        """
        if after <= 0 or not self.codebook.requires_grad:
            return None
        self.note_usage(gather(ids).flatten(), step)
        if step % max(1, after // 4) != 0:
            return None
        candidates = gather(vectors.detach()).reshape(-1, vectors.shape[-1])
        generator = torch.Generator(device=self.codebook.device).manual_seed(seed * 1_000_003 + step)
        return self.restart_dead(candidates, step, after, generator, allowed)

    @torch.no_grad()
    def restart_dead(
        self, candidates: Tensor, step: int, after: int, generator: torch.Generator, allowed: Optional[Tensor] = None
    ) -> Tensor:
        """Move codes unused for more than `after` steps onto random rows of `candidates` [N, dim].

        Decided on the device (no host sync): every code draws a candidate, dead ones take it; `allowed`
        (a device boolean) vetoes the whole restart, e.g. when the step's outputs were not finite.
        `generator` lives on the codebook's device and must be seeded identically on every rank, so that
        all ranks restart the same codes. Returns how many codes moved, as a device tensor.
        """
        dead = step - self.last_used > after
        if allowed is not None:
            dead = dead & allowed
        picks = torch.randint(len(candidates), (self.codebook_size,), generator=generator, device=candidates.device)
        replacement = candidates[picks].to(self.codebook.dtype)
        self.codebook.copy_(torch.where(dead[:, None], replacement, self.codebook))
        self.last_used.copy_(torch.where(dead, step, self.last_used))
        return dead.sum()


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """The value of `codes` with the gradient of `z`."""
    return z + (codes - z).detach()


def code_statistics(ids: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Fraction of the codebook used and the perplexity of the code distribution in `ids`."""
    return statistics_from_counts(code_counts(ids, codebook_size))


def code_counts(ids: Tensor, codebook_size: int) -> Tensor:
    """How often each code occurs (scatter_add, not bincount: its output size never waits for the GPU)."""
    flat = ids.flatten()
    counts = torch.zeros(codebook_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def statistics_from_counts(counts: Tensor) -> dict[str, Tensor]:
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}
