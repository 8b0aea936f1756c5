"""`make bench`: NativeTok's cost next to the parallel baseline and to the hardware, as ratios in one run.

Rows 1, 2 and 6 use the shapes of the ImageNet-256 NativeTok-L-32 config (MIT 1024 wide and 24 deep,
32 experts 256 wide, 256 patches) at batch 2, and are repeated for the tiny default for information.
Every timing is the median of several repetitions after a warm-up. Besides the targets, the table lists
what each optimisation gains, measured against the straightforward alternative in the same run.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nativetok.config import load_config
from nativetok.config.schema import TokenizerConfig
from nativetok.lit.guards import StepGuard
from nativetok.models import ARGenerator, NativeTokenizer
from nativetok.models.graphs import EncoderGraph
from nativetok.models.mocet import MixtureOfCausalExperts
from nativetok.models.prefix_cache import FrozenPrefixCache
from nativetok.models.quantizer import Quantized
from nativetok.models.sampling import dispatch_cost_per_token
from nativetok.profiling import DispatchCounter

log = logging.getLogger(__name__)

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


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokenizer_config(experiment: str, kind: Optional[str] = None) -> tuple[TokenizerConfig, int, int]:
    config = load_config(experiment, [f"tokenizer.kind={kind}", "growth.stages=[]"] if kind else ["growth.stages=[]"])
    return config.tokenizer, config.data.image_size, config.data.channels


def build(experiment: str, kind: str = "nativetok") -> NativeTokenizer:
    torch.manual_seed(0)
    config, size, channels = tokenizer_config(experiment, kind)
    return NativeTokenizer(config, size, channels)


def images_for(tokenizer: NativeTokenizer, batch: int) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, tokenizer.channels, tokenizer.image_size, tokenizer.image_size, generator=generator)


def train_step(
    tokenizer: NativeTokenizer,
    images: Tensor,
    precision: str = "fp32",
    cache: Optional[FrozenPrefixCache] = None,
    encoder: Optional[Callable[[Tensor], Quantized]] = None,
    graphs: bool = False,
) -> Callable[[], None]:
    """One stage-1 step as the shipped one: encode, quantize, decode, pixel + quantizer losses, backward,
    clipping and the device-side skip of non-finite steps (`StepGuard`), fused AdamW.

    With a prefix cache, the images are the same views at every step (after the first, all hits);
    `encoder` stands in for the tokenizer's encoder, and `graphs` (CUDA) replays it as CUDA graphs captured
    at the first step. bf16 autocast keeps no cast cache, as under Lightning and as capture requires."""
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    guard = StepGuard(limit=10)
    device = images.device.type
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)) if precision == "bf16" \
        else nullcontext
    views = [f"image{i}" for i in range(len(images))] if cache is not None else None
    captured: List[EncoderGraph] = []

    def step() -> None:
        with autocast():
            if graphs and not captured:
                captured.append(EncoderGraph(tokenizer, images))
            out = tokenizer(images, cache=cache, views=views, encoder=captured[0] if captured else encoder)
            loss = F.mse_loss(out.reconstruction.float(), images * 2 - 1) + out.quantizer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        guard.before_step(optimizer, loss, clip=1.0)
        optimizer.step()

    return step


def ops_probe(experiment: str, kind: str, batch: int) -> None:
    """In a fresh process: the aten ops one training step dispatches (each one host-side work on a GPU),
    eager and with the encoder captured as CUDA graphs, and its host syncs; printed as JSON.

    The captured count is measured, not estimated, for what stays eager (decoder, losses, their backward,
    clipping, optimizer), with the encoder's outputs standing in; the graph adds two replays (forward,
    backward), one copy of the images into its input, and one gradient accumulation per trainable
    encoder parameter."""
    tokenizer = build(experiment, kind)
    images = images_for(tokenizer, batch)
    step = train_step(tokenizer, images)
    step()  # the optimizer's state exists from here on, as in every later step
    with DispatchCounter() as eager:
        step()
    tokens = tokenizer.quantize(images * 2 - 1)
    stand_in = Quantized(tokens.codes.detach().requires_grad_(), tokens.ids, tokens.loss.detach().requires_grad_(),
                         tokens.inputs)
    decoder = {id(p) for p in tokenizer.decoder.parameters()}
    encoder_params = sum(1 for p in tokenizer.parameters() if p.requires_grad and id(p) not in decoder)
    rest = train_step(tokenizer, images, encoder=lambda _: stand_in)
    rest()
    with DispatchCounter() as outside:
        rest()
    print(json.dumps({
        "eager": eager.total, "matmuls": eager.matmuls(), "syncs": sum(eager.syncs.values()),
        "host_data": sum(eager.host_data.values()), "captured": outside.total + 2 + 1 + encoder_params,
    }))


def row_dispatch(experiment: str, label: str, batch: int) -> List[Row]:
    """What sets a GPU step's time at these sizes: ops dispatched by the host, and host syncs."""
    native = run_probe("ops_probe", experiment, "nativetok", batch)
    parallel = run_probe("ops_probe", experiment, "parallel", batch)
    return [
        Row(f"8. aten ops per training step, NativeTok / parallel, eager ({label})",
            native["eager"] / parallel["eager"],
            detail=f"{native['eager']:,} vs {parallel['eager']:,} ops ({native['matmuls']:,} vs "
                   f"{parallel['matmuls']:,} matmuls)"),
        Row(f"   the same with the encoder captured as CUDA graphs ({label})",
            native["captured"] / parallel["captured"],
            detail=f"{native['captured']:,} vs {parallel['captured']:,} host-side ops; NativeTok captured / eager "
                   f"{native['captured'] / native['eager']:.2f}"),
        Row(f"9. host syncs + tensors from host data in a training step ({label})",
            native["syncs"] + native["host_data"] + parallel["syncs"] + parallel["host_data"], unit="",
            target="<= 0", detail="NativeTok and parallel steps, DispatchCounter").check(),
    ]


# -- a straightforward MoCET, kept as the reference the optimised one must match ------------------------


def reference_tokens(mocet: MixtureOfCausalExperts, z: Tensor, quantizer, count: int) -> Tensor:
    """Every layer of every expert over its whole context; the query position's output becomes the token."""
    codes = z.new_zeros(z.shape[0], 0, mocet.code_dim)
    ids = []
    for expert in mocet.experts[:count]:
        parts = [z]
        if expert.index > 0:
            parts.append(expert.token_in(codes) + expert.token_positions)
        parts.append(expert.query.expand(z.shape[0], -1, -1))
        x = torch.cat(parts, dim=1)
        for block in expert.blocks:
            x = block(x)
        token = quantizer(expert.head(expert.norm(x[:, -1])))
        codes = torch.cat([codes, token.codes[:, None]], dim=1)
        ids.append(token.ids)
    return torch.stack(ids, dim=1)


# -- rows ----------------------------------------------------------------------------------------------


def step_probe(experiment: str, kind: str, batch: int, repeats: int, variant: str) -> None:
    """In a fresh process: the median step time of one variant of one model, printed as JSON.

    Variants: full (everything trains); growth-decoder and growth-new (the MIT and the first half of the
    experts frozen; the decoder and codebook train too, or only the new experts); growth-cached (as
    growth-new, with Z and the frozen experts' outputs of these views cached by the warm-up step);
    optimizer-only (the growth-decoder freezing done only in the optimizer, autograd computing every
    gradient). Each variant is timed in its own process: after big steps in the same process, the next
    variant measured there was seen up to 40% slower.
    """
    tokenizer = build(experiment, kind)
    images = images_for(tokenizer, batch)
    half = tokenizer.num_tokens // 2
    cache = None
    if variant == "optimizer-only":
        step = _optimizer_only_step(tokenizer, images, half)
    else:
        if variant == "full":
            tokenizer.set_trainable(range(tokenizer.num_tokens), ["all"])
        else:
            train = {"growth-decoder": ["decoder", "codebook"], "growth-new": [], "growth-cached": []}[variant]
            tokenizer.set_trainable(range(half, tokenizer.num_tokens), train)
        if variant == "growth-cached":
            cache = FrozenPrefixCache(1 << 30)
            cache.reset(tokenizer.frozen_prefix())
        step = train_step(tokenizer, images, cache=cache)
    result = {"seconds": median_time(step, repeats, warmup=2)}
    if cache is not None:
        result["bytes_per_view"] = cache.bytes / len(cache)
    print(json.dumps(result))


def _optimizer_only_step(tokenizer: NativeTokenizer, images: Tensor, half: int) -> Callable[[], None]:
    tokenizer.set_trainable(range(tokenizer.num_tokens), ["all"])
    frozen = {id(p) for name, params in tokenizer.parts().items()
              if name == "mit" or (name.startswith("expert.") and int(name.split(".")[1]) < half) for p in params}
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if id(p) not in frozen], lr=1e-4, fused=True)

    def step() -> None:
        out = tokenizer(images)
        loss = F.mse_loss(out.reconstruction, images * 2 - 1) + out.quantizer_loss
        tokenizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_probe(function: str, *args) -> dict:
    code = f"from nativetok.bench import {function}; {function}(*{args!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{function}{args} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def row_train_ratio(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> Row:
    native = run_probe("step_probe", experiment, "nativetok", batch, repeats, "full")["seconds"]
    parallel = run_probe("step_probe", experiment, "parallel", batch, repeats, "full")["seconds"]
    detail = f"{native:.3f} s vs {parallel:.3f} s a step at batch {batch}, each in a fresh process"
    return Row(f"1. stage-1 step, NativeTok / parallel ({label})", native / parallel, target=target,
               detail=detail).check()


def row_growth_ratio(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> List[Row]:
    """A growth step (the MIT and the first half of the experts frozen) against a full step of the same model."""
    probes = {variant: run_probe("step_probe", experiment, "nativetok", batch, repeats, variant)
              for variant in ("growth-cached", "growth-new", "growth-decoder", "optimizer-only", "full")}
    seconds = {variant: probe["seconds"] for variant, probe in probes.items()}
    full, new, cached = seconds["full"], seconds["growth-new"], seconds["growth-cached"]
    per_view = probes["growth-cached"]["bytes_per_view"] / 1024
    return [
        Row(f"2. growth step / full step ({label}, only the new experts train, as HNT prescribes; views seen "
            "before in the stage: Z and the frozen experts' outputs from the prefix cache)",
            cached / full, target=target,
            detail=f"{cached:.3f} s vs {full:.3f} s; {per_view:.0f} KiB cached per view (fp32)").check(),
        Row(f"   growth step / full step ({label}, as above, views not seen before: MIT and frozen experts run)",
            new / full, detail=f"{new:.3f} s vs {full:.3f} s"),
        Row(f"   growth step / full step ({label}, the decoder and codebook train too)",
            seconds["growth-decoder"] / full, detail=f"{seconds['growth-decoder']:.3f} s vs {full:.3f} s"),
        Row(f"   gain: frozen parts without autograd ({label}, decoder trains)",
            seconds["optimizer-only"] / seconds["growth-decoder"],
            detail=f"freezing only in the optimizer: {seconds['optimizer-only']:.3f} s"),
    ]


def row_encode(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> List[Row]:
    tokenizer = build(experiment).eval()
    images = images_for(tokenizer, batch)
    with torch.no_grad():
        z = tokenizer.mit(images * 2 - 1)
        fast = tokenizer.experts(z, tokenizer.quantizer, tokenizer.num_tokens).ids
        slow = reference_tokens(tokenizer.experts, z, tokenizer.quantizer, tokenizer.num_tokens)
        identical = torch.equal(fast, slow)
        t_fast = median_time(lambda: tokenizer.experts(z, tokenizer.quantizer, tokenizer.num_tokens), repeats)
        t_slow = median_time(lambda: reference_tokens(tokenizer.experts, z, tokenizer.quantizer, tokenizer.num_tokens),
                             repeats)
        t_encode = median_time(lambda: tokenizer.encode(images), repeats)
    return [
        Row(f"3. MoCET encoding, optimised / reference ({label})", t_slow / t_fast, target=target,
            detail=f"{batch / t_fast:.1f} vs {batch / t_slow:.1f} img/s; identical tokens: {identical}").check(),
        Row(f"   whole encode (MIT + MoCET) ({label})", batch / t_encode, unit="img/s"),
    ]


def row_ar_sampling(repeats: int) -> List[Row]:
    rows = []
    labels = torch.arange(8) % 10
    for length in (32, 128):
        torch.manual_seed(0)
        model = ARGenerator(4096, length, 10, width=256, depth=4, heads=4).eval()
        cached = model.sample(labels, cfg_scale=2.0, seed=0)
        identical = torch.equal(cached, model.sample(labels, cfg_scale=2.0, seed=0, use_cache=False))
        t_cache = median_time(lambda m=model: m.sample(labels, cfg_scale=2.0, seed=0), repeats)
        t_full = median_time(lambda m=model: m.sample(labels, cfg_scale=2.0, seed=0, use_cache=False),
                             max(1, repeats // 2))
        rows.append(Row(f"4. AR sampling, KV cache / recompute ({length} tokens, CFG 2, batch 8)", t_full / t_cache,
                        target=">= 4" if length == 128 else None,
                        detail=f"{8 * length / t_cache:.0f} vs {8 * length / t_full:.0f} tokens/s; "
                               f"identical tokens: {identical}").check())
    per_call = {}
    for length in (32, 64):
        torch.manual_seed(0)
        cost = dispatch_cost_per_token(ARGenerator(4096, length, 10, width=256, depth=4, heads=4).eval(), batch=8)
        per_call[length] = {k: v * length for k, v in cost.items()}
    growth = {k: per_call[64][k] - per_call[32][k] for k in per_call[64]}
    rows.append(Row("10. AR sampler: host syncs + tensors from host data per generated token (depth 4, CFG 2)",
                    (growth["syncs"] + growth["host_data"]) / 32, unit="", target="<= 0",
                    detail=f"per call: {per_call[64]['syncs']:.0f} sync (the labels' check) whatever the length; "
                           f"{growth['ops'] / 32:.0f} aten ops per token position").check())
    for length, peer in ((64, 59), (144, 81)):
        torch.manual_seed(0)
        model = ARGenerator(4096, length, 1000, width=768, depth=12, heads=12).eval()
        classes = torch.arange(8)
        seconds = median_time(lambda m=model, c=classes: m.sample(c, cfg_scale=2.0, seed=0), 1)
        rows.append(Row(f"   AR-B sampling with KV cache ({length} tokens, CFG 2, batch 8)", 8 * length / seconds,
                        unit="tok/s", target=f">= {peer}",
                        detail=f"LlamaGen GPT-B measured on such a machine: {peer} tok/s").check())
    return rows


def row_data(repeats: int) -> Row:
    from nativetok.data import ImageShardsDataModule

    config = load_config(TINY)
    module = ImageShardsDataModule(config.data, seed=0)
    loader = module.make_stream(True)
    count, batches = 0, 0
    iterator = iter(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=config.data.num_workers))
    next(iterator)
    start = time.perf_counter()
    for batch in iterator:
        count += len(batch["label"])
        batches += 1
        if batches == 150:
            break
    delivered = count / (time.perf_counter() - start)
    tokenizer = build(TINY)
    images = images_for(tokenizer, config.data.batch_size)
    consumed = config.data.batch_size / median_time(train_step(tokenizer, images), repeats)
    return Row("5. data delivered / consumed by a default training step", delivered / consumed, target=">= 5",
               detail=f"{delivered:.0f} vs {consumed:.0f} img/s ({config.data.num_workers} workers)").check()


def mit_flops(config: TokenizerConfig, image_size: int, channels: int, batch: int) -> float:
    """Forward + backward FLOPs of the MIT: 3 x (matmuls + attention)."""
    tokens = (image_size // config.patch_size) ** 2
    width = config.mit.width
    hidden = int(width * config.mit.mlp_ratio)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width
    embed = 2 * tokens * config.patch_size ** 2 * channels * width + 2 * tokens * width * config.latent_width
    return 3.0 * batch * (config.mit.depth * per_layer + embed)


def matmul_flops_per_second(dtype: torch.dtype, repeats: int, size: int = 4096) -> float:
    """The best rate of a large matrix multiply into a preallocated output: what the hardware sustains."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(max(3, repeats)):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def row_mfu(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> List[Row]:
    config, size, channels = tokenizer_config(experiment)
    torch.manual_seed(0)
    tokenizer = NativeTokenizer(config, size, channels)
    mit = tokenizer.mit
    x = images_for(tokenizer, batch) * 2 - 1
    flops = mit_flops(config, size, channels, batch)
    rows = []
    seconds = {}
    for name, context in (("SDPA", nullcontext), ("math attention", _math_attention)):
        with context():
            seconds[name] = median_time(lambda: mit(x).sum().backward(), repeats)
    peak = matmul_flops_per_second(torch.float32, repeats)
    rows.append(Row(f"6. MIT forward+backward MFU ({label})", flops / seconds["SDPA"] / peak, unit="",
                    target=target, detail=f"{flops / seconds['SDPA'] / 1e9:.0f} of {peak / 1e9:.0f} GFLOP/s "
                                          f"(fp32 4096^3 matmul)").check())
    rows.append(Row(f"   gain: SDPA over math attention ({label})", seconds["math attention"] / seconds["SDPA"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = median_time(lambda: mit(x).sum().backward(), repeats)
    rows.append(Row(f"   gain: bf16 autocast over fp32, MIT fwd+bwd ({label})", seconds["SDPA"] / bf16,
                    detail=f"bf16 4096^3 matmul: {matmul_flops_per_second(torch.bfloat16, repeats) / 1e9:.0f} GFLOP/s"))
    return rows


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def row_last_layer_gain(experiment: str, label: str, batch: int, repeats: int) -> Row:
    """Experts forward+backward: the last layer only at the query position, against the whole context."""
    tokenizer = build(experiment)
    z = tokenizer.mit(images_for(tokenizer, batch) * 2 - 1).detach().requires_grad_()

    def optimised():
        tokenizer.experts(z, tokenizer.quantizer, tokenizer.num_tokens).codes.sum().backward()

    def whole_context():
        mocet, codes = tokenizer.experts, z.new_zeros(z.shape[0], 0, tokenizer.experts.code_dim)
        for expert in mocet.experts:
            parts = [z] + ([expert.token_in(codes) + expert.token_positions] if expert.index else [])
            x = torch.cat(parts + [expert.query.expand(z.shape[0], -1, -1)], dim=1)
            for block in expert.blocks:
                x = block(x)
            codes = torch.cat([codes, tokenizer.quantizer(expert.head(expert.norm(x[:, -1]))).codes[:, None]], 1)
        codes.sum().backward()

    fast, slow = median_time(optimised, repeats), median_time(whole_context, repeats)
    return Row(f"   gain: experts' last layer at the query only, fwd+bwd ({label})", slow / fast,
               detail=f"{fast:.3f} s vs {slow:.3f} s")


def row_fused_adamw(experiment: str, label: str, repeats: int) -> Row:
    tokenizer = build(experiment)
    params = list(tokenizer.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    fused = torch.optim.AdamW(params, fused=True)
    foreach = torch.optim.AdamW(params, foreach=True)
    t_fused, t_foreach = median_time(fused.step, repeats), median_time(foreach.step, repeats)
    return Row(f"   gain: fused AdamW over foreach, optimizer step ({label})", t_foreach / t_fused,
               detail=f"{t_fused:.3f} s vs {t_foreach:.3f} s")


def row_compile_gain(repeats: int) -> Row:
    tokenizer = build(TINY)
    images = images_for(tokenizer, 32)
    eager = median_time(train_step(tokenizer, images), repeats)
    tokenizer.mit.compile()
    tokenizer.decoder.compile()
    compiled = median_time(train_step(tokenizer, images), repeats, warmup=2)
    return Row("   gain: torch.compile of MIT and decoder, default step", eager / compiled,
               detail=f"{compiled:.3f} s vs {eager:.3f} s eager (after compiling)")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(experiment: str, batch: int) -> None:
    """In a fresh process: peak resident memory (MiB) of two training steps, printed as JSON.

    The peak is reset after the imports (Linux: "5" in /proc/self/clear_refs), so it is the step's own."""
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    tokenizer = build(experiment)
    step = train_step(tokenizer, images_for(tokenizer, batch))
    step()
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM"), "baseline_mib": before}))


def row_memory(experiment: str, label: str, batch: int) -> Row:
    if torch.cuda.is_available():
        tokenizer = build(experiment).cuda()
        torch.cuda.reset_peak_memory_stats()
        train_step(tokenizer, images_for(tokenizer, batch).cuda())()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return Row(f"7. peak memory of a stage-1 step ({label}, batch {batch})", peak, unit="MiB (GPU)")
    measured = run_probe("memory_probe", experiment, batch)
    return Row(f"7. peak memory of a stage-1 step ({label}, batch {batch})", measured["peak_mib"], unit="MiB RSS",
               detail=f"process before the model: {measured['baseline_mib']:.0f} MiB")


def run(out: Path, repeats: int = 3, quick: bool = False) -> List[Row]:
    """Every row (the step and memory rows each in a fresh process); `quick` leaves out the L-32 shapes."""
    rows: List[Row] = []
    shapes = [(TINY, "tiny default", 32)] + ([] if quick else [(L32, "L-32 shapes", 2)])
    for experiment, label, batch in reversed(shapes):
        big = experiment == L32
        # Each row builds its own model and frees it: at L-32 sizes two would not fit in memory. The rows
        # that need a fresh process (steps, memory) run first, while this process is still small.
        rows.append(row_memory(experiment, label, batch))
        rows += row_dispatch(experiment, label, batch)
        rows.append(row_train_ratio(experiment, label, batch, repeats, "<= 1.10" if big else None))
        rows += row_growth_ratio(experiment, label, batch, repeats, "<= 0.5" if big else None)
        _report(rows, out)
        rows += row_mfu(experiment, label, batch, repeats, ">= 0.40" if big else None)
        _report(rows, out)
        rows.append(row_last_layer_gain(experiment, label, batch, repeats))
        _report(rows, out)
        rows.append(row_fused_adamw(experiment, label, repeats))
        _report(rows, out)
        rows += row_encode(experiment, label, 8 if big else 256, repeats, ">= 1.5" if big else None)
        _report(rows, out)
    rows += row_ar_sampling(repeats)
    rows.append(row_data(repeats))
    rows.append(row_compile_gain(repeats))
    _report(rows, out)
    return rows


def release_memory() -> None:
    """Free dropped models and hand the memory back to the system (glibc keeps freed heap otherwise), so
    that the fresh processes of the probes find it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _report(rows: List[Row], out: Path) -> None:
    """Write what is measured so far (a long run shows progress, and an interrupted one keeps its rows)."""
    release_memory()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(rows) + "\n")


def table(rows: List[Row]) -> str:
    lines = ["| measurement | value | target | | detail |", "| --- | ---: | --- | --- | --- |"]
    for r in rows:
        value = f"{r.value:.3f}" if r.unit in ("x", "") and r.value < 100 else f"{r.value:.0f}"
        mark = "" if r.passed is None else ("ok" if r.passed else "MISSED")
        unit = "" if r.unit in ("x", "") else f" {r.unit}"
        lines.append(f"| {r.name} | {value}{unit} | {r.target or ''} | {mark} | {r.detail} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="nativetok bench", description=__doc__)
    parser.add_argument("--out", default="runs/bench/bench.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes only")
    args = parser.parse_args(argv)
    rows = run(Path(args.out), args.repeats, args.quick)
    print(table(rows))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
