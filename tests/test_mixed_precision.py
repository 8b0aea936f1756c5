"""Mixed precision on every stage, on CPU: bf16 autocast, and fp16 autocast with its loss scaler.

Lightning refuses to clip gradients for a fused optimizer under mixed precision; the steps clip
themselves (`StepGuard`), after unscaling under a scaler. These runs are what a GPU user launches with
`trainer.precision=bf16-mixed` or `16-mixed`, at tiny sizes.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from nativetok.lit.guards import StepGuard
from nativetok.lit.train import build_trainer, generator_module

from .conftest import random_token_batches, tiny_generator_config
from .test_stage1_training import fit

PRECISIONS = ["bf16-mixed", "16-mixed"]


class SnapshotAtStep(pl.Callback):
    """The weights of expert 0 and the codebook when the given step begins (after growth has applied)."""

    def __init__(self, step: int):
        self.step, self.expert, self.codebook = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            tokenizer = pl_module.tokenizer
            self.expert = {k: v.clone() for k, v in tokenizer.experts.experts[0].state_dict().items()}
            self.codebook = tokenizer.quantizer.codebook.detach().clone()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_stage1_trains_through_growth_with_clipping_under_mixed_precision(tiny_config, precision):
    config = tiny_config(
        f"trainer.precision={precision}", "trainer.max_steps=8", "trainer.val_every_n_steps=8",
        "optim.grad_clip=0.5", "tokenizer.quantizer.restart_dead_after=8",
        "growth.stages=[{step: 0, experts: 4, train: [all]}, {step: 4, experts: 8, train: [decoder]}]",
    )
    snapshot = SnapshotAtStep(4)
    before = None

    class First(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.clone() for k, v in pl_module.tokenizer.decoder.state_dict().items()}

    trainer, module = fit(config, [snapshot, First()])
    assert trainer.global_step == 8 and module.tokenizer.num_active == 8
    assert module.loss_guard.total == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(before[k], v) for k, v in module.tokenizer.decoder.state_dict().items())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    # The growth stage froze expert 0 and the codebook, under autocast and the scaler alike.
    expert = module.tokenizer.experts.experts[0].state_dict()
    assert all(torch.equal(snapshot.expert[k], v) for k, v in expert.items())
    assert torch.equal(snapshot.codebook, module.tokenizer.quantizer.codebook)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("kind", ["ar", "maskgit"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_stage2_trains_under_mixed_precision_with_clipping(tmp_path, kind, precision):
    config = tiny_generator_config(tmp_path, kind, "trainer.max_steps=4", f"trainer.precision={precision}",
                                   "optim.grad_clip=0.1")
    loader = random_token_batches()
    module = generator_module(config)
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = build_trainer(config, [], tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 4 and module.loss_guard.total == 0
    after = module.generator.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())


def scaled_problem(scale: float):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    return weight, optimizer, scaler


def test_a_scaled_step_is_unscaled_before_clipping_and_a_non_finite_one_is_skipped():
    weight, optimizer, scaler = scaled_problem(2.0**12)
    guard = StepGuard(limit=3)
    loss = (weight * 100).square().sum()
    scaler.scale(loss).backward()
    norm = guard.before_step(optimizer, loss, clip=0.5, scaler=scaler, step=0)
    assert float(norm) > 1000  # the true norm, not the scaled one (which is 4096 times larger)
    assert float(weight.grad.norm()) == pytest.approx(0.5, rel=1e-4)  # clipped after unscaling
    start = weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(start, weight)

    optimizer.zero_grad()
    start = weight.detach().clone()
    loss = (weight * float("inf")).sum()
    scaler.scale(loss).backward()
    guard.before_step(optimizer, loss, clip=0.5, scaler=scaler, step=1)
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(start, weight) and guard.total == 1


def test_without_a_scaler_a_non_finite_gradient_skips_on_the_device_and_the_limit_stops():
    weight, optimizer, _ = scaled_problem(1.0)
    guard = StepGuard(limit=2, name="test loss")
    start = weight.detach().clone()
    for step in range(2):
        optimizer.zero_grad()
        loss = (weight * float("nan")).sum()
        loss.backward()
        guard.before_step(optimizer, loss, clip=1.0, step=step)
        optimizer.step()
    assert torch.equal(start, weight) and optimizer.state[weight]["step"] == 0
    with pytest.raises(RuntimeError, match="2 non-finite values of the test loss in a row, the last at step 1"):
        guard.check()
