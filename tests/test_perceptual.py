"""LPIPS from the linear heads the `lpips` package ships and a VGG16 trunk in torchvision's file layout: only
the trunk is fetched by hand, and a missing one is named with its URL and place."""

from __future__ import annotations

import pytest
import torch

from nativetok.config import load_config
from nativetok.losses.perceptual import VGG16_URL, WIDTHS, load_lpips, package_lin_weights
from tests.conftest import REPO


@pytest.fixture()
def vgg_file(tmp_path):
    """The convolutional trunk of a randomly initialised torchvision VGG16, under the keys of the real
    vgg16-397923af.pth (its classifier, unused by LPIPS, left out: 500 MB of random weights)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    trunk = make_layers(cfgs["D"])  # what vgg16() holds as `features`
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, path)
    return path


def test_the_lpips_package_ships_the_five_linear_heads():
    heads = torch.load(package_lin_weights(), map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in heads.items()} == {
        f"lin{i}.model.1.weight": (1, width, 1, 1) for i, width in enumerate(WIDTHS)
    }
    assert all(v.min() >= 0 and v.sum() > 0 for v in heads.values())  # learned, non-negative weights


def test_perceptual_loss_runs_with_the_package_heads_and_a_local_trunk(tmp_path, vgg_file):
    config = load_config(REPO / "experiments" / "fmnist_tiny.yaml", [
        f"run.dir={tmp_path / 'run'}", "loss.perceptual_weight=1.0", f"loss.perceptual.vgg_weights={vgg_file}"])
    assert config.loss.perceptual.lin_weights is None
    lpips = load_lpips(config.loss.perceptual.vgg_weights, config.loss.perceptual.lin_weights)
    heads = torch.load(package_lin_weights(), map_location="cpu", weights_only=True)
    for i, conv in enumerate(lpips.lins):
        assert torch.equal(conv.weight, heads[f"lin{i}.model.1.weight"])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert float(lpips(x, x)) == 0.0
    assert float(lpips(x, x.flip(0))) > 0 and float(lpips(x, x + 0.1 * torch.randn_like(x))) > 0


def test_imagenet_experiments_need_only_the_vgg_trunk(tmp_path):
    config = load_config(REPO / "experiments" / "imagenet256_nativetok_l32.yaml", [f"run.dir={tmp_path}"])
    assert config.loss.perceptual.vgg_weights == "weights/lpips/vgg16-397923af.pth"
    assert config.loss.perceptual.lin_weights is None
    with pytest.raises(FileNotFoundError, match=f"{VGG16_URL}.*weights/lpips/vgg16-397923af.pth"):
        load_lpips(tmp_path / "vgg16-397923af.pth")


def test_the_tokenizer_loss_adds_lpips_on_the_decoder_scale_and_keeps_it_out_of_the_state_dict(
    tiny_config, images, vgg_file
):
    from nativetok.losses import TokenizerLoss
    from nativetok.models.tokenizer import build_tokenizer

    config = tiny_config("loss.pixel=l1", "loss.perceptual_weight=0.5", f"loss.perceptual.vgg_weights={vgg_file}")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    loss_fn = TokenizerLoss(config.loss, config.data.channels)
    out = tokenizer(images)
    loss, logs = loss_fn.autoencoder_loss(images, out, tokenizer.decoder.last_layer, step=0)
    lpips = load_lpips(vgg_file)
    target = images * 2 - 1
    perceptual = lpips(out.signed, target)
    assert torch.equal(logs["train/perceptual_loss"], perceptual.detach()) and float(perceptual.detach()) > 0
    rec = torch.nn.functional.l1_loss(out.signed, target)
    assert torch.equal(loss, rec + 0.5 * perceptual + out.quantizer_loss)
    assert list(loss_fn.state_dict()) == []  # a fixed metric: never in checkpoints
