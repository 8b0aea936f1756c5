"""The one transformer block every model here is built from, and its parts.

Pre-norm residual block: attention through `scaled_dot_product_attention`, then an MLP (GELU or SwiGLU),
with LayerNorm or RMSNorm. Two options serve the models' special needs:
- `last=n` computes only the last n positions as queries (keys and values still come from all positions):
  an expert only needs its output at the query position, so its last layer is computed there alone.
- `rotary` (cos and sin tables from `Rotary.tables`) rotates queries and keys by their positions, and `cache`
  (a `KVCache`) stores the keys and values of one decoding position and attends over all of them, under the
  caller's `mask`: every decoding step then has the same shapes (what CUDA graphs and torch.compile need).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return RMSNorm(dim)
    raise ValueError(f"unknown norm '{kind}': use layer or rms")


class Rotary(nn.Module):
    """Rotary position embedding over interleaved (even, odd) pairs of channels, as tables for positions
    0..length-1: `cos` holds each pair's cosine twice and `sin` its sine signed (-, +), so that a rotation is a
    flip and three elementwise ops (`rotate_pairs`) rather than a split, four products, two sums and a stack."""

    def __init__(self, head_dim: int, length: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(length).float(), inv_freq)
        self.register_buffer("cos", angles.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin", torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2), persistent=False)

    def tables(self, positions: Tensor | slice) -> tuple[Tensor, Tensor]:
        """cos and sin [T, Dh] at `positions` (a slice, or a long tensor on the device: no host sync)."""
        return self.cos[positions], self.sin[positions]


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (even, odd) channel pair of x [..., T, Dh] by the angles of `Rotary.tables` [T, Dh].

    Per pair (a, b): (a cos - b sin, a sin + b cos), rounded op by op exactly like the split-and-stack form.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) in place of each (a, b)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class KVCache(NamedTuple):
    """Keys and values [rows, heads, length, head_dim] of every layer, preallocated for a whole sequence, and the
    position that the next decoding step writes: a long tensor [1] on the device that the sampling loop sets in
    place, so that no step depends on a Python number (one CUDA graph, one compiled graph serve every step)."""

    keys: List[Tensor]
    values: List[Tensor]
    position: Tensor
    causal: Tensor  # additive attention masks [length, length]: row p is 0 up to p and -inf after it

    @classmethod
    def allocate(cls, layers: int, rows: int, heads: int, length: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (rows, heads, length, head_dim)
        later = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)],
            torch.zeros(1, dtype=torch.long, device=device),
            torch.zeros(length, length, device=device, dtype=dtype).masked_fill_(later, float("-inf")),
        )

    def mask(self) -> Tensor:
        """The attention mask [1, length] of the step at `position`: it sees the positions written so far."""
        return self.causal.index_select(0, self.position)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's k, v [rows, heads, 1, head_dim]; return the layer's whole keys and values."""
        self.keys[layer].index_copy_(2, self.position, k)
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Optional[Tensor] = None,
        causal: bool = False,
        last: Optional[int] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
    ) -> Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        if last is None:
            q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        else:  # queries only for the last positions; keys and values for all
            w_q, w_kv = self.qkv.weight.split((dim, 2 * dim))
            b_q, b_kv = self.qkv.bias.split((dim, 2 * dim)) if self.qkv.bias is not None else (None, None)
            q = F.linear(x[:, -last:], w_q, b_q).view(batch, last, self.heads, head_dim).transpose(1, 2)
            k, v = F.linear(x, w_kv, b_kv).view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = rotary
            k = rotate_pairs(k, cos, sin)
            queries = q.shape[-2]
            q = rotate_pairs(q, cos, sin) if queries == length else rotate_pairs(q, cos[-queries:], sin[-queries:])
        if cache is not None:
            k, v = cache.store(layer, k, v)
        # A causal mask over a query block that is shorter than the keys must be offset: SDPA's
        # is_causal aligns the top-left corners, so pass an explicit mask in that case.
        if causal and q.shape[-2] != k.shape[-2]:
            mask = causal_mask(q.shape[-2], k.shape[-2], x.device)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(batch, q.shape[-2], dim))


def causal_mask(queries: int, keys: int, device=None) -> Tensor:
    """Boolean [queries, keys] mask for the last `queries` of `keys` positions (True: may attend)."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str = "gelu"):
        super().__init__()
        self.kind = kind
        if kind == "gelu":
            self.up = nn.Linear(dim, hidden)
            self.down = nn.Linear(hidden, dim)
        elif kind == "swiglu":
            self.up = nn.Linear(dim, 2 * hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)
        else:
            raise ValueError(f"unknown MLP '{kind}': use gelu or swiglu")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu":
            return self.down(F.gelu(self.up(x)))
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "layer", mlp: str = "gelu", bias: bool = True
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if mlp == "swiglu":  # same parameter count as a GELU MLP of the same ratio, rounded to 8
            hidden = 8 * math.ceil(2 * hidden / 3 / 8)
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, bias=bias)
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, hidden, mlp)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Optional[Tensor] = None,
        causal: bool = False,
        last: Optional[int] = None,
        rotary: Optional[tuple[Tensor, Tensor]] = None,
        cache: Optional[KVCache] = None,
        layer: int = 0,
    ) -> Tensor:
        attended = self.attn(
            self.norm1(x), mask=mask, causal=causal, last=last, rotary=rotary, cache=cache, layer=layer
        )
        x = (x if last is None else x[:, -last:]) + attended
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """ViT-style initialisation: truncated normal (std 0.02) linears, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def learned_positions(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.02)
