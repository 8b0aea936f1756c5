"""Vector quantizer with an l2-normalised codebook (ViT-VQGAN style) and a straight-through estimator.

Vectors and codes live on the unit sphere, so the nearest code is the one with the largest dot product.
Codes that go unused for a while can be moved onto recent encoder outputs (dead-code restart).
"""

from __future__ import annotations

from dataclasses import dataclass

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
        z = F.normalize(vectors.float(), dim=-1)
        codebook = self.normalized_codebook().float()
        ids = (z.reshape(-1, self.code_dim) @ codebook.t()).argmax(dim=-1).view(z.shape[:-1])
        codes = F.embedding(ids, codebook)
        loss = F.mse_loss(codes, z.detach()) + self.commitment * F.mse_loss(z, codes.detach())
        straight_through = z + (codes - z).detach()
        return Quantized(straight_through.type_as(vectors), ids, loss, z.detach())

    @torch.no_grad()
    def note_usage(self, ids: Tensor, step: int) -> None:
        self.last_used.index_fill_(0, ids.flatten(), step)  # no data-dependent shapes: no host sync

    @torch.no_grad()
    def restart_dead(self, candidates: Tensor, step: int, after: int, generator: torch.Generator) -> int:
        """Move codes unused for more than `after` steps onto random rows of `candidates` [N, dim].

        `generator` must be seeded identically on every rank so that all ranks restart the same codes.
        """
        dead = (step - self.last_used > after).nonzero().flatten()
        if dead.numel() == 0 or candidates.numel() == 0:
            return 0
        picks = torch.randint(len(candidates), (dead.numel(),), generator=generator, device="cpu")
        self.codebook[dead] = candidates[picks.to(candidates.device)].to(self.codebook.dtype)
        self.last_used[dead] = step
        return int(dead.numel())


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
