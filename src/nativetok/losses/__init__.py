"""Stage-1 losses: pixel, perceptual (LPIPS-VGG), adversarial (hinge, adaptive weight, LeCam, the PatchGAN
discriminator), and `TokenizerLoss`, which combines them."""

from nativetok.losses.perceptual import LPIPS, load_lpips
from nativetok.losses.tokenizer_loss import (
    LeCam,
    PatchDiscriminator,
    TokenizerLoss,
    adaptive_weight,
    discriminator_hinge_loss,
    generator_loss,
    pixel_loss,
)

__all__ = [
    "LPIPS", "LeCam", "PatchDiscriminator", "TokenizerLoss", "adaptive_weight", "discriminator_hinge_loss",
    "generator_loss", "load_lpips", "pixel_loss",
]
