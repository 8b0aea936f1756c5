"""Stage-1 training through Lightning: learning, HNT growth and freezing, exact resume, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from nativetok import load_tokenizer
from nativetok.checkpoints import CheckpointError
from nativetok.config.loading import to_container
from nativetok.data import ImageShardsDataModule
from nativetok.data.shards import write_shard
from nativetok.data.stream import ShardSpec, read_shard
from nativetok.lit.train import tokenizer_module, train_tokenizer
from nativetok.pixels import to_signed

FMNIST_SHARD = Path(__file__).resolve().parents[1] / "data" / "fmnist" / "fmnist-train-000000.tar"
GROWTH = "growth.stages=[{step: 0, experts: 2}, {step: 4, experts: 4, train: [decoder]}, {step: 9, experts: 8}]"


class Recorder(pl.Callback):
    """Loss, expert count and trainable set at every step, and a snapshot of chosen parameters."""

    def __init__(self):
        self.losses, self.experts, self.trainable = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.losses[step] = float(outputs["loss"])
        self.experts[step] = pl_module.tokenizer.num_active
        self.trainable[step] = {n for n, p in pl_module.tokenizer.named_parameters() if p.requires_grad}


def fit(config, callbacks=(), ckpt_path=None):
    """What `nativetok train` runs, continuing from `ckpt_path` when given."""
    if ckpt_path:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, resume=ckpt_path))
    return train_tokenizer(config, callbacks)


def test_training_cuts_the_reconstruction_loss_on_real_images(tiny_config):
    """Overfit one real batch: the reconstruction loss falls to well under half of where it started."""
    config = tiny_config("optim.lr=3e-3", "optim.warmup_steps=5")
    module = tokenizer_module(config)
    images = next(iter(ImageShardsDataModule(config.data).make_stream(False)))["image"].float() / 255
    optimizer = torch.optim.AdamW(module.tokenizer.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = module.tokenizer(images)
        loss = ((out.signed - to_signed(images)) ** 2).mean()  # on the decoder's scale
        optimizer.zero_grad()
        (loss + out.quantizer_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


@pytest.mark.parametrize("kind", ["nativetok", "parallel", "causal_mask"])
def test_every_tokenizer_kind_trains_through_the_same_module(tiny_config, kind):
    config = tiny_config(f"tokenizer.kind={kind}", "trainer.max_steps=3", "trainer.val_every_n_steps=3")
    trainer, module = fit(config)
    assert trainer.global_step == 3
    checkpoint = Path(config.run.dir) / "checkpoints" / "last.ckpt"
    tokenizer = load_tokenizer(checkpoint)
    images = torch.rand(2, 1, 32, 32)
    assert tokenizer.kind == kind and torch.equal(tokenizer.encode(images), module.tokenizer.eval().encode(images))
    assert trainer.callback_metrics["val/psnr"] > 0


def test_growth_freezes_earlier_experts_and_the_optimizer_holds_only_trainable_parameters(tiny_config):
    config = tiny_config(GROWTH, "trainer.max_steps=8", "trainer.val_every_n_steps=100")
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:  # one step into stage 1
                snapshots["start"] = {n: p.detach().clone() for n, p in pl_module.tokenizer.named_parameters()}
                optimizer = trainer.optimizers[0]
                held = {id(p) for g in optimizer.param_groups for p in g["params"]}
                trainable = {id(p) for p in pl_module.tokenizer.parameters() if p.requires_grad}
                snapshots["optimizer_ok"] = held == trainable and all(id(p) in held for p in optimizer.state)

    recorder = Recorder()
    trainer, module = fit(config, [Snapshot(), recorder])
    assert recorder.experts[4] == 2 and recorder.experts[5] == 4
    assert snapshots["optimizer_ok"]
    after = dict(module.tokenizer.named_parameters())
    for name, before in snapshots["start"].items():
        frozen = name.startswith(("mit.", "quantizer.", "experts.experts.0.", "experts.experts.1."))
        if frozen:
            assert torch.equal(after[name], before), f"{name} changed while frozen"
    changed = [n for n in ("experts.experts.2.head.weight", "experts.experts.3.query", "decoder.to_pixels.weight")
               if not torch.equal(after[n], snapshots["start"][n])]
    assert len(changed) == 3


def test_resume_mid_schedule_continues_exactly(tiny_config, tmp_path):
    """Checkpoint at step 6 (in stage 1); the resumed run has the same experts, frozen set and next losses."""
    overrides = (GROWTH, "trainer.max_steps=11", "trainer.val_every_n_steps=6", "tokenizer.decoder.random_prefix=0.5")
    whole = Recorder()
    fit(tiny_config(*overrides, f"run.dir={tmp_path / 'whole'}"), [whole])
    checkpoint = next((tmp_path / "whole" / "checkpoints").glob("best-*.ckpt"))  # the only validation: step 6
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 6
    assert torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 11
    resumed = Recorder()
    fit(tiny_config(*overrides, f"run.dir={tmp_path / 'resumed'}"), [resumed], ckpt_path=str(checkpoint))
    assert min(resumed.losses) == 7
    assert resumed.experts[7] == whole.experts[7] == 4
    assert resumed.trainable[7] == whole.trainable[7]
    for step in (7, 8, 9, 10, 11):  # the growth to 8 experts at step 9 happens after the resume too
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6), step
    assert resumed.experts[11] == 8


def test_gan_training_counts_one_step_per_batch_and_trains_the_discriminator(tiny_config):
    config = tiny_config(
        "loss.disc_weight=0.1", "loss.disc_start=2", "loss.lecam_weight=0.01",
        "loss.discriminator.channels=8", "loss.discriminator.layers=2",
        "trainer.max_steps=4", "trainer.val_every_n_steps=100",
    )
    torch.manual_seed(0)
    start = tokenizer_module(config).loss.discriminator.state_dict()
    trainer, module = fit(config)
    assert trainer.global_step == 4
    end = module.loss.discriminator.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert "train/adaptive_weight" in trainer.callback_metrics and "train/d_loss" in trainer.callback_metrics


def test_checkpoints_from_before_the_loss_module_still_resume(tiny_config, tmp_path):
    """Checkpoints written when the discriminator and LeCam sat on the module itself (`discriminator.*`,
    `lecam.*`) resume with those weights under `loss.`; `tokenizer.*` keys and the saved config are as ever."""
    gan = ("loss.disc_weight=0.1", "loss.disc_start=1", "loss.lecam_weight=0.01", "loss.discriminator.channels=8",
           "loss.discriminator.layers=2", "trainer.val_every_n_steps=100")
    config = tiny_config(*gan, "trainer.max_steps=2", f"run.dir={tmp_path / 'old'}")
    _, module = fit(config)
    checkpoint = torch.load(tmp_path / "old" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"] == {"config": to_container(config)}
    state = checkpoint["state_dict"]
    assert set(module.tokenizer.state_dict()) == {k[len("tokenizer."):] for k in state if k.startswith("tokenizer.")}
    assert any(k.startswith("loss.discriminator.") for k in state) and "loss.lecam.real_mean" in state
    checkpoint["state_dict"] = {k.removeprefix("loss."): v for k, v in state.items()}  # the old layout
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = {}

    class Restored(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update({f"loss.{k}": v.clone() for k, v in pl_module.loss.state_dict().items()})

    config = tiny_config(*gan, "trainer.max_steps=3", f"run.dir={tmp_path / 'resumed'}")
    trainer, _ = fit(config, [Restored()], ckpt_path=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 3
    expected = {k: v for k, v in state.items() if k.startswith("loss.")}
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], v) for k, v in expected.items())
    assert float(expected["loss.lecam.real_mean"]) != 0  # the LeCam means are part of what came back


def test_train_command_writes_run_folder_and_resumes(tiny_config, caplog):
    config = tiny_config("trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.images_every_n_steps=1")
    with caplog.at_level(logging.INFO, logger="nativetok"):
        train_tokenizer(config)
    run_dir = Path(config.run.dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "reconstructions.png").is_file() and any((run_dir / "tb").glob("events.*"))
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at step 2:")]
    assert len(summary) == 1 and "psnr" in summary[0]  # batch-job logs show validation without a progress bar
    longer = tiny_config("trainer.max_steps=3", "trainer.val_every_n_steps=3")
    train_tokenizer(longer)  # the same command again continues from last.ckpt
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_checkpoints_of_another_kind_are_refused(tmp_path):
    torch.save({"nativetok": {"kind": "generator"}, "state_dict": {}}, tmp_path / "gen.ckpt")
    with pytest.raises(CheckpointError, match="is a generator checkpoint, not a tokenizer"):
        load_tokenizer(tmp_path / "gen.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a NativeTok checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_tokenizer(tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.ckpt")


def test_the_prefix_cache_changes_nothing_but_the_work_done(tiny_config, tmp_path):
    """48 real images (96 views with flips) and a growth stage that freezes the MIT, the codebook and
    experts 0-1: with the cache on, views recur and hit it, and every loss and final weight equals the
    uncached run's. The cache is emptied and turned off when the fine-tune stage unfreezes the MIT."""
    raw = [sample for sample, _ in zip(read_shard(ShardSpec(str(FMNIST_SHARD))), range(48))]
    write_shard(tmp_path / "small-train-000000.tar", raw)
    overrides = (
        "growth.stages=[{step: 0, experts: 2}, {step: 3, experts: 4, train: []}, {step: 15, experts: 8}]",
        f"data.train_shards={tmp_path / 'small-train-000000.tar'}", "data.train_samples_per_epoch=48",
        "trainer.max_steps=17", "trainer.val_every_n_steps=100",
    )

    class CacheWatch(pl.Callback):
        def __init__(self):
            self.hits, self.caching = {}, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.hits[trainer.global_step] = pl_module.prefix_cache.hits if pl_module.prefix_cache else None
            self.caching[trainer.global_step] = pl_module.caching

    runs = {}
    for gib in (0, 0.01):
        recorder, watch = Recorder(), CacheWatch()
        _, module = fit(tiny_config(*overrides, f"growth.cache_gib={gib}", f"run.dir={tmp_path / str(gib)}"),
                        [recorder, watch])
        runs[gib] = recorder, watch, module
    (plain, _, plain_module), (cached, watch, cached_module) = runs[0], runs[0.01]
    assert [step for step, on in watch.caching.items() if on] == list(range(4, 16))
    assert watch.hits[15] > 60  # 12 steps of 16 draws from 96 views
    assert cached_module.prefix_cache.prefix == 0 and len(cached_module.prefix_cache) == 0
    for step, loss in plain.losses.items():
        assert cached.losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
    expected = dict(plain_module.tokenizer.named_parameters())
    for name, value in cached_module.tokenizer.named_parameters():
        scale = expected[name].abs().max().item()  # tolerance of the tensor's magnitude: sums in another order
        assert torch.allclose(value, expected[name], rtol=1e-4, atol=1e-5 * scale), name


def test_plateau_gain_is_the_psnr_gained_over_the_last_fifth_of_the_steps():
    from nativetok.lit.callbacks import plateau_gain

    assert plateau_gain([]) is None
    assert plateau_gain([(10, 15.0)]) == 0.0
    curve = [(100, 14.0), (200, 15.0), (300, 16.0), (400, 16.5), (500, 16.55)]
    assert plateau_gain(curve) == pytest.approx(0.05)  # 500 against 400, the last point at or before 80%
    assert plateau_gain(curve[:4]) == pytest.approx(0.5)  # 400 against 300 (320 is 80%)
    assert plateau_gain(curve[:3]) == pytest.approx(1.0)  # 300 against 200 (240 is 80%)


def test_patience_asks_the_plateau_check_to_pass_at_that_many_validations_in_a_row():
    """A dip in a rising curve passes the check once; with patience 2 the next validation must pass too."""
    from nativetok.lit.callbacks import plateau_reached

    dip = [(1000, 18.0), (2000, 19.0), (3000, 19.8), (4000, 20.0), (5000, 19.85), (6000, 20.3)]
    assert plateau_reached(dip[:5], 0.1, 0, patience=1)  # 19.85 at 5000 against 19.8 at 3000 (4000 is 80%)
    assert not plateau_reached(dip[:5], 0.1, 0, patience=2)  # at 4000 it had gained 0.2 over 3000
    assert not plateau_reached(dip, 0.1, 0, patience=1)  # 6000 gained 0.3 over 4000: it still learns
    flat = [(1000, 18.0), (2000, 19.0), (3000, 19.05), (4000, 19.1), (5000, 19.12)]
    assert plateau_reached(flat, 0.1, 0, patience=2) and plateau_reached(flat, 0.1, 0, patience=3)
    assert not plateau_reached(flat, 0.1, 4500, patience=2)  # the earlier of the two is before min_steps
    assert not plateau_reached(flat[:2], 1000, 0, patience=2)  # 1000 alone has nothing to gain over
    assert plateau_reached(flat[:3], 1000, 0, patience=2)


def test_a_run_stops_at_its_plateau_records_it_and_stays_stopped_when_run_again(tiny_config, tmp_path):
    """A gain threshold no run can reach stops at the first validation from plateau_min_steps on; the stop is
    recorded, counts as finished for a study, and the same command again trains no further step."""
    from nativetok.lit.callbacks import stopped_at_plateau
    from nativetok.pipelines.runs import _finished

    config = tiny_config("growth.stages=[]", "trainer.max_steps=12", "trainer.val_every_n_steps=2",
                         "trainer.plateau_min_gain_db=1000", "trainer.plateau_min_steps=5", "data.val_samples=16")
    run_dir = Path(config.run.dir)
    steps = Recorder()
    train_tokenizer(config, [steps])
    assert max(steps.losses) == 6 == stopped_at_plateau(run_dir)  # validations at 2, 4, 6: 6 is >= 5
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6 and _finished(run_dir, config.trainer.max_steps)
    again = Recorder()
    train_tokenizer(config, [again])
    assert again.losses == {} and stopped_at_plateau(run_dir) == 6


def test_no_plateau_stop_comes_before_plateau_min_steps(tiny_config):
    config = tiny_config("growth.stages=[]", "trainer.max_steps=8", "trainer.val_every_n_steps=2",
                         "trainer.plateau_min_gain_db=1000", "trainer.plateau_min_steps=7", "data.val_samples=16")
    steps = Recorder()
    train_tokenizer(config, [steps])
    assert sorted(steps.losses) == list(range(1, 9))  # validations at 2, 4 and 6 are before step 7


def test_the_first_validation_alone_is_never_a_plateau(tiny_config):
    from nativetok.lit.callbacks import stopped_at_plateau

    config = tiny_config("growth.stages=[]", "trainer.max_steps=8", "trainer.val_every_n_steps=2",
                         "trainer.plateau_min_gain_db=1000", "data.val_samples=16")
    train_tokenizer(config)
    assert stopped_at_plateau(Path(config.run.dir)) == 4  # not 2: the first curve point has no earlier one


def test_with_patience_a_run_stops_only_after_that_many_passing_validations(tiny_config):
    from nativetok.lit.callbacks import stopped_at_plateau

    config = tiny_config("growth.stages=[]", "trainer.max_steps=12", "trainer.val_every_n_steps=2",
                         "trainer.plateau_min_gain_db=1000", "trainer.plateau_min_steps=5",
                         "trainer.plateau_patience=3", "data.val_samples=16")
    train_tokenizer(config)
    assert stopped_at_plateau(Path(config.run.dir)) == 10  # passes at 6, 8 and 10: the three from step 5 on
