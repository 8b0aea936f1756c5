"""What TensorBoard receives, read back from the event files: labelled, readable image grids, PSNR at each
prefix length, and every picture of an evaluation at the step of that evaluation's scalars, once."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nativetok.lit.callbacks import SampleGrid, labelled_grid
from nativetok.lit.optim import scaled_lr, warmup_cosine
from nativetok.lit.train import build_trainer, generator_module, train_tokenizer
from nativetok.models.tokenizer import prefix_lengths

from .conftest import random_token_batches, tiny_generator_config

# Stage 1 with two validations: 2 experts until step 3, then 4 (of 8).
GROWING = (
    "growth.stages=[{step: 0, experts: 2}, {step: 3, experts: 4}, {step: 100, experts: 8}]",
    "trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.images_every_n_steps=2",
)


def events(run_dir: Path) -> EventAccumulator:
    (path,) = (run_dir / "tb").glob("events.*")
    accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator: EventAccumulator, tag: str) -> dict:
    return {e.step: e.value for e in accumulator.Scalars(tag)}


def logged_lr_follows_the_schedule(accumulator: EventAccumulator, config, steps: set) -> None:
    """LearningRateMonitor's scalars, one per parameter group (with and without weight decay): the learning rate
    each logged step trained with."""
    o = config.optim
    for group in ("decay", "no_decay"):
        logged = scalar_steps(accumulator, f"train/lr/{group}")
        assert set(logged) == steps
        for step, value in logged.items():
            expected = scaled_lr(config) * warmup_cosine(step, o.warmup_steps, config.trainer.max_steps, o.min_lr_ratio)
            assert value == pytest.approx(expected, rel=1e-6)


def test_prefix_lengths_double_up_to_below_the_active_count():
    assert prefix_lengths(1) == [1] and prefix_lengths(2) == [1, 2]
    assert prefix_lengths(8) == [1, 2, 4, 8] and prefix_lengths(9) == [1, 2, 4, 8, 9]
    assert prefix_lengths(128)[-2:] == [64, 128]


def test_a_grid_enlarges_small_images_pixel_for_pixel_and_labels_every_row():
    rows = [torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)]
    grid = labelled_grid(rows, ["original", "k=1"])
    cell = 64 + 2
    assert grid.shape[0] == 3 and grid.shape[1] == 2 * cell + 2
    left = grid.shape[2] - (3 * cell + 2)
    assert left > 20  # room for the labels
    # The second image of the second row: each pixel became a 2x2 block (to PNG precision).
    block = grid[0, 2 + cell: 2 + cell + 64, left + 2 + cell: left + 2 + cell + 64]
    expected = rows[1][1, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert (block - expected).abs().max() <= 0.5 / 255 + 1e-6
    for row in range(2):  # black text in each row's band of the label column
        assert grid[:, 2 + row * cell: (row + 1) * cell, :left].min() < 0.3
    assert labelled_grid([torch.rand(2, 3, 256, 256)], ["x"]).shape[1] == 256 + 4  # large images stay as they are


def test_stage1_logs_prefix_psnr_and_one_labelled_grid_per_evaluation_at_its_step(tiny_config):
    config = tiny_config(*GROWING)
    train_tokenizer(config)
    run_dir = Path(config.run.dir)
    tb = events(run_dir)
    images = tb.Images("reconstructions")
    assert [e.step for e in images] == [2, 4]  # the last step is not logged again at the end of training
    # Rows: originals, all active tokens, then k = 1, 2, ... below it: 2 experts at step 2, 4 at step 4;
    # 8 images of 32 px enlarged to 64 px, with a label column at the left.
    assert [e.height for e in images] == [3 * 66 + 2, 4 * 66 + 2]
    assert all(e.width > 8 * 66 + 2 for e in images)
    assert set(scalar_steps(tb, "val/loss")) == {2, 4}  # the scalars of those evaluations, at the same steps
    psnr = scalar_steps(tb, "val/psnr")
    assert set(scalar_steps(tb, "val/psnr@1")) == set(scalar_steps(tb, "val/psnr@2")) == {2, 4}
    assert set(scalar_steps(tb, "val/psnr@4")) == {4} and "val/psnr@8" not in tb.Tags()["scalars"]
    assert scalar_steps(tb, "val/psnr@2")[2] == psnr[2] and scalar_steps(tb, "val/psnr@4")[4] == psnr[4]
    logged_lr_follows_the_schedule(tb, config, {0, 1, 2, 3})
    logged = np.array(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(np.array(Image.open(run_dir / "reconstructions.png").convert("RGB")), logged)


def test_stage2_sample_rows_are_named_by_class_and_logged_with_their_evaluation(tiny_config, tmp_path):
    tokenizer_config = tiny_config("trainer.max_steps=1", "trainer.val_every_n_steps=1")
    train_tokenizer(tokenizer_config)
    tokenizer_run = Path(tokenizer_config.run.dir)
    config = tiny_generator_config(
        tmp_path / "gen", "ar", f"generator.tokenizer={tokenizer_run / 'checkpoints' / 'last.ckpt'}",
        f"data.index={tmp_path / 'tokens' / 'index.json'}", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
        "sampling.grid_per_class=2", "trainer.log_every_n_steps=2",
    )
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]

    class Tokens(pl.LightningDataModule):
        index = SimpleNamespace(classes=names)

        def train_dataloader(self):
            return random_token_batches()

        def val_dataloader(self):
            return random_token_batches()

    grid = SampleGrid(2, tmp_path / "samples.png", per_class=2)
    build_trainer(config, [grid], tmp_path / "gen").fit(
        generator_module(config), datamodule=Tokens())
    assert grid.label(3) == "3 Dress" and SampleGrid(2).label(3) == "3"  # class ids where the index has no names
    tb = events(tmp_path / "gen")
    samples = tb.Images("samples")
    assert [e.step for e in samples] == [2, 4]
    assert [e.step for e in tb.Images("val/bits_per_position")] == [2, 4]
    assert set(scalar_steps(tb, "val/loss")) == {2, 4}
    logged_lr_follows_the_schedule(tb, config, {1, 3})  # Lightning writes the logs of every second step
    assert all(e.height == 10 * 66 + 2 and e.width > 2 * 66 + 2 for e in samples)  # a row per class
    assert (tmp_path / "samples.png").is_file()
