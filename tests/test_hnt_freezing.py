"""HNT keeps its promise: in a growth stage the tokens of frozen experts stay bitwise unchanged for every
image, under the shipped schedules, with EMA, on one process and on 2 DDP ranks."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import pytorch_lightning as pl
import torch

from nativetok.config import load_config
from nativetok.config.checks import ConfigError
from nativetok.config.schema import DataConfig
from nativetok.data import ImageShardsDataModule
from nativetok.lit.train import train_tokenizer

from .conftest import REPO, TINY
from .test_distributed import run_ddp

DEFAULT = REPO / "experiments" / "fmnist_tiny.yaml"
STAGE_STEPS = 4  # each stage of the shipped schedule, shortened to this many steps


class TokenRecorder(pl.Callback):
    """After every step: the HNT stage it trained in and the evaluated tokenizer's ids of fixed images."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.records: List[tuple] = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokenizer = pl_module.eval_tokenizer
        was_training = tokenizer.training
        tokenizer.eval()
        ids = tokenizer.encode(self.images.to(pl_module.device)).cpu()
        tokenizer.train(was_training)
        self.records.append((pl_module.growth_stage, ids))


def shipped_schedule(path: Path = DEFAULT, train_override=None) -> str:
    """The growth stages of a shipped experiment (expert counts and train lists), STAGE_STEPS apart."""
    stages = load_config(path).growth.stages
    parts = []
    for i, stage in enumerate(stages):
        train = train_override if (train_override is not None and i > 0 and i < len(stages) - 1) else stage.train
        parts.append(f"{{step: {i * STAGE_STEPS}, experts: {stage.experts}, train: [{', '.join(train)}]}}")
    return f"growth.stages=[{', '.join(parts)}]"


def default_overrides(index: Path, run_dir: Path, *extra: str) -> list:
    """The shipped default experiment at test size, its own growth schedule, restarts every few steps."""
    stages = load_config(DEFAULT).growth.stages
    return TINY + [
        f"data.index={index}", f"run.dir={run_dir}", "tokenizer.num_tokens=16",
        f"trainer.max_steps={len(stages) * STAGE_STEPS}", "trainer.val_every_n_steps=100",
        "tokenizer.quantizer.restart_dead_after=4", shipped_schedule(), *extra,
    ]


@pytest.fixture(scope="module")
def val_images(fmnist_index) -> torch.Tensor:
    """256 real validation images in [0, 1]."""
    module = ImageShardsDataModule(DataConfig(index=str(fmnist_index), batch_size=256, num_workers=0))
    return next(iter(module.make_stream(False)))["image"].float() / 255


def frozen_prefix_changes(records: List[tuple], stages) -> List[float]:
    """Per growth stage that freezes earlier experts: the share of images whose frozen tokens changed at
    any step of the stage, against the tokens at the end of the stage before."""
    shares = []
    for s in range(1, len(stages)):
        if "all" in stages[s].train or "old_experts" in stages[s].train:
            continue
        frozen = stages[s - 1].experts
        before = [ids for stage, ids in records if stage == s - 1][-1][:, :frozen]
        during = [ids[:, :frozen] for stage, ids in records if stage == s]
        assert len(during) >= STAGE_STEPS - 1
        changed = torch.stack([(ids != before).any(dim=1) for ids in during]).any(dim=0)
        shares.append(changed.float().mean().item())
    return shares


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_frozen_experts_keep_their_tokens_for_every_image_in_every_growth_stage(tmp_path, fmnist_index,
                                                                                val_images, ema):
    config = load_config(DEFAULT, default_overrides(fmnist_index, tmp_path / "run", f"optim.ema_decay={ema}"))
    recorder = TokenRecorder(val_images)
    train_tokenizer(config, [recorder])
    shares = frozen_prefix_changes(recorder.records, config.growth.stages)
    assert len(shares) == 2 and shares == [0.0, 0.0]
    final = [ids for stage, ids in recorder.records if stage == len(config.growth.stages) - 1]
    assert not torch.equal(final[0], final[-1])  # the final fine-tune trains everything: tokens may move


def test_a_growth_stage_that_trains_the_codebook_moves_frozen_tokens_once_allowed(tmp_path, fmnist_index,
                                                                                   val_images):
    """The control: the schedule the check refuses really does change frozen tokens."""
    overrides = default_overrides(fmnist_index, tmp_path / "run", "growth.allow_moving_frozen_tokens=true",
                                  shipped_schedule(train_override=["decoder", "codebook"]))
    config = load_config(DEFAULT, overrides)
    recorder = TokenRecorder(val_images)
    train_tokenizer(config, [recorder])
    assert max(frozen_prefix_changes(recorder.records, config.growth.stages)) > 0.05


@pytest.mark.parametrize("path", sorted(REPO.glob("experiments/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_schedule_keeps_frozen_tokens_and_moving_them_needs_opting_in(path):
    config = load_config(path)
    if not config.growth.stages:
        return
    assert not config.growth.allow_moving_frozen_tokens
    with pytest.raises(ConfigError, match=r"growth\.stages\.1\.train.*'codebook'.*allow_moving_frozen_tokens"):
        load_config(path, [shipped_schedule(path, train_override=["decoder", "codebook"])])
    with pytest.raises(ConfigError, match=r"growth\.stages\.1\.train.*'mit'"):
        load_config(path, [shipped_schedule(path, train_override=["mit"])])
    load_config(path, [shipped_schedule(path, train_override=["old_experts", "codebook"])])  # nothing frozen


DDP_SCRIPT = '''
import json, sys
from pathlib import Path
import pytorch_lightning as pl
import torch
from nativetok.config import load_config
from nativetok.lit.train import train_tokenizer

experiment, out, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
images = torch.load(out.parent / "images.pt")


class Record(pl.Callback):
    def __init__(self):
        self.records = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        tokenizer = module.eval_tokenizer
        tokenizer.eval()
        self.records.append([module.growth_stage, tokenizer.encode(images).tolist()])
        tokenizer.train()

    def on_train_end(self, trainer, module):
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


train_tokenizer(load_config(experiment, overrides), [Record()])
'''


def test_frozen_tokens_stay_fixed_on_two_ddp_ranks(tmp_path, fmnist_index, val_images):
    torch.save(val_images[:64], tmp_path / "images.pt")
    overrides = default_overrides(fmnist_index, tmp_path / "run", "data.batch_size=16")
    ranks = run_ddp(tmp_path, DEFAULT, overrides, DDP_SCRIPT)
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # both ranks evaluate the same model
    records = [(stage, torch.tensor(ids)) for stage, ids in ranks[0]]
    stages = load_config(DEFAULT, overrides).growth.stages
    assert frozen_prefix_changes(records, stages) == [0.0, 0.0]
