"""`TokenizerLoss`: every term of stage-1 training in one Lightning-free file (as taming's `vqperceptual.py`):
pixel, quantizer, the hinge GAN losses with VQGAN's adaptive weight and LeCam regularisation, and the PatchGAN
discriminator (as in pix2pix / taming-transformers: one real/fake logit per image patch; GroupNorm instead of
BatchNorm gives the same result on every DDP rank without synchronised statistics). LPIPS, which loads its own
weights, is in `perceptual.py`.

Images come in [0, 1] (the tokenizer's public scale); every loss is computed on the networks' [-1, 1] scale,
on which the loss values, the L1 scale and the discriminator's inputs are defined.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativetok.config.schema import PIXEL_LOSSES, LossConfig, PixelLoss
from nativetok.losses.perceptual import load_lpips
from nativetok.pixels import to_signed

log = logging.getLogger(__name__)

Logs = Dict[str, Tensor]


def pixel_loss(reconstruction: Tensor, target: Tensor, kind: PixelLoss = "l1") -> Tensor:
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"unknown pixel loss '{kind}': use {' or '.join(PIXEL_LOSSES)}")


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss: Tensor, generator_loss: Tensor, last_layer: Tensor) -> Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer, so neither loss swamps the other."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021): keeps discriminator outputs near their running means."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("real_mean", torch.zeros(()))
        self.register_buffer("fake_mean", torch.zeros(()))

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        with torch.no_grad():
            self.real_mean.lerp_(real_logits.mean().float(), 1 - self.decay)
            self.fake_mean.lerp_(fake_logits.mean().float(), 1 - self.decay)
        return F.relu(real_logits - self.fake_mean).pow(2).mean() + F.relu(self.real_mean - fake_logits).pow(2).mean()


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per image patch."""

    def __init__(self, channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        current = width
        for i in range(1, layers):
            out = width * min(2**i, 8)
            modules += [nn.Conv2d(current, out, 4, 2, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            current = out
        out = width * min(2**layers, 8)
        modules += [nn.Conv2d(current, out, 4, 1, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
        modules.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.net = nn.Sequential(*modules)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: Tensor) -> Tensor:
        """images in [-1, 1] -> logits [B, 1, h, w]."""
        return self.net(images)


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
