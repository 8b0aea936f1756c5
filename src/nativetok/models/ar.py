"""Autoregressive class-conditional generator over token sequences (LlamaGen-style).

RMSNorm, rotary positions, SwiGLU MLPs (the shared transformer block), a class embedding as the first
position with a null class for classifier-free guidance, and sampling with a KV cache: the conditional
and unconditional halves run as one batch and their logits are mixed at every step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativetok.models.layers import Block, KVCache, RMSNorm, Rotary, init_weights
from nativetok.models.sampling import ClassConditional, draw, guidance_scale, guide


class ARGenerator(ClassConditional):
    def __init__(
        self,
        codebook_size: int,
        num_tokens: int,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
    ):
        super().__init__(codebook_size, num_tokens, num_classes, width, class_dropout)
        self.heads = heads
        self.token_embed = nn.Embedding(codebook_size, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, norm="rms", mlp="swiglu", bias=False) for _ in range(depth)
        )
        self.rotary = Rotary(width // heads, num_tokens)
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, codebook_size, bias=False)
        init_weights(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)

    def _run(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, causal=True, rotary=self.rotary, cache=cache, layer=layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.norm(x))

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: logits [B, K, V] where position i predicts token i from the class and tokens < i."""
        x = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens[:, :-1])], dim=1)
        return self._run(x)

    def loss(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy (nats per token) and its value at each position [K]."""
        logits = self(tokens, labels)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
        per_position = per_token.view(tokens.shape).mean(0)
        return per_position.mean(), per_position

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        cfg_scale: float = 1.0,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        use_cache: bool = True,
    ) -> Tensor:
        """Token ids [B, K] for class `labels` [B]; the same seed gives the same tokens.

        `use_cache=False` recomputes the whole prefix at every step (the reference the KV cache must match).
        """
        rows, guided = self.sampling_rows(labels, cfg_scale, cfg_schedule)
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        width = self.token_embed.embedding_dim
        cache = (
            KVCache(len(self.blocks), len(rows), self.heads, self.num_tokens, width // self.heads,
                    labels.device, self.token_embed.weight.dtype)
            if use_cache
            else None
        )
        step_input = prefix = self.class_embed(rows)[:, None]
        out = []
        for i in range(self.num_tokens):
            logits = self._run(step_input, cache)[:, -1] if use_cache else self._run(prefix)[:, -1]
            if guided:
                logits = guide(logits, guidance_scale(cfg_scale, cfg_schedule, (i + 1) / self.num_tokens))
            token = draw(logits, temperature, top_k, top_p, generator)
            out.append(token)
            step_input = self.token_embed(torch.cat([token, token]) if guided else token)[:, None]
            if not use_cache:
                prefix = torch.cat([prefix, step_input], dim=1)
        return torch.stack(out, dim=1)
