"""Stage-1 losses: pixel, perceptual (LPIPS-VGG) and adversarial (hinge, adaptive weight, LeCam)."""

from nativetok.losses.adversarial import LeCam, adaptive_weight, discriminator_hinge_loss, generator_loss
from nativetok.losses.perceptual import LPIPS, load_lpips
from nativetok.losses.reconstruction import pixel_loss

__all__ = [
    "LPIPS", "LeCam", "adaptive_weight", "discriminator_hinge_loss", "generator_loss", "load_lpips", "pixel_loss",
]
