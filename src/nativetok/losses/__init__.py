"""Stage-1 losses: pixel, perceptual (LPIPS-VGG), adversarial (hinge, adaptive weight, LeCam, the PatchGAN
discriminator), and `TokenizerLoss`, which combines them."""

from nativetok.losses.adversarial import LeCam, adaptive_weight, discriminator_hinge_loss, generator_loss
from nativetok.losses.discriminator import PatchDiscriminator
from nativetok.losses.perceptual import LPIPS, load_lpips
from nativetok.losses.reconstruction import pixel_loss
from nativetok.losses.tokenizer_loss import TokenizerLoss

__all__ = [
    "LPIPS", "LeCam", "PatchDiscriminator", "TokenizerLoss", "adaptive_weight", "discriminator_hinge_loss",
    "generator_loss", "load_lpips", "pixel_loss",
]
