"""Checkpoints and exports written by an earlier NativeTok keep loading, and give what that code computed with
them (tests/data/written_before/, made by tests/data/make_written_before.py at the commit its README names)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from nativetok import Generator, NativeTokenizer, load_generator, load_tokenizer
from nativetok.checkpoints import load_generator_tokenizer, read_checkpoint

BEFORE = Path(__file__).resolve().parent / "data" / "written_before"


def expected() -> dict:
    return torch.load(BEFORE / "expected.pt", map_location="cpu", weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the last bits a CPU of another make computes differently, scaled to the values."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


def test_an_earlier_tokenizer_checkpoint_loads_and_encodes_and_decodes_as_it_did():
    before = expected()
    tokenizer = load_tokenizer(BEFORE / "tok" / "checkpoints" / "last.ckpt")
    ids = tokenizer.encode(before["images"])
    # A code whose distances tie to the last bit may snap differently on another CPU: nearly all ids agree.
    assert (ids == before["ids"]).float().mean() >= 0.95
    assert close(tokenizer.decode(before["ids"]), before["decoded"])
    assert isinstance(NativeTokenizer.from_pretrained(BEFORE / "tok" / "checkpoints" / "last.ckpt"), NativeTokenizer)


def test_an_earlier_generator_checkpoint_and_export_load_with_their_pinned_tokenizer(tmp_path):
    before = expected()
    checkpoint = BEFORE / "gen" / "checkpoints" / "last.ckpt"
    for source in (checkpoint, BEFORE / "gen_export"):
        generator = load_generator(source)
        assert generator.sample(before["labels"], seed=2).shape == before["sampled"].shape
        tokenizer, _ = load_generator_tokenizer(source)  # the pin, found again from the run folder or the export
        assert close(tokenizer.decode(before["ids"]), before["decoded"])
    sampled = load_generator(checkpoint).sample(before["labels"], seed=2)
    assert (sampled == before["sampled"]).float().mean() >= 0.9
    assert read_checkpoint(BEFORE / "gen_export", "generator")["nativetok"].get("classes") is None  # none kept then

    # Saved again by today's code (an export has no `written_by` before): it loads and samples alike.
    copy = tmp_path / "export"
    shutil.copytree(BEFORE / "gen_export", copy)
    saved = Generator.from_pretrained(copy).save_pretrained(tmp_path / "again")
    assert torch.equal(load_generator(saved).sample(before["labels"], seed=2),
                       load_generator(copy).sample(before["labels"], seed=2))
