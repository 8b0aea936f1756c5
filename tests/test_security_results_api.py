"""The Python API refuses what the CLI refuses: a generator's sampling settings get the config's checks, a
tokenizer decodes only its active tokens, converts float images of another precision and keeps an empty batch empty."""

from __future__ import annotations

import math

import pytest
import torch

from nativetok.config import ConfigError
from nativetok.models import ARGenerator, MaskGITGenerator
from nativetok.models.tokenizer import build_tokenizer


def tiny_generator(kind):
    torch.manual_seed(0)
    return kind(codebook_size=32, num_tokens=8, num_classes=5, width=32, depth=1, heads=2).eval()


@pytest.mark.parametrize("kind", [ARGenerator, MaskGITGenerator])
@pytest.mark.parametrize("setting, value, message", [
    ("cfg_scale", math.nan, "cfg_scale: must be a finite number"),
    ("temperature", -1.0, "temperature: must be >= 0"),
    ("top_p", 2.0, r"top_p: must be in \(0, 1\]"),
])
def test_sample_refuses_the_settings_the_cli_refuses(kind, setting, value, message):
    generator = tiny_generator(kind)
    with pytest.raises(ConfigError, match=message):
        generator.sample(torch.tensor([0, 1]), **{setting: value})
    assert generator.sample(torch.tensor([0, 1]), cfg_scale=2.0, temperature=0.5).shape == (2, 8)


@pytest.fixture()
def tokenizer(tiny_config):
    torch.manual_seed(0)
    config = tiny_config()
    return build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels).eval()


def test_decode_refuses_ids_past_the_active_experts(tokenizer):
    tokenizer.set_active(4)
    ids = torch.randint(0, 32, (2, 8))
    with pytest.raises(ValueError, match=r"n <= 4 \(the tokenizer's active tokens\), got \[2, 8\]"):
        tokenizer.decode(ids)
    assert tokenizer.decode(ids[:, :4]).shape == (2, 1, 32, 32)


def test_encode_converts_float64_and_half_images_to_the_weights_precision(tokenizer, images):
    ids = tokenizer.encode(images)
    assert torch.equal(tokenizer.encode(images.double()), ids)
    assert tokenizer.encode(images.half()).shape == ids.shape


def test_an_empty_batch_encodes_and_decodes_to_empty_results(tokenizer):
    assert tokenizer.encode(torch.zeros(0, 1, 32, 32)).shape == (0, 8)
    assert tokenizer.decode(torch.zeros(0, 8, dtype=torch.long)).shape == (0, 1, 32, 32)
    assert tokenizer.decode(torch.zeros(0, 8, dtype=torch.long), k=2).shape == (0, 1, 32, 32)
