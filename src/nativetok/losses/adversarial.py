"""Hinge GAN losses, the adaptive generator weight of VQGAN, and LeCam regularisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
