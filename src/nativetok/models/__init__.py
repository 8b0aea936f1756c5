"""Pure-torch models (no Lightning): the transformer block, MIT, MoCET, quantizer, decoder, generators."""

from __future__ import annotations

from typing import Optional

import torch

from nativetok.config.schema import GeneratorConfig, SamplingConfig
from nativetok.models.ar import ARGenerator
from nativetok.models.graphs import Compile
from nativetok.models.maskgit import MaskGITGenerator
from nativetok.models.tokenizer import NativeTokenizer


def build_generator(config: GeneratorConfig, num_classes: int) -> ARGenerator | MaskGITGenerator:
    common = dict(
        codebook_size=config.codebook_size,
        num_tokens=config.num_tokens,
        num_classes=num_classes,
        width=config.width,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        class_dropout=config.class_dropout,
    )
    if config.kind == "ar":
        return ARGenerator(**common)
    if config.kind == "maskgit":
        return MaskGITGenerator(**common, schedule=config.mask_schedule)
    raise ValueError(f"unknown generator kind '{config.kind}': use ar or maskgit")


def generate(
    generator: ARGenerator | MaskGITGenerator,
    labels: torch.Tensor,
    sampling: SamplingConfig,
    seed: int,
    graph: Optional[bool] = None,
    compile: Compile = False,
) -> torch.Tensor:
    """Token ids for `labels` with the sampling settings that apply to the generator's kind.

    `graph` (None: on CUDA) and `compile` choose how each fixed-shape step runs; they never change the tokens.
    """
    common = dict(cfg_scale=sampling.cfg_scale, cfg_schedule=sampling.cfg_schedule, temperature=sampling.temperature,
                  graph=graph, compile=compile)
    if isinstance(generator, MaskGITGenerator):
        return generator.sample(
            labels, steps=sampling.steps, choice_temperature=sampling.choice_temperature, seed=seed, **common
        )
    return generator.sample(labels, top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, **common)


__all__ = ["ARGenerator", "MaskGITGenerator", "NativeTokenizer", "build_generator", "generate"]
