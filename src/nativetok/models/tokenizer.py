"""NativeTokenizer = MIT + token producer (MoCET, or latent tokens for the baselines) + VQ + decoder.

Kinds (the comparison of the paper, like for like), one small subclass each, built by `build_tokenizer`:
- `nativetok`: Z from the MIT, then one causal expert per token (MoCET); experts can be grown (HNT).
- `parallel`: TiTok-style; learned latent tokens ride along with the patches through the MIT with full
  attention and become all tokens at once.
- `causal_mask`: the same, but latent token i attends only to the patches and to latents <= i (and the
  patches do not attend to the latents), so the order is causal by masking alone.

Every public method takes and returns images in [0, 1]; the networks work in [-1, 1] (`pixels.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from nativetok.config.schema import TOKENIZER_KINDS, GrowthInit, TokenizerConfig, TokenizerKind, TrainablePart
from nativetok.models.decoder import PixelDecoder
from nativetok.models.layers import learned_positions
from nativetok.models.mit import MetaImageTransformer
from nativetok.models.mocet import MixtureOfCausalExperts
from nativetok.models.prefix_cache import FrozenPrefixCache
from nativetok.models.pretrained import Pretrained
from nativetok.models.quantizer import Quantized, VectorQuantizer
from nativetok.pixels import to_signed, to_unit

# How far outside [0, 1] `encode` lets pixel values be (rounding in the caller's resizing or normalising).
PIXEL_TOLERANCE = 1e-3


@dataclass
class TokenizerOutput:
    signed: Tensor  # [B, C, H, W] the decoder's output in about [-1, 1]: the scale the losses use
    ids: Tensor  # [B, active tokens]
    quantizer_loss: Tensor
    vectors: Tensor  # [B, active tokens, code_dim] normalised encoder outputs before quantization

    @property
    def reconstruction(self) -> Tensor:
        """[B, C, H, W] in about [0, 1] (unclamped: training sees what the decoder produced)."""
        return to_unit(self.signed)


class LatentTokens(nn.Module):
    """The baselines' learned latent tokens, appended to the patches inside the MIT."""

    def __init__(self, num_tokens: int, num_patches: int, width: int, causal: bool):
        super().__init__()
        self.tokens = learned_positions(1, num_tokens, width)
        mask = None
        if causal:
            total = num_patches + num_tokens
            mask = torch.zeros(total, total, dtype=torch.bool)
            mask[:, :num_patches] = True  # everyone sees the patches; patches see only patches
            mask[num_patches:, num_patches:] = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)


TOKENIZERS: Dict[str, Type["NativeTokenizer"]] = {}  # kind (one of TOKENIZER_KINDS) -> class, filled by subclassing


def prefix_lengths(count: int) -> List[int]:
    """The prefix lengths k at which a tokenizer of `count` tokens is shown and measured: 1, 2, 4, ... below
    `count` (a log scale, as a prefix's quality grows roughly with the log of its length), then `count`."""
    return [1 << i for i in range(max(count - 1, 0).bit_length())] + ([count] if count > 0 else [])


class NativeTokenizer(nn.Module, Pretrained):
    """What every kind shares: MIT, quantizer, decoder, the public encode/decode/forward and the HNT parts, and the
    Hub's `from_pretrained` / `save_pretrained` / `push_to_hub` (`models/pretrained.py`).

    A subclass per kind adds the token producer between MIT and quantizer; naming its kind
    (`class X(NativeTokenizer, kind="parallel")`) registers it for `build_tokenizer`, as generators do.
    """

    kind: ClassVar[TokenizerKind]
    pretrained_kind = "tokenizer"

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind not in TOKENIZER_KINDS or kind in TOKENIZERS:
            raise ValueError(f"tokenizer kind '{kind}' is not one of {TOKENIZER_KINDS} or is registered twice")
        cls.kind = kind
        TOKENIZERS[kind] = cls

    def __init__(self, config: TokenizerConfig, image_size: int, channels: int):
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.channels = channels
        self.num_tokens = config.num_tokens
        q = config.quantizer
        self.mit = MetaImageTransformer(
            image_size, channels, config.patch_size, config.mit.width, config.mit.depth, config.mit.heads,
            config.mit.mlp_ratio, config.latent_width,
        )
        self._build_producer(config)  # after the MIT and before the quantizer: the order weights are drawn in
        self.quantizer = VectorQuantizer(q.codebook_size, q.code_dim, q.commitment)
        d = config.decoder
        self.decoder = PixelDecoder(
            image_size, channels, config.patch_size, config.num_tokens, q.code_dim, d.width, d.depth, d.heads,
            d.mlp_ratio,
        )
        # Tokens produced so far: grows with Hierarchical Native Training. A Python int (reading it never
        # waits for the GPU), saved in the state dict as extra state.
        self.num_active = config.num_tokens

    def _build_producer(self, config: TokenizerConfig) -> None:
        raise TypeError("NativeTokenizer is the base of the tokenizer kinds: build one with build_tokenizer")

    def get_extra_state(self) -> dict:
        return {"active_tokens": self.num_active}

    def set_extra_state(self, state: dict) -> None:
        self.num_active = int(state["active_tokens"])

    # -- tokens ---------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Shape and dtype: metadata only, so the training forward reads nothing back from the device."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [B, {expected[0]}, {expected[1]}, {expected[2]}] for this tokenizer, "
                f"got {list(images.shape)}"
            )
        if not images.is_floating_point():
            hint = " (uint8 images: .float() / 255)" if images.dtype == torch.uint8 else ""
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}{hint}")

    @staticmethod
    def check_pixel_values(images: Tensor) -> None:
        """Finite and in [0, 1]: other values give wrong tokens without any error. One reduction and one read
        back, which CUDA graph capture and torch.compile cannot do: they skip it."""
        if images.numel() == 0 or torch.compiler.is_compiling():
            return
        if images.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        low, high = torch.stack(torch.aminmax(images)).tolist()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("images must be finite, got NaN or infinite values")
        if low < -PIXEL_TOLERANCE or high > 1 + PIXEL_TOLERANCE:
            hint = " (images in 0..255: divide them by 255)" if high > 2 else ""
            raise ValueError(f"images must be in [0, 1], got values from {low:.4g} to {high:.4g}{hint}")

    def quantize(
        self, images: Tensor, cache: Optional[FrozenPrefixCache] = None, views: Optional[Sequence[str]] = None
    ) -> Quantized:
        """The encoder on the networks' scale, for the forward, CUDA graphs and benchmarks: images in
        [-1, 1] (not the public [0, 1]) -> the quantized active tokens. With a cache, Z and the frozen
        experts' outputs come from it for the views it holds (`frozen_prefix` says when that is valid)."""
        raise NotImplementedError

    def frozen_prefix(self) -> Optional[int]:
        """What a prefix cache may hold now: None when nothing this kind computes can be cached."""
        return None

    def forward(
        self,
        images: Tensor,
        lengths: Optional[Tensor] = None,
        cache: Optional[FrozenPrefixCache] = None,
        views: Optional[Sequence[str]] = None,
        encoder: Optional[Callable[[Tensor], Quantized]] = None,
    ) -> TokenizerOutput:
        """images in [0, 1] -> reconstruction in about [0, 1], unclamped (decoded from `lengths` tokens per
        sample); the output also keeps the decoder's [-1, 1] result, which the losses use.

        With a `cache` and one name per image view, Z and the frozen experts' outputs are reused.
        `encoder` replaces `quantize` (a captured `EncoderGraph` of this tokenizer).
        """
        self.check_images(images)
        signed = to_signed(images)
        tokens = encoder(signed) if encoder is not None else self.quantize(signed, cache, views)
        return TokenizerOutput(self.decoder(tokens.codes, lengths), tokens.ids, tokens.loss, tokens.inputs)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images float [B, C, H, W] in [0, 1] -> token ids LongTensor [B, active tokens]. Float images of another
        precision than the weights' (float64, half) are converted to it."""
        self.check_images(images)
        self.check_pixel_values(images)
        return self.quantize(to_signed(images.to(next(self.parameters()).dtype))).ids

    @torch.no_grad()
    def decode(self, ids: Tensor, k: Optional[int] = None) -> Tensor:
        """ids [B, n] -> images in [0, 1] (clamped), from the first k tokens (default: all n given). Only the
        active experts' tokens mean anything: more ids than `num_active` are refused."""
        if ids.dim() != 2 or ids.shape[1] > self.num_active:
            raise ValueError(f"ids must be [B, n] with n <= {self.num_active} (the tokenizer's active tokens), "
                             f"got {list(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor of token ids, got dtype {ids.dtype}")
        if k is not None:
            if not 0 <= k <= ids.shape[1]:
                raise ValueError(f"k={k} is outside the {ids.shape[1]} tokens given")
            ids = ids[:, :k]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.quantizer.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.quantizer.codebook_size})")
        images = self.decoder(self.quantizer.lookup(ids.long()))
        return to_unit(images.float()).clamp(0, 1)  # float32 under autocast too

    # -- Hierarchical Native Training -------------------------------------------------------------
    def set_active(self, count: int) -> None:
        """Use the first `count` experts, as they are (no initialisation): the start of a schedule."""
        if not 1 <= count <= self.num_tokens:
            raise ValueError(f"cannot use {count} experts: the tokenizer has {self.num_tokens} tokens")
        self.num_active = count

    def grow(self, count: int, init: GrowthInit, generator: Optional[torch.Generator] = None) -> None:
        """Bring experts into use up to `count` (new ones initialised per `init`)."""
        raise ValueError(f"a '{self.kind}' tokenizer has no experts to grow")

    def parts(self) -> Dict[str, List[nn.Parameter]]:
        """Parameters by the names a growth schedule uses; experts listed one by one as expert.<i>."""
        groups: Dict[str, List[nn.Parameter]] = {"mit": list(self.mit.parameters())}
        self._producer_parts(groups)
        groups["codebook"] = [self.quantizer.codebook]
        groups["decoder"] = list(self.decoder.parameters())
        return groups

    def _producer_parts(self, groups: Dict[str, List[nn.Parameter]]) -> None:
        """Add the token producer's parameters to `groups` (after the MIT's, before the codebook)."""
        raise NotImplementedError

    def set_trainable(self, new_experts: range, train: Sequence[TrainablePart]) -> List[str]:
        """Train the experts in `new_experts` and the listed parts; freeze everything else.

        `train` holds any of TRAINABLE_PARTS (all, mit, old_experts, codebook, decoder). Experts not yet
        active are frozen too. Returns the names of the frozen parts.
        """
        frozen = []
        for name, params in self.parts().items():
            if name.startswith("expert."):
                index = int(name.split(".")[1])
                trains = index < self.num_active and (
                    index in new_experts or "all" in train or ("old_experts" in train and index < new_experts.start)
                )
            else:
                trains = "all" in train or name in train
            for p in params:
                p.requires_grad_(trains)
            if not trains:
                frozen.append(name)
        return frozen

    def parameter_counts(self) -> Dict[str, int]:
        counts = {"total": sum(p.numel() for p in self.parameters())}
        for name, params in self.parts().items():
            key = "experts" if name.startswith("expert.") else name
            counts[key] = counts.get(key, 0) + sum(p.numel() for p in params)
        return counts


class ExpertTokenizer(NativeTokenizer, kind="nativetok"):
    """NativeTok: Z from the MIT, then one causal expert per token (MoCET), grown by HNT."""

    def _build_producer(self, config: TokenizerConfig) -> None:
        e = config.experts
        self.experts = MixtureOfCausalExperts(
            config.num_tokens, config.latent_width, e.depth, e.heads, e.mlp_ratio, config.quantizer.code_dim
        )

    def quantize(
        self, images: Tensor, cache: Optional[FrozenPrefixCache] = None, views: Optional[Sequence[str]] = None
    ) -> Quantized:
        if cache is None:
            return self.experts(self.mit(images), self.quantizer, self.num_active)
        z, prefix = self._cached(images, cache, views)
        return self.experts(z, self.quantizer, self.num_active, prefix)

    def _cached(
        self, images: Tensor, cache: FrozenPrefixCache, views: Optional[Sequence[str]]
    ) -> Tuple[Tensor, Tensor]:
        """Z and the cached experts' raw outputs for a batch: stored ones reused, missing ones computed."""
        if views is None or len(views) != images.shape[0]:
            raise ValueError("a prefix cache needs one view name per image")
        frozen = self.frozen_prefix()
        if frozen is None or cache.prefix > frozen:
            raise RuntimeError(
                f"the prefix cache holds {cache.prefix} experts' outputs but {frozen} are fixed now: "
                "reset it whenever what is frozen changes"
            )
        entries = cache.get(views)
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            with torch.no_grad():
                z = self.mit(images[torch.tensor(missing, device=images.device)])
                prefix = self.experts.raw_outputs(z, self.quantizer, cache.prefix)
            for row, i in enumerate(missing):
                entries[i] = cache.put(views[i], z[row], prefix[row])
        return torch.stack([entry[0] for entry in entries]), torch.stack([entry[1] for entry in entries])

    def frozen_prefix(self) -> Optional[int]:
        """None while the MIT trains (Z moves), else how many leading active experts have fixed outputs for
        a fixed view (0 while the codebook trains: their contexts move)."""
        if any(p.requires_grad for p in self.mit.parameters()):
            return None
        if self.quantizer.codebook.requires_grad:
            return 0
        count = 0
        for expert in self.experts.experts[: self.num_active]:
            if any(p.requires_grad for p in expert.parameters()):
                break
            count += 1
        return count

    def grow(self, count: int, init: GrowthInit, generator: Optional[torch.Generator] = None) -> None:
        if not 1 <= count <= self.num_tokens:
            raise ValueError(f"cannot grow to {count} experts: the tokenizer has {self.num_tokens} tokens")
        if count > self.num_active:
            self.experts.grow(self.num_active, count, init, generator)
        self.num_active = count

    def _producer_parts(self, groups: Dict[str, List[nn.Parameter]]) -> None:
        for i, expert in enumerate(self.experts.experts):
            groups[f"expert.{i}"] = list(expert.parameters())


class ParallelTokenizer(NativeTokenizer, kind="parallel"):
    """TiTok-style: learned latent tokens ride along with the patches through the MIT (full attention)."""

    causal = False

    def _build_producer(self, config: TokenizerConfig) -> None:
        self.latents = LatentTokens(config.num_tokens, self.mit.num_patches, config.mit.width, causal=self.causal)
        self.token_head = nn.Linear(config.latent_width, config.quantizer.code_dim)

    def quantize(
        self, images: Tensor, cache: Optional[FrozenPrefixCache] = None, views: Optional[Sequence[str]] = None
    ) -> Quantized:
        """(No cache: every token depends on the MIT, so nothing is ever frozen upstream of a token.)"""
        z = self.mit(images, extra=self.latents.tokens, mask=self.latents.mask)
        return self.quantizer(self.token_head(z[:, self.mit.num_patches :]))

    def set_active(self, count: int) -> None:
        if count != self.num_tokens:
            raise ValueError(f"a '{self.kind}' tokenizer always produces all {self.num_tokens} tokens")
        super().set_active(count)

    def _producer_parts(self, groups: Dict[str, List[nn.Parameter]]) -> None:
        groups["mit"] += list(self.latents.parameters()) + list(self.token_head.parameters())


class CausalMaskTokenizer(ParallelTokenizer, kind="causal_mask"):
    """The parallel baseline with latent token i seeing only the patches and latents <= i."""

    causal = True


def build_tokenizer(config: TokenizerConfig, image_size: int, channels: int) -> NativeTokenizer:
    """The tokenizer of kind `config.kind` (one of TOKENIZER_KINDS)."""
    if config.kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind '{config.kind}': use one of {', '.join(TOKENIZER_KINDS)}")
    return TOKENIZERS[config.kind](config, image_size, channels)
