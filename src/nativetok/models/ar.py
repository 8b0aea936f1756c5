"""Autoregressive class-conditional generator over token sequences (LlamaGen-style).

RMSNorm, rotary positions, SwiGLU MLPs (the shared trunk of `generator.py`), a class embedding as the first
position with a null class for classifier-free guidance. Sampling decodes one position per step with a static
KV cache: every step has the same shapes and reads its position from a device tensor, so on CUDA one recorded
CUDA graph replays every step (or torch.compile compiles the step once). The conditional and unconditional
halves run as one batch; mixing their logits and drawing tokens stay eager, outside the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nativetok.config.schema import GuidanceSchedule
from nativetok.models.generator import Generator
from nativetok.models.graphs import Compile, FixedShapeStep
from nativetok.models.layers import KVCache, Rotary
from nativetok.models.sampling import draw, guidance_scale, guide, step_key


class ARGenerator(Generator, kind="ar"):
    sampling_fields = ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")

    def add_positions(self) -> None:
        """Rotary tables (buffers that checkpoints do not hold)."""
        self.rotary = Rotary(self.width // self.heads, self.num_tokens)

    def _run(self, x: Tensor, **attention) -> Tensor:
        return self.logits(self.run_blocks(x, **attention))

    def _causal(self, x: Tensor) -> Tensor:
        """Logits at every position of the embedded sequence x [B, T, W] (positions 0..T-1)."""
        return self._run(x, causal=True, rotary=self.rotary.tables(slice(0, x.shape[1])))

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: logits [B, K, V] where position i predicts token i from the class and tokens < i."""
        return self._causal(torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens[:, :-1])], dim=1))

    def sequence_loss(
        self, tokens: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy (nats per token) and its value at each position [K]; draws nothing (`generator` is
        accepted for the shared interface)."""
        per_position = self.token_losses(self(tokens, labels), tokens).mean(0)
        return per_position.mean(), per_position

    def decode_step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Logits [rows, V] of the token that follows x [rows, 1, W], the embedding at position `cache.position`.

        Stores that position's keys and values and attends over the whole cache, masked after the position: the
        shapes never depend on the position. Rotary tables are cast once here, not in every layer.
        """
        dtype = cache.keys[0].dtype
        cos, sin = self.rotary.tables(cache.position)
        return self._run(x, mask=cache.mask(), rotary=(cos.to(dtype), sin.to(dtype)), cache=cache)[:, 0]

    def _decoder(self, rows: Tensor, graph: Optional[bool], compile: Compile) -> tuple[FixedShapeStep, KVCache]:
        """The decode step for `rows` rows with its static KV cache, made once per rows count, autocast state,
        graph and compile setting (and kept until the parameters move)."""
        key = step_key(rows.device, len(rows), graph, compile)

        def build() -> tuple[FixedShapeStep, KVCache]:
            cache = KVCache.allocate(len(self.blocks), len(rows), self.heads, self.num_tokens,
                                     self.width // self.heads, rows.device,
                                     key.autocast or self.token_embed.weight.dtype)
            example = self.class_embed(rows)[:, None]
            step = FixedShapeStep(self.decode_step, [example], graph=key.graph, compile=compile, state=(cache,))
            return step, cache

        return self.sampling_step(key, build)

    def sample_tokens(
        self,
        labels: Tensor,
        *,
        seed: int,
        graph: Optional[bool],
        compile: Compile,
        cfg_scale: float = 1.0,
        cfg_schedule: GuidanceSchedule = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> Tensor:
        """One position per step. `use_cache=False` recomputes the whole prefix at every step (the reference the
        KV cache must match); `graph` and `compile` apply to the cached decode step."""
        rows, guided, generator = self.sampling_start(labels, cfg_scale, cfg_schedule, seed)
        if use_cache:
            step, cache = self._decoder(rows, graph, compile)
        x = prefix = self.class_embed(rows)[:, None]
        out = []
        for i in range(self.num_tokens):
            if use_cache:
                cache.position.fill_(i)
                logits = step(x)
            else:
                logits = self._causal(prefix)[:, -1]
            if guided:
                logits = guide(logits, guidance_scale(cfg_scale, cfg_schedule, (i + 1) / self.num_tokens))
            token = draw(logits, temperature, top_k, top_p, generator)
            out.append(token)
            x = self.token_embed(torch.cat([token, token]) if guided else token)[:, None]
            if not use_cache:
                prefix = torch.cat([prefix, x], dim=1)
        return torch.stack(out, dim=1)
