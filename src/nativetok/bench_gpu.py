"""`make bench-gpu` (`nativetok bench --device cuda`): the GPU table, as ratios measured in one run.

One prepared run of a few minutes on one GPU, offline, with nothing beyond the project's dependencies.
At the ImageNet-256 L-32 shapes, batch 32, bf16 autocast, fused AdamW and gradient clipping (the shipped
step), it measures: the chip's bf16 GEMM rate (the practical peak for MFU); stage-1 steps of NativeTok,
parallel and causal-mask tokenizers, eager and with the encoder replayed as CUDA graphs, with img/s and
MFU (FLOPs counted by `torch.utils.flop_counter`); a growth step against a full step; encoding img/s;
AR-B sampling tokens/s at 64 and 256 tokens (batch 64, CFG 2), eager and graphed; and the Lightning loop
with the real DataModule against the raw step. `--device cpu --quick` runs the same code at tiny shapes
(a smoke test; CPU timings are `make bench`'s business).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from nativetok.bench import Row, _report, build, table, train_step
from nativetok.config import load_config
from nativetok.models import ARGenerator, NativeTokenizer
from nativetok.models.graphs import FixedShapeStep
from nativetok.models.sampling import sampling_throughput

log = logging.getLogger(__name__)

L32 = "experiments/imagenet256_nativetok_l32.yaml"
TINY = "experiments/fmnist_tiny.yaml"
KINDS = ("nativetok", "parallel", "causal_mask")


def shapes(experiment: str) -> str:
    return "L-32" if experiment == L32 else "tiny"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of a call, the device drained before and after each (so queued work counts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device):
    # cache_enabled=False: what Lightning uses, and what CUDA-graph capture requires.
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def gemm_flops_per_second(device: torch.device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / seconds_per_call(lambda: torch.mm(a, b, out=out), device, repeats)


def make_step(tokenizer: NativeTokenizer, images: Tensor, graphs: bool) -> Callable[[], None]:
    """The shipped stage-1 step without Lightning under bf16 autocast; `graphs`: the encoder as CUDA graphs."""
    return train_step(tokenizer, images, "bf16", graphs=graphs)


def step_flops(tokenizer: NativeTokenizer, images: Tensor) -> float:
    """Forward and backward FLOPs of one step (matmuls and attention, as counted by torch)."""
    with FlopCounterMode(display=False) as counter, autocast(images.device):
        out = tokenizer(images)
        (F.mse_loss(out.reconstruction.float(), images * 2 - 1) + out.quantizer_loss).backward()
    tokenizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def fresh(experiment: str, kind: str, device: torch.device) -> NativeTokenizer:
    """A tokenizer built on the device (initialising 600M parameters there takes a moment, on a CPU minutes)."""
    with device:
        tokenizer = build(experiment, kind)
    tokenizer.set_trainable(range(tokenizer.num_tokens), ["all"])
    return tokenizer


def release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def on_gpu(device: torch.device, target: str) -> Optional[str]:
    """Targets are for the GPU; the CPU smoke run reports its figures without judging them."""
    return target if device.type == "cuda" else None


def rows_steps(experiment: str, batch: int, device: torch.device, peak: float, repeats: int) -> List[Row]:
    """Stage-1 steps of each tokenizer kind, eager and graphed, with img/s and MFU; NativeTok / parallel."""
    rows, best = [], {}
    for kind in KINDS:
        tokenizer = fresh(experiment, kind, device)
        images = torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, device=device)
        flops = step_flops(tokenizer, images)
        timings = {"eager": seconds_per_call(make_step(tokenizer, images, False), device, repeats)}
        if device.type == "cuda":
            timings["graphed"] = seconds_per_call(make_step(tokenizer, images, True), device, repeats)
        setting = min(timings, key=timings.get)
        best[kind] = timings[setting]
        detail = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in timings.items())
        rows.append(Row(f"{shapes(experiment)} step, {kind} (batch {batch}, bf16), best: {setting}", batch / best[kind],
                        unit="img/s", target=on_gpu(device, ">= 250") if kind == "nativetok" else None,
                        detail=f"{detail}; MFU {flops / best[kind] / peak:.2f} ({flops / 1e12:.1f} TFLOP a step)"
                        ).check())
        if "graphed" in timings:
            rows.append(Row(f"   gain: encoder as CUDA graphs, {kind}", timings["eager"] / timings["graphed"]))
        del tokenizer
        release(device)
    rows.append(Row("NativeTok / parallel step, each at its best setting", best["nativetok"] / best["parallel"],
                    target=on_gpu(device, "<= 1.25"),
                    detail=f"causal_mask / parallel: {best['causal_mask'] / best['parallel']:.2f}"
                    ).check())
    return rows


def rows_growth(experiment: str, batch: int, device: torch.device, repeats: int) -> List[Row]:
    """A growth step (the MIT and the first half of the experts frozen) against a full step."""
    tokenizer = fresh(experiment, "nativetok", device)
    images = torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, device=device)
    graphs = device.type == "cuda"
    half = tokenizer.num_tokens // 2
    full = seconds_per_call(make_step(tokenizer, images, graphs), device, repeats)
    seconds = {}
    variants = (("only the new experts train", []), ("decoder and codebook train too", ["decoder", "codebook"]))
    for name, train in variants:
        tokenizer.set_trainable(range(half, tokenizer.num_tokens), train)
        seconds[name] = seconds_per_call(make_step(tokenizer, images, graphs), device, repeats)
    del tokenizer
    release(device)
    first, second = seconds
    return [
        Row(f"growth step / full step ({first})", seconds[first] / full, target=on_gpu(device, "<= 0.5"),
            detail=f"{seconds[first] * 1e3:.1f} ms vs {full * 1e3:.1f} ms").check(),
        Row(f"   growth step / full step ({second})", seconds[second] / full),
    ]


def rows_encode(experiment: str, batch: int, device: torch.device, repeats: int) -> List[Row]:
    """Images to token ids under bf16 autocast, eager and as one captured graph."""
    rows, rates = [], {}
    for kind in ("nativetok", "parallel"):
        tokenizer = fresh(experiment, kind, device).eval()
        images = torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, device=device)

        def encode(x: Tensor, tokenizer=tokenizer) -> Tensor:
            with autocast(device):
                return tokenizer.encode(x)

        timings = {"eager": seconds_per_call(lambda e=encode, x=images: e(x), device, repeats)}
        if device.type == "cuda":
            graph = FixedShapeStep(encode, [images], graph=True, compile=False)
            assert torch.equal(graph(images), encode(images)), "the captured encoder gives other tokens"
            timings["graphed"] = seconds_per_call(lambda g=graph, x=images: g(x), device, repeats)
        rates[kind] = batch / min(timings.values())
        detail = ", ".join(f"{name} {batch / t:.0f} img/s" for name, t in timings.items())
        rows.append(Row(f"encode, {kind} (batch {batch}, bf16)", rates[kind], unit="img/s", detail=detail))
        del tokenizer
        release(device)
    rows.append(Row("   encode rate, NativeTok / parallel", rates["nativetok"] / rates["parallel"]))
    return rows


def rows_sampling(device: torch.device, lengths, batch: int, width: int, depth: int, heads: int) -> List[Row]:
    """AR-B-sized sampling with CFG 2 and the static KV cache under bf16, eager and with the decode step
    replayed from a CUDA graph (which must give the same tokens)."""
    rows = []
    labels = torch.arange(batch, device=device) % 1000
    targets = {64: ">= 3300", 256: ">= 5300"}
    modes = {"eager": False, "graphed": True} if device.type == "cuda" else {"eager": False}
    for length in lengths:
        with device:
            torch.manual_seed(0)
            model = ARGenerator(4096, length, 1000, width=width, depth=depth, heads=heads).eval()
        rates, tokens = {}, {}
        with autocast(device):
            for name, graph in modes.items():
                rates[name] = sampling_throughput(model, batch, 2.0, device, graph=graph, repeats=2)
                tokens[name] = model.sample(labels, cfg_scale=2.0, seed=0, graph=graph)
        same = all(torch.equal(t, tokens["eager"]) for t in tokens.values())
        detail = ", ".join(f"{n} {r:.0f} tok/s" for n, r in rates.items())
        target = on_gpu(device, targets[length]) if length in targets else None
        rows.append(Row(f"AR sampling {length} tokens (width {width}, depth {depth}, batch {batch}, CFG 2, bf16)",
                        max(rates.values()), unit="tok/s", target=target,
                        detail=f"{detail}; identical tokens: {same}").check())
        del model
        release(device)
    return rows


def synthetic_shards(folder: Path, count: int, size: int, channels: int, per_shard: int = 256) -> Path:
    """Smooth random images as JPEG shards with an index: the real DataModule's input, made offline."""
    from nativetok.data.shards import DatasetIndex, ShardEntry, SplitIndex, encode_image, shard_name, write_shard

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, start in enumerate(range(0, count, per_shard)):
        samples = []
        for i in range(start, min(count, start + per_shard)):
            coarse = torch.from_numpy(rng.random((1, channels, 8, 8), dtype=np.float32))
            image = F.interpolate(coarse, size=(size, size), mode="bilinear")[0].permute(1, 2, 0)
            array = (image * 255).to(torch.uint8).numpy()
            samples.append({"__key__": f"img{i:08d}", "jpg": encode_image(array.squeeze(-1) if channels == 1
                                                                           else array, "jpg"),
                            "cls": str(i % 10).encode()})
        name = shard_name("synthetic", "train", number)
        write_shard(folder / name, samples)
        entries.append(ShardEntry(name, len(samples)))
    index = DatasetIndex("synthetic", size, channels, [str(c) for c in range(10)],
                         {"train": SplitIndex(entries), "val": SplitIndex(entries[:1])}, fmt="jpg", root=folder)
    return index.save(folder)


class StepTimer(pl.Callback):
    """Wall time from the start of step `start` to the end of the last step, the device drained at both."""

    def __init__(self, start: int):
        self.start, self.began, self.ended, self.steps = start, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            synchronize(pl_module.device)
            self.began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.began is not None:
            self.steps += 1
            if trainer.global_step >= trainer.max_steps:
                synchronize(pl_module.device)
                self.ended = time.perf_counter()


def rows_lightning_loop(experiment: str, batch: int, device: torch.device, steps: int, graphs: bool) -> List[Row]:
    """The real training loop (TokenizerModule, Lightning, the DataModule on shards) against the raw step."""
    from nativetok.lit.train import train_tokenizer

    warmup = 5
    with tempfile.TemporaryDirectory() as folder:
        base = load_config(experiment)
        index = synthetic_shards(Path(folder) / "shards", batch * (steps + warmup + 2), base.data.image_size,
                                 base.data.channels)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        config = load_config(experiment, [
            f"data.index={index}", f"data.batch_size={batch}", "data.val_samples=32", "data.shuffle_buffer=256",
            f"trainer.accelerator={accelerator}", "trainer.devices=1", "trainer.num_nodes=1",
            "trainer.strategy=auto", "trainer.precision=bf16-mixed", f"trainer.max_steps={steps + warmup}",
            f"trainer.val_every_n_steps={10 * (steps + warmup)}", "trainer.log_every_n_steps=25",
            "trainer.images_every_n_steps=0", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=0",
            f"trainer.cuda_graphs={str(graphs).lower()}", "growth.stages=[]", "loss.disc_weight=0",
            "loss.perceptual_weight=0", "optim.ema_decay=0", f"run.dir={folder}/run", "run.resume=never",
        ])
        timer = StepTimer(warmup)
        train_tokenizer(config, [timer])
        loop = (timer.ended - timer.began) / timer.steps
    tokenizer = fresh(experiment, "nativetok", device)
    images = torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, device=device)
    raw = seconds_per_call(make_step(tokenizer, images, graphs), device, steps)
    del tokenizer
    release(device)
    return [Row(f"Lightning loop with the DataModule / raw step (NativeTok, batch {batch}, bf16"
                f"{', encoder graphed' if graphs else ''})", loop / raw, target=on_gpu(device, "<= 1.15"),
                detail=f"{loop * 1e3:.1f} ms vs {raw * 1e3:.1f} ms a step").check()]


def run(out: Path, device: torch.device, quick: bool) -> List[Row]:
    experiment, batch = (TINY, 8) if quick else (L32, 32)
    repeats = 3 if quick else 10
    rows: List[Row] = []
    peak = gemm_flops_per_second(device, 1024 if quick else 8192, repeats)
    rows.append(Row(f"bf16 GEMM {1024 if quick else 8192}^3", peak / 1e12, unit="TFLOP/s"))
    sections = [
        lambda: rows_steps(experiment, batch, device, peak, repeats),
        lambda: rows_growth(experiment, batch, device, repeats),
        lambda: rows_encode(experiment, 16 if quick else 256, device, repeats),
        lambda: rows_sampling(device, (16,) if quick else (64, 256), 4 if quick else 64,
                              *((64, 2, 2) if quick else (768, 12, 12))),
        lambda: rows_lightning_loop(experiment, batch, device, 6 if quick else 30, device.type == "cuda"),
    ]
    for section in sections:
        rows += section()
        _report(rows, out)
        log.info("\n%s", table(rows))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="nativetok bench --device cuda", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/bench/bench_gpu.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the code)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: `make bench` measures the CPU")
    context = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with context:
        rows = run(Path(args.out), device, args.quick)
    print(table(rows))
    (Path(args.out).with_suffix(".md")).write_text(table(rows) + "\n")
    print(json.dumps({"torch": torch.__version__, "device": str(device)}))
    return 0
