"""What both benchmark tables share: rows and their table, timing, models and images, and the shipped
stage-1 training (`train_tokenizer`) timed step by step by a callback."""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, List, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from nativetok.config import load_config
from nativetok.config.schema import TokenizerConfig
from nativetok.models.tokenizer import NativeTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
L32 = "experiments/imagenet256_nativetok_l32.yaml"
TINY = "experiments/fmnist_tiny.yaml"


@dataclass
class Row:
    name: str
    value: float
    unit: str = "x"
    target: Optional[str] = None  # e.g. "<= 1.10"
    detail: str = ""
    passed: Optional[bool] = field(default=None)

    def check(self) -> "Row":
        if self.target:
            op, bound = self.target.split()
            self.passed = self.value <= float(bound) if op == "<=" else self.value >= float(bound)
        return self


def table(rows: List[Row]) -> str:
    lines = ["| measurement | value | target | | detail |", "| --- | ---: | --- | --- | --- |"]
    for r in rows:
        value = f"{r.value:.3f}" if r.unit in ("x", "") and r.value < 100 else f"{r.value:.0f}"
        mark = "" if r.passed is None else ("ok" if r.passed else "MISSED")
        unit = "" if r.unit in ("x", "") else f" {r.unit}"
        lines.append(f"| {r.name} | {value}{unit} | {r.target or ''} | {mark} | {r.detail} |")
    return "\n".join(lines)


def release_memory() -> None:
    """Free dropped models and hand the memory back to the system (glibc keeps freed heap otherwise), so
    that the fresh processes of the probes find it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def report(rows: List[Row], out: Path, **extra) -> None:
    """Write what is measured so far (a long run shows progress, and an interrupted one keeps its rows)."""
    release_memory()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **extra,
                               "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(rows) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device = CPU) -> float:
    """Median wall time of a call after `warmup` calls, the device drained before and after each."""
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


def tokenizer_config(experiment: str, kind: Optional[str] = None) -> tuple[TokenizerConfig, int, int]:
    config = load_config(experiment, [f"tokenizer.kind={kind}", "growth.stages=[]"] if kind else ["growth.stages=[]"])
    return config.tokenizer, config.data.image_size, config.data.channels


def build(experiment: str, kind: str = "nativetok") -> NativeTokenizer:
    """The experiment's tokenizer, every expert active and trainable, seeded."""
    torch.manual_seed(0)
    config, size, channels = tokenizer_config(experiment, kind)
    return build_tokenizer(config, size, channels)


def images_for(tokenizer: NativeTokenizer, batch: int, device: Optional[torch.device] = None) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, generator=generator)
    return images.to(device) if device is not None else images


def run_probe(module: str, function: str, *args) -> dict:
    """`module.function(*args)` in a fresh process; its last line of output, JSON."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from {module} import {function}; {function}(*{args!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"{function}{args} failed: {result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


# -- the shipped training, timed -------------------------------------------------------------------------


class _Measured(Exception):
    """Raised by `StepTimer` once its steps are measured: training stops there, without a final checkpoint."""


class StepTimer(pl.Callback):
    """Wall time of each training batch (the step, data loading excluded) after `warmup` batches, the device
    drained at both ends, for `steps` batches; `probe` (a context manager factory, e.g. `DispatchCounter`)
    is entered around each measured step. `loop`: the wall time from the first measured step's start to the
    last one's end, the Lightning loop and the data between them included."""

    def __init__(self, warmup: int, steps: int, probe: Callable[[], ContextManager] = nullcontext):
        self.warmup, self.steps, self.probe = warmup, steps, probe
        self.seen, self.seconds, self.probes, self.began, self.loop = 0, [], [], None, None
        self.module: Optional[pl.LightningModule] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen > self.warmup:
            synchronize(pl_module.device)
            self.probes.append(self.probe())
            self.probes[-1].__enter__()
            self.start = time.perf_counter()
            self.began = self.began or self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seen > self.warmup:
            synchronize(pl_module.device)
            end = time.perf_counter()
            self.probes[-1].__exit__(None, None, None)
            self.seconds.append(end - self.start)
            if len(self.seconds) == self.steps:
                self.loop, self.module = end - self.began, pl_module
                raise _Measured()

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synthetic_shards(folder: Path, count: int, size: int, channels: int, classes: int = 10, per_shard: int = 256
                     ) -> Path:
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
                            "cls": str(i % classes).encode()})
        name = shard_name("synthetic", "train", number)
        write_shard(folder / name, samples)
        entries.append(ShardEntry(name, len(samples)))
    index = DatasetIndex("synthetic", size, channels, [str(c) for c in range(classes)],
                         {"train": SplitIndex(entries), "val": SplitIndex(entries[:1])}, fmt="jpg", root=folder)
    return index.save(folder)


def growth_stages(experts: int, train: Sequence[str]) -> List[str]:
    """Overrides for a growth step from the second step on: the first half of the experts (and the MIT) frozen,
    the second half new; besides them `train` trains (HNT's stages)."""
    stages = f"[{{step: 0, experts: {experts // 2}, train: [all]}}, {{step: 1, experts: {experts}, " \
             f"train: [{', '.join(train)}]}}]"
    return [f"growth.stages={stages}", "growth.allow_moving_frozen_tokens=true"]


def train_steps(experiment: str, batch: int, timer: StepTimer, overrides: Sequence[str] = (),
                device: torch.device = CPU, synthetic: Optional[int] = 2) -> StepTimer:
    """Stage-1 training as `nativetok train` runs it (`train_tokenizer`: TokenizerModule, Lightning, the
    DataModule) until `timer` has measured its steps. The data: `synthetic` batches of smooth random images
    as shards (the same views every `synthetic` steps, so a prefix cache hits), or with None the
    experiment's own data. The losses are the pixel and quantizer ones (no perceptual loss, no GAN, no EMA);
    no validation, logs only every 1000 steps, no checkpoint written."""
    from nativetok.lit.train import train_tokenizer

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as folder:
        base = load_config(experiment)
        data = []
        if synthetic:
            index = synthetic_shards(Path(folder) / "shards", batch * synthetic, base.data.image_size,
                                     base.data.channels, base.data.num_classes)
            # At L-32 sizes on a CPU a forked data worker doubles the memory: it shares the weights' pages, which
            # the optimizer's first step then copies (copy-on-write); there the synthetic batches load in the
            # step's process. On a GPU the weights live on the device and the experiment's workers decode.
            workers = base.data.num_workers if cuda else 0 if experiment == L32 else 1
            data = [f"data.index={index}", "data.hflip=false", f"data.shuffle_buffer={batch}",
                    f"data.num_workers={workers}"]
        steps = timer.warmup + timer.steps + 1
        config = load_config(experiment, [
            *data, f"data.batch_size={batch}", "data.val_samples=32", f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
            "trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto",
            f"trainer.precision={'bf16-mixed' if cuda else '32-true'}", f"trainer.max_steps={steps}",
            f"trainer.val_every_n_steps={10 * steps}", "trainer.log_every_n_steps=1000", "trainer.logger=csv",
            "trainer.images_every_n_steps=0", "trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=0",
            "loss.disc_weight=0", "loss.perceptual_weight=0", "optim.ema_decay=0", f"run.dir={folder}/run",
            "run.resume=never", *overrides,
        ])
        try:
            with warnings.catch_warnings():  # the synthetic data's epochs are shorter than the logging interval
                warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
                train_tokenizer(config, [timer])
        except _Measured:
            pass
    if len(timer.seconds) < timer.steps:
        raise RuntimeError(f"training ended after {timer.seen} steps, before {timer.steps} were measured")
    return timer
