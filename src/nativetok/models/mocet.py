"""Mixture of Causal Experts (MoCET): one small transformer per token position.

Expert i reads [Z, the quantized tokens 0..i-1, its learned query] and its output at the query becomes
token i, quantized and appended to the context of expert i+1. Token i therefore depends only on the
image and the tokens before it. Each expert owns everything it uses (query, projection of earlier codes
and their positions, blocks, output head), so freezing an expert fixes its token for a given image.
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from nativetok.models.layers import Block, init_weights, learned_positions
from nativetok.models.quantizer import Quantized, Snapped, VectorQuantizer, straight_through


class ExpertToken(NamedTuple):
    """One expert's token (or several, concatenated along dim 1): what the quantizer matched, and the
    straight-through code that joins the next experts' context."""

    snapped: Snapped
    straight: Tensor  # [B, n, code_dim] in the model's dtype


def expert_token(snapped: Snapped, dtype: torch.dtype) -> ExpertToken:
    return ExpertToken(snapped, straight_through(snapped.normalised, snapped.codes).to(dtype))


def joined(tokens: List[ExpertToken]) -> ExpertToken:
    """Tokens side by side: each field concatenated along the token axis."""
    return ExpertToken(Snapped(*(torch.cat(column, dim=1) for column in zip(*(t.snapped for t in tokens)))),
                       torch.cat([t.straight for t in tokens], dim=1))


class Expert(nn.Module):
    def __init__(self, index: int, width: int, depth: int, heads: int, mlp_ratio: float, code_dim: int):
        super().__init__()
        self.index = index
        self.query = learned_positions(1, 1, width)
        if index > 0:
            self.token_in = nn.Linear(code_dim, width)
            self.token_positions = learned_positions(1, index, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, code_dim)
        init_weights(self)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        init_weights(self, generator)
        with torch.no_grad():
            self.query.normal_(std=0.02, generator=generator)
            if self.index > 0:
                self.token_positions.normal_(std=0.02, generator=generator)

    @torch.no_grad()
    def copy_from(self, source: "Expert") -> None:
        """Start from a trained expert: same blocks, query and head; earlier-token inputs where it has them."""
        self.blocks.load_state_dict(source.blocks.state_dict())
        self.norm.load_state_dict(source.norm.state_dict())
        self.head.load_state_dict(source.head.state_dict())
        self.query.copy_(source.query)
        if source.index > 0:
            self.token_in.load_state_dict(source.token_in.state_dict())
            self.token_positions[:, : source.index] = source.token_positions
            self.token_positions[:, source.index :] = source.token_positions[:, -1:]

    def forward(self, z: Tensor, previous: Tensor) -> Tensor:
        """z [B, N, W], codes of the earlier tokens [B, index, code_dim] -> this token's vector [B, code_dim]."""
        parts = [z]
        if self.index > 0:
            parts.append(self.token_in(previous) + self.token_positions)
        parts.append(self.query.expand(z.shape[0], -1, -1))
        x = torch.cat(parts, dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, last=1)  # only the query position is used
        return self.head(self.norm(x[:, 0]))


class MixtureOfCausalExperts(nn.Module):
    def __init__(self, num_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float, code_dim: int):
        super().__init__()
        self.code_dim = code_dim
        self.experts = nn.ModuleList(
            Expert(i, width, depth, heads, mlp_ratio, code_dim) for i in range(num_tokens)
        )

    def forward(
        self, z: Tensor, quantizer: VectorQuantizer, count: int, prefix: Optional[Tensor] = None
    ) -> Quantized:
        """Tokens 0..count-1, each quantized before the next expert reads it.

        `prefix`: the raw outputs [B, P, code_dim] of experts 0..P-1 for this z, computed earlier (a
        frozen-prefix cache); they are quantized as they are and only experts P..count-1 run.
        The codebook is normalised once and the quantizer's losses are taken once over all tokens (the
        mean over tokens of per-token means): the per-expert work is only what the next expert needs.
        """
        codebook = quantizer.normalized_codebook().float()
        tokens: List[ExpertToken] = []
        if prefix is not None and prefix.shape[1]:
            tokens.append(expert_token(quantizer.snap(prefix, codebook), z.dtype))
        context = tokens[0].straight if tokens else z.new_zeros(z.shape[0], 0, self.code_dim)
        tokens += [token for _, token in self._run(z, codebook, quantizer, context, count)]
        everything = joined(tokens)
        out = quantizer.finish(everything.snapped, z.dtype)
        return Quantized(everything.straight, everything.snapped.ids, out.loss, out.inputs)

    @torch.no_grad()
    def raw_outputs(self, z: Tensor, quantizer: VectorQuantizer, count: int) -> Tensor:
        """What experts 0..count-1 emit before quantization [B, count, code_dim]: a cache's prefix."""
        none = z.new_zeros(z.shape[0], 0, self.code_dim)
        codebook = quantizer.normalized_codebook().float()
        return torch.cat([none] + [output for output, _ in self._run(z, codebook, quantizer, none, count)], dim=1)

    def _run(
        self, z: Tensor, codebook: Tensor, quantizer: VectorQuantizer, context: Tensor, count: int
    ) -> Iterator[Tuple[Tensor, ExpertToken]]:
        """After the tokens whose codes are given, up to token count-1: each raw output [B, 1, code_dim]
        and its token, whose straight-through code joins the context."""
        for expert in self.experts[context.shape[1] : count]:
            output = expert(z, context)[:, None]
            token = expert_token(quantizer.snap(output, codebook), z.dtype)
            context = torch.cat([context, token.straight], dim=1)
            yield output, token

    def grow(self, start: int, stop: int, init: str, generator: Optional[torch.Generator] = None) -> None:
        """Bring experts start..stop-1 into use: copies of expert start-1, or freshly initialised.

        Pass a generator seeded alike on every rank so that fresh experts are identical across ranks.
        """
        for expert in self.experts[start:stop]:
            if init == "copy_last" and start > 0:
                expert.copy_from(self.experts[start - 1])
            else:
                expert.reset_parameters(generator)
