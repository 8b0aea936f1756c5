"""The training steps never wait for the device: counted on CPU with a dispatch mode.

On a GPU every host sync (`.item()`, `bool(tensor)`, a tensor built from Python values) stalls the queue
of kernels; the steps read device values only on the steps whose logs are written. These tests run real
training through Lightning on the embedded data and count, step by step, the ops that would sync.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from benchmarks.profiling import DispatchCounter
from nativetok.lit.guards import logs_this_batch
from nativetok.lit.train import build_trainer, generator_module
from nativetok.models.graphs import encoder_key
from nativetok.models.tokenizer import NativeTokenizer, build_tokenizer
from nativetok.pixels import to_signed

from .conftest import random_token_batches, tiny_generator_config
from .test_stage1_training import fit


class SyncProbe(pl.Callback):
    """Counts the ops of each training batch (data loading excluded), and whether its logs are written. Lightning's
    own (private) answer is the reference that `logs_this_batch`, which the steps use, must agree with."""

    def __init__(self):
        self.steps = []
        self.disagreements = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.logging = trainer._logger_connector.should_update_logs
        if logs_this_batch(trainer) != self.logging:
            self.disagreements.append((trainer.global_step, batch_idx, self.logging))
        self.counter = DispatchCounter()
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.steps.append((trainer.global_step, self.logging, self.counter))

    def quiet_steps(self, max_steps: int):
        """Steps that write no logs, without the first (Lightning creates its metric states) and the last
        (the progress bar's final refresh)."""
        return [(step, c) for step, logging, c in self.steps if not logging and 1 < step < max_steps]


def test_stage1_steps_make_no_host_sync_through_growth_restarts_and_the_gan(tiny_config):
    config = tiny_config(
        "trainer.max_steps=12", "trainer.val_every_n_steps=100", "trainer.log_every_n_steps=4",
        "trainer.progress_bar=true", "tokenizer.quantizer.restart_dead_after=8", "optim.grad_clip=1.0",
        "loss.disc_weight=0.1", "loss.disc_start=6", "loss.lecam_weight=0.001",
        "growth.stages=[{step: 0, experts: 4, train: [all]}, {step: 5, experts: 8, train: [decoder, codebook]}]",
        "growth.allow_moving_frozen_tokens=true",  # restarts in the growth stage too
    )
    probe = SyncProbe()
    trainer, module = fit(config, [probe])
    quiet = probe.quiet_steps(12)
    assert len(quiet) >= 6 and any(step > 6 for step, _ in quiet)  # growth stage and GAN steps included
    for step, counter in quiet:
        assert counter.syncs == {} and counter.host_data == {}, (step, counter.syncs, counter.host_data)
    written = [c for _, logging, c in probe.steps if logging]
    assert written and all(sum(c.syncs.values()) > 0 for c in written)  # the probe sees syncs where they are
    assert module.tokenizer.num_active == 8 and trainer.global_step == 12
    assert probe.disagreements == []  # a discriminator step does not count as a step of its own


@pytest.mark.parametrize("accumulate", [1, 2])
def test_stage2_steps_make_no_host_sync(tmp_path, accumulate):
    config = tiny_generator_config(tmp_path, "ar", "trainer.max_steps=8", "trainer.progress_bar=true",
                                   "trainer.log_every_n_steps=4", f"trainer.accumulate_grad_batches={accumulate}")
    loader = random_token_batches()
    probe = SyncProbe()
    build_trainer(config, [probe], tmp_path).fit(
        generator_module(config), train_dataloaders=loader)
    quiet = probe.quiet_steps(8)
    assert len(quiet) >= 4
    for step, counter in quiet:
        assert counter.syncs == {} and counter.host_data == {}, (step, counter.syncs, counter.host_data)
    assert probe.disagreements == [] and len(probe.steps) == 8 * accumulate


def tiny_tokenizer(tiny_config, kind: str, active: int) -> NativeTokenizer:
    config = tiny_config(f"tokenizer.kind={kind}")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    if kind == "nativetok":
        tokenizer.set_active(active)
        tokenizer.set_trainable(range(active // 2, active), ["decoder"])  # a growth stage
    return tokenizer


def test_the_encoder_meets_cuda_graph_conditions_no_syncs_and_one_compiled_graph(tiny_config, images):
    """What capture needs, checked on CPU: the encoder's forward and backward read nothing from the device
    and build no tensors from host data, and torch.compile traces it whole (fullgraph: no graph break per
    expert) to the eager losses and gradients."""
    for kind in ("nativetok", "parallel"):
        tokenizer = tiny_tokenizer(tiny_config, kind, 6)
        target = to_signed(images)  # quantize works on the networks' scale
        with DispatchCounter() as counter:
            out = tokenizer.quantize(target)
            (out.codes.square().sum() + out.loss).backward()
        assert counter.syncs == {} and counter.host_data == {}, (kind, counter.syncs, counter.host_data)
        eager = {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}
        tokenizer.zero_grad(set_to_none=True)
        compiled = torch.compile(tokenizer.quantize, backend="aot_eager", fullgraph=True)
        again = compiled(target)
        (again.codes.square().sum() + again.loss).backward()
        assert torch.equal(again.ids, out.ids)
        torch.testing.assert_close(again.loss, out.loss)
        for name, grad in eager.items():
            torch.testing.assert_close(dict(tokenizer.named_parameters())[name].grad, grad, msg=name)


def test_a_capture_key_changes_with_the_growth_stage_and_the_batch(tiny_config, images):
    tokenizer = tiny_tokenizer(tiny_config, "nativetok", 4)
    key = encoder_key(tokenizer, images)
    assert encoder_key(tokenizer, images.clone()) == key
    assert encoder_key(tokenizer, images[:-1]) != key
    tokenizer.grow(8, "copy_last")
    assert encoder_key(tokenizer, images) != key
    grown = encoder_key(tokenizer, images)
    tokenizer.set_trainable(range(8, 8), ["all"])
    assert encoder_key(tokenizer, images) != grown
    fp32 = encoder_key(tokenizer, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder_key(tokenizer, images) != fp32
