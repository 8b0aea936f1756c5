"""What every class-conditional generator shares, and the registry that builds one from its config.

The trunk (class and token embeddings, the shared transformer blocks, the final norm and head, their
initialisation) lives here once; a kind adds its position encoding, its loss and its sampler. A class embedding's
last row is the null class: label dropout trains it, the unconditional half of guided sampling uses it. The
interface is the same for every kind: `loss(tokens, labels, generator)` and `sample(labels, sampling, seed)`,
each kind reading from a `SamplingConfig` the settings that apply to it (`sampling_fields`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativetok.config.checks import check_sampling_options
from nativetok.config.schema import (
    GENERATOR_KINDS,
    TOKEN_ORDERS,
    GeneratorConfig,
    GuidanceSchedule,
    SamplingConfig,
    TokenOrder,
)
from nativetok.models.graphs import Compile
from nativetok.models.layers import Block, RMSNorm, init_weights
from nativetok.models.pretrained import Pretrained
from nativetok.models.sampling import StepKey

# Settings that `sample` checks as the config and the CLI do (a NaN scale or a top_p of 2 is refused, not run).
SAMPLING_FIELDS = {f.name: f.name for f in fields(SamplingConfig)}
GENERATORS: Dict[str, Type["Generator"]] = {}  # kind (one of GENERATOR_KINDS) -> class, filled by subclassing


class Generator(nn.Module, Pretrained):
    """The shared trunk and interface; a subclass names its kind (`class X(Generator, kind="ar")`) to register.
    The Hub's `from_pretrained` / `save_pretrained` / `push_to_hub` come from `models/pretrained.py`."""

    kind: ClassVar[str]
    pretrained_kind = "generator"
    extra_ids: ClassVar[int] = 0  # token ids past the codebook (MaskGIT's [MASK])
    sampling_fields: ClassVar[Tuple[str, ...]] = ()  # the SamplingConfig fields `sample` reads for this kind

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind not in GENERATOR_KINDS:
            raise ValueError(f"generator kind '{kind}' is not one of {GENERATOR_KINDS}")
        cls.kind = kind
        GENERATORS[kind] = cls

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
        token_order: TokenOrder = "forward",
        order_seed: int = 0,
    ):
        super().__init__()
        self.codebook_size, self.num_tokens, self.num_classes = codebook_size, num_tokens, num_classes
        self.width, self.heads, self.class_dropout = width, heads, class_dropout
        # Made in this order so that parameters, state-dict keys and initial values stay those of checkpoints.
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.token_embed = nn.Embedding(codebook_size + self.extra_ids, width)
        self.add_positions()
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, norm="rms", mlp="swiglu", bias=False) for _ in range(depth)
        )
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, codebook_size, bias=False)
        init_weights(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self._steps: Dict[StepKey, Any] = {}
        self._steps_parameters: Optional[tuple] = None
        # Derived from the config, so not saved: checkpoints and exports keep their keys.
        self.token_order = token_order
        order = generation_order(num_tokens, token_order, order_seed)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse_order", order.argsort(), persistent=False)

    @classmethod
    def from_config(cls, config: GeneratorConfig, num_classes: int) -> "Generator":
        return cls(config.codebook_size, config.num_tokens, num_classes, config.width, config.depth, config.heads,
                   config.mlp_ratio, config.class_dropout, token_order=config.token_order,
                   order_seed=config.order_seed, **cls.config_options(config))

    @classmethod
    def config_options(cls, config: GeneratorConfig) -> Dict[str, Any]:
        """Constructor arguments of this kind only (e.g. MaskGIT's mask schedule)."""
        return {}

    def add_positions(self) -> None:
        """The kind's position encoding, made between the embeddings and the blocks (see `__init__`)."""

    # -- the trunk ----------------------------------------------------------------------------------------------
    def run_blocks(self, x: Tensor, **attention) -> Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, layer=layer, **attention)
        return x

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x))

    @staticmethod
    def token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
        """Cross-entropy (nats, in float32) of each token [B, K] under logits [B, K, V]."""
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view(tokens.shape)

    # -- the interface ------------------------------------------------------------------------------------------
    def loss(
        self, tokens: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        """Mean training loss (nats per token) and its value at each generation position [K], for `tokens` in the
        tokenizer's order; `generator` draws what the kind draws at random (a kind that draws nothing ignores it)."""
        return self.sequence_loss(self.to_generation_order(tokens), labels, generator)

    def sequence_loss(
        self, tokens: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[Tensor, Tensor]:
        """The kind's loss on sequences already in generation order."""
        raise NotImplementedError

    def to_generation_order(self, tokens: Tensor) -> Tensor:
        """[B, K] ids in the tokenizer's order -> the order this generator models."""
        return tokens if self.token_order == "forward" else tokens[:, self.order]

    def to_tokenizer_order(self, tokens: Tensor) -> Tensor:
        """The inverse of `to_generation_order`: what the tokenizer decodes."""
        return tokens if self.token_order == "forward" else tokens[:, self.inverse_order]

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        sampling: Optional[SamplingConfig] = None,
        seed: int = 0,
        graph: Optional[bool] = None,
        compile: Compile = False,
        **options: Any,
    ):
        """Token ids [B, K] for class `labels` [B]; the same seed gives the same tokens.

        Settings: the kind's defaults, replaced by the `sampling_fields` of `sampling` when given, replaced by
        keyword `options` (single settings, or the kind's own such as AR's `use_cache`). `graph` replays each
        fixed-shape step from a CUDA graph (None: on CUDA); `compile` compiles it (True, or torch.compile
        options such as {"backend": "aot_eager"}). A graph replays the eager kernels and gives the same tokens;
        so does compiled code that keeps eager's rounding (aot_eager; inductor may fuse).
        """
        chosen = {name: getattr(sampling, name) for name in self.sampling_fields} if sampling is not None else {}
        settings = {**chosen, **options}
        check_sampling_options({k: v for k, v in settings.items() if k in SAMPLING_FIELDS}, SAMPLING_FIELDS)
        return self.to_tokenizer_order(self.sample_tokens(labels, seed=seed, graph=graph, compile=compile, **settings))

    def sample_tokens(self, labels: Tensor, *, seed: int, graph: Optional[bool], compile: Compile, **settings):
        """The kind's sampler, with every setting by keyword (`sample` chooses them)."""
        raise NotImplementedError

    # -- what samplers share ------------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Replace labels by the null class with probability class_dropout (training for guidance)."""
        if self.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def sampling_rows(self, labels: Tensor, cfg_scale: float, cfg_schedule: GuidanceSchedule) -> tuple[Tensor, bool]:
        """The class of each row of a sampling batch, and whether it is guided.

        Guidance runs whenever it can change the result (scale != 1 or a schedule): the conditional rows
        then have, below them, the same rows with the null class.
        """
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):  # the one host sync of a sampling call
            raise ValueError(f"class ids must be in [0, {self.num_classes}), got {labels.tolist()}")
        guided = cfg_scale != 1.0 or cfg_schedule != "constant"
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        return rows, guided

    def sampling_start(
        self, labels: Tensor, cfg_scale: float, cfg_schedule: GuidanceSchedule, seed: int
    ) -> tuple[Tensor, bool, torch.Generator]:
        """`sampling_rows`, and the seeded generator (on the labels' device) that every draw of the call uses."""
        rows, guided = self.sampling_rows(labels, cfg_scale, cfg_schedule)
        return rows, guided, torch.Generator(device=labels.device).manual_seed(seed)

    def sampling_step(self, key: StepKey, build: Callable[[], Any]) -> Any:
        """The step `build` makes for `key`, kept on the module (CUDA graphs and compiled code are costly to make)
        for as long as the parameters are the same tensors: moving or converting the module drops them all."""
        parameters = tuple((p.device, p.dtype, p.data_ptr()) for p in self.parameters())
        if parameters != self._steps_parameters:
            self._steps, self._steps_parameters = {}, parameters
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def __getstate__(self):
        """Copies and pickles leave the sampling steps (CUDA graphs, compiled code) behind."""
        return {**super().__getstate__(), "_steps": {}, "_steps_parameters": None}


def generation_order(num_tokens: int, token_order: TokenOrder, seed: int = 0) -> Tensor:
    """Position i of the generated sequence holds tokenizer position order[i]: forward, reversed, or one fixed
    permutation drawn from `seed` on the CPU (the same on every machine)."""
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token order '{token_order}' is not one of {TOKEN_ORDERS}")
    if token_order == "reversed":
        return torch.arange(num_tokens - 1, -1, -1)
    if token_order == "permuted":
        return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))
    return torch.arange(num_tokens)


def build_generator(config: GeneratorConfig, num_classes: int) -> Generator:
    """The generator of `config.kind`, from the registry."""
    if config.kind not in GENERATORS:
        raise ValueError(f"unknown generator kind '{config.kind}': use {' or '.join(GENERATOR_KINDS)}")
    if config.codebook_size is None or config.num_tokens is None:
        raise ValueError("generator.codebook_size and generator.num_tokens are unset: they are the tokenizer's "
                         "(nativetok.checkpoints.with_tokenizer_sizes reads them from generator.tokenizer)")
    return GENERATORS[config.kind].from_config(config, num_classes)
