"""`TokenizerLoss`: every term of stage-1 training in one Lightning-free module (as VQGAN's
VQLPIPSWithDiscriminator): pixel, LPIPS perceptual, quantizer, and the PatchGAN with its adaptive weight,
LeCam regularisation and start step.

Images come in [0, 1] (the tokenizer's public scale); every loss is computed on the networks' [-1, 1] scale,
on which the loss values, the L1 scale and the discriminator's inputs are defined.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from nativetok.config.schema import LossConfig
from nativetok.losses.adversarial import LeCam, adaptive_weight, discriminator_hinge_loss, generator_loss
from nativetok.losses.discriminator import PatchDiscriminator
from nativetok.losses.perceptual import load_lpips
from nativetok.losses.reconstruction import pixel_loss
from nativetok.pixels import to_signed

log = logging.getLogger(__name__)

Logs = Dict[str, Tensor]


class TokenizerOutput(Protocol):
    """What the loss reads of a tokenizer's forward (models.tokenizer.TokenizerOutput), named here so that
    losses sit below the models."""

    signed: Tensor  # the reconstruction on the [-1, 1] scale
    quantizer_loss: Tensor


class TokenizerLoss(nn.Module):
    def __init__(self, config: LossConfig, channels: int):
        super().__init__()
        self.config = config
        self.discriminator: Optional[PatchDiscriminator] = (
            PatchDiscriminator(channels, config.discriminator.channels, config.discriminator.layers)
            if config.disc_weight > 0
            else None
        )
        self.lecam = LeCam() if self.discriminator is not None and config.lecam_weight > 0 else None
        # LPIPS is a fixed metric: kept out of the state dict (and checkpoints) on purpose.
        self._perceptual: List[nn.Module] = []
        if config.perceptual_weight > 0:
            self._perceptual.append(load_lpips(config.perceptual.vgg_weights, config.perceptual.lin_weights))
        else:
            log.info(
                "perceptual loss off (loss.perceptual_weight=0): LPIPS needs torchvision's VGG16 weights, "
                "fetched once by hand (data/README.md); set loss.perceptual.vgg_weights to use it"
            )

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms (and a discriminator step) apply at training step `step`."""
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction_loss(self, images: Tensor, out: TokenizerOutput) -> Tensor:
        """The pixel loss of `out` against `images` in [0, 1], on the [-1, 1] scale."""
        return pixel_loss(out.signed, to_signed(images), self.config.pixel)

    def validation_loss(self, images: Tensor, out: TokenizerOutput) -> Tuple[Tensor, Tensor]:
        """(weighted pixel + quantizer loss, pixel loss): what validation reports, without LPIPS or the GAN."""
        rec = self.reconstruction_loss(images, out)
        return self.config.pixel_weight * rec + self.config.quantizer_weight * out.quantizer_loss, rec

    def autoencoder_loss(
        self, images: Tensor, out: TokenizerOutput, last_layer: Tensor, step: int
    ) -> Tuple[Tensor, Logs]:
        """The tokenizer's loss at `step` and its parts (detached, for logging).

        `last_layer` is the decoder's last weight: the adaptive GAN weight balances the gradients there, and
        is 1 when `loss.disc_adaptive` is off or that layer is frozen.
        """
        c = self.config
        rec = self.reconstruction_loss(images, out)
        nll = c.pixel_weight * rec
        logs: Logs = {"train/rec_loss": rec.detach(), "train/quantizer_loss": out.quantizer_loss.detach()}
        if self._perceptual:
            perceptual = self._perceptual[0].to(out.signed.device)(out.signed, to_signed(images))
            nll = nll + c.perceptual_weight * perceptual
            logs["train/perceptual_loss"] = perceptual.detach()
        loss = nll + c.quantizer_weight * out.quantizer_loss
        if self.gan_active(step):
            g_loss = generator_loss(self.discriminator(out.signed))
            weight = (
                adaptive_weight(nll, g_loss, last_layer)
                if c.disc_adaptive and last_layer.requires_grad
                else torch.ones((), device=nll.device)
            )
            loss = loss + c.disc_weight * weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/adaptive_weight": weight})
        logs["train/loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, images: Tensor, out: TokenizerOutput) -> Tuple[Tensor, Logs]:
        """Hinge loss of the discriminator on `images` in [0, 1] (real) and `out`'s reconstruction (fake,
        detached), plus LeCam when on; and its logs."""
        real_logits, fake_logits = self.discriminator(to_signed(images)), self.discriminator(out.signed.detach())
        loss = discriminator_hinge_loss(real_logits, fake_logits)
        if self.lecam is not None:
            loss = loss + self.config.lecam_weight * self.lecam(real_logits, fake_logits)
        return loss, {
            "train/d_loss": loss.detach(),
            "train/logits_real": real_logits.detach().mean(),
            "train/logits_fake": fake_logits.detach().mean(),
        }
