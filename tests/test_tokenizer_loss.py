"""`TokenizerLoss` on real images: the hand-computed pixel + quantizer loss, the GAN terms only from
disc_start (the adaptive weight only while the decoder's last layer trains), and LeCam in the discriminator's
loss when it is on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nativetok.losses import LeCam, TokenizerLoss, adaptive_weight, discriminator_hinge_loss, generator_loss
from nativetok.models.tokenizer import build_tokenizer

GAN = ("loss.pixel=l1", "loss.disc_weight=0.1", "loss.disc_start=5", "loss.discriminator.channels=8",
       "loss.discriminator.layers=2")


def setup(tiny_config, images, *overrides):
    config = tiny_config(*overrides)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    return config, tokenizer, TokenizerLoss(config.loss, config.data.channels), tokenizer(images)


@pytest.mark.parametrize("pixel", ["l1", "l2"])
def test_without_a_gan_the_loss_is_the_weighted_pixel_and_quantizer_loss(tiny_config, images, pixel):
    config, tokenizer, loss_fn, out = setup(
        tiny_config, images, f"loss.pixel={pixel}", "loss.pixel_weight=0.7", "loss.quantizer_weight=0.3"
    )
    target = images * 2 - 1  # the decoder's scale, on which the loss values are defined
    distance = F.l1_loss if pixel == "l1" else F.mse_loss
    rec = distance(out.reconstruction * 2 - 1, target)
    expected = 0.7 * rec + 0.3 * out.quantizer_loss
    loss, logs = loss_fn.autoencoder_loss(images, out, tokenizer.decoder.last_layer, step=100)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(loss, 0.7 * distance(out.signed, target) + 0.3 * out.quantizer_loss)  # same order, bitwise
    assert set(logs) == {"train/rec_loss", "train/quantizer_loss", "train/loss"}
    assert not loss_fn.gan_active(10**6) and list(loss_fn.state_dict()) == []
    val_loss, val_rec = loss_fn.validation_loss(images, out)
    assert torch.equal(val_loss, loss) and torch.equal(val_rec, logs["train/rec_loss"])


def test_the_gan_terms_start_at_disc_start_with_the_adaptive_weight(tiny_config, images):
    config, tokenizer, loss_fn, out = setup(tiny_config, images, *GAN)
    last = tokenizer.decoder.last_layer
    before, logs = loss_fn.autoencoder_loss(images, out, last, step=4)
    assert not loss_fn.gan_active(4) and "train/g_loss" not in logs
    torch.testing.assert_close(before, F.l1_loss(out.signed, images * 2 - 1) + out.quantizer_loss)

    loss, logs = loss_fn.autoencoder_loss(images, out, last, step=5)
    assert loss_fn.gan_active(5)
    nll = F.l1_loss(out.signed, images * 2 - 1)
    g_loss = generator_loss(loss_fn.discriminator(out.signed))
    weight = adaptive_weight(nll, g_loss, last)
    assert float(weight) not in (0.0, 1.0)
    assert torch.equal(logs["train/adaptive_weight"], weight) and torch.equal(logs["train/g_loss"], g_loss.detach())
    assert torch.equal(loss, nll + out.quantizer_loss + 0.1 * weight * g_loss)

    last.requires_grad_(False)  # a frozen last layer has no gradient to balance: weight 1
    _, logs = loss_fn.autoencoder_loss(images, out, last, step=5)
    assert float(logs["train/adaptive_weight"]) == 1.0


def test_the_discriminator_loss_is_hinge_plus_lecam_when_on(tiny_config, images):
    config, tokenizer, loss_fn, out = setup(tiny_config, images, *GAN, "loss.lecam_weight=0.5")
    assert {k.split(".")[0] for k in loss_fn.state_dict()} == {"discriminator", "lecam"}
    reference = copy.deepcopy(loss_fn.lecam)
    d_loss, logs = loss_fn.discriminator_loss(images, out)
    real, fake = loss_fn.discriminator(images * 2 - 1), loss_fn.discriminator(out.signed.detach())
    hinge = discriminator_hinge_loss(real, fake)
    assert torch.equal(d_loss, hinge + 0.5 * reference(real, fake))
    assert torch.equal(loss_fn.lecam.real_mean, reference.real_mean) and float(reference.real_mean) != 0
    assert torch.equal(logs["train/logits_real"], real.mean()) and torch.equal(logs["train/logits_fake"], fake.mean())
    d_loss.backward()
    assert all(p.grad is None for p in tokenizer.parameters())  # the reconstruction came in detached
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())

    _, _, plain, out = setup(tiny_config, images, *GAN)
    assert plain.lecam is None and isinstance(loss_fn.lecam, LeCam)
    d_loss, logs = plain.discriminator_loss(images, out)
    real, fake = plain.discriminator(images * 2 - 1), plain.discriminator(out.signed.detach())
    assert torch.equal(d_loss, discriminator_hinge_loss(real, fake)) and torch.equal(logs["train/d_loss"], d_loss)
