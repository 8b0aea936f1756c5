"""`make bench`: NativeTok's cost next to the parallel baseline and to the hardware, as ratios in one run.

    python benchmarks/bench.py --device cpu --out runs/bench/bench.json [--quick] [--repeats N]

Rows 1, 2 and 6 use the shapes of the ImageNet-256 NativeTok-L-32 config (MIT 1024 wide and 24 deep,
32 experts 256 wide, 256 patches) at batch 2, and are repeated for the tiny default for information.
The training-step rows time the shipped step: `train_tokenizer` (TokenizerModule under Lightning, its
DataModule) with a callback timing each step. Every timing is the median of several repetitions after a
warm-up. Besides the targets, the table lists what each optimisation gains, measured against the
straightforward alternative in the same run. `--device cuda` runs the GPU table (bench_gpu.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: `benchmarks` is imported from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    L32,
    TINY,
    Row,
    StepTimer,
    build,
    growth_stages,
    images_for,
    median_time,
    release_memory,
    report,
    run_probe,
    table,
    tokenizer_config,
    train_steps,
)
from benchmarks.profiling import DispatchCounter, dispatch_cost_per_token  # noqa: E402
from benchmarks.reference_mocet import reference_mocet  # noqa: E402
from nativetok.config import load_config  # noqa: E402
from nativetok.config.schema import TokenizerConfig  # noqa: E402
from nativetok.models import ARGenerator  # noqa: E402

log = logging.getLogger(__name__)
HERE = "benchmarks.bench"

# Step variants (each a training run in a fresh process: after big steps in the same process, the next
# variant measured there was seen up to 40% slower). growth-*: the MIT and the first half of the experts
# frozen from the second step on; only the new experts train, or the decoder and codebook too;
# growth-cached: as growth-new, with Z and the frozen experts' outputs of views seen before cached.
VARIANTS = {
    "full": lambda n: ["growth.stages=[]"],
    "growth-new": lambda n: growth_stages(n, []),
    "growth-decoder": lambda n: growth_stages(n, ["decoder", "codebook"]),
    "growth-cached": lambda n: growth_stages(n, []) + ["growth.cache_gib=1"],
}


def step_probe(experiment: str, kind: str, batch: int, repeats: int, variant: str, synthetic: Optional[int] = 2
               ) -> None:
    """In a fresh process: the median time of the shipped training step, one variant of one model, as JSON;
    on `synthetic` batches of images, or with None the experiment's data."""
    num_tokens = tokenizer_config(experiment, kind)[0].num_tokens
    overrides = [f"tokenizer.kind={kind}", *VARIANTS[variant](num_tokens)]
    timer = train_steps(experiment, batch, StepTimer(3, repeats), overrides, synthetic=synthetic)
    result = {"seconds": timer.median}
    cache = getattr(timer.module, "prefix_cache", None)
    if cache is not None and len(cache):
        result.update(bytes_per_view=cache.bytes / len(cache), hit_rate=cache.hit_rate)
    print(json.dumps(result))


def ops_probe(experiment: str, kind: str, batch: int) -> None:
    """In a fresh process: the aten ops one shipped training step dispatches (each one host-side work on a
    GPU), eager and with the encoder captured as CUDA graphs, and its host syncs; printed as JSON.

    The step is a quiet one (no logs written), after the optimizer's state exists. The captured count
    takes out the encoder's forward and backward ops (counted on the model) and adds what a graph costs:
    two replays (forward, backward), one copy of the images into its input, and one gradient accumulation
    per trainable encoder parameter."""
    timer = train_steps(experiment, batch, StepTimer(2, 1, DispatchCounter), [f"tokenizer.kind={kind}",
                                                                              "growth.stages=[]"])
    eager = timer.probes[0]
    timer.module = None  # the trained model and its optimizer: freed before the next model (L-32: two do not fit)
    release_memory()
    tokenizer = build(experiment, kind)
    decoder = {id(p) for p in tokenizer.decoder.parameters()}
    encoder_params = sum(1 for p in tokenizer.parameters() if p.requires_grad and id(p) not in decoder)
    signed = images_for(tokenizer, batch) * 2 - 1
    with DispatchCounter() as encoder:
        tokens = tokenizer.quantize(signed)
        (tokens.codes.sum() + tokens.loss).backward()
    with DispatchCounter() as scalar:  # what the line above adds besides the encoder
        stand_in = torch.ones(2, requires_grad=True)
        (stand_in.sum() + stand_in[0]).backward()
    print(json.dumps({
        "eager": eager.total, "matmuls": eager.matmuls(), "syncs": sum(eager.syncs.values()),
        "host_data": sum(eager.host_data.values()),
        "captured": eager.total - (encoder.total - scalar.total) + 2 + 1 + encoder_params,
    }))


def row_dispatch(experiment: str, label: str, batch: int) -> List[Row]:
    """What sets a GPU step's time at these sizes: ops dispatched by the host, and host syncs."""
    native = run_probe(HERE, "ops_probe", experiment, "nativetok", batch)
    parallel = run_probe(HERE, "ops_probe", experiment, "parallel", batch)
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


def row_train_ratio(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> Row:
    native = run_probe(HERE, "step_probe", experiment, "nativetok", batch, repeats, "full")["seconds"]
    parallel = run_probe(HERE, "step_probe", experiment, "parallel", batch, repeats, "full")["seconds"]
    detail = f"{native:.3f} s vs {parallel:.3f} s a step at batch {batch}, each in a fresh process"
    return Row(f"1. stage-1 step, NativeTok / parallel ({label})", native / parallel, target=target,
               detail=detail).check()


def row_growth_ratio(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> List[Row]:
    """A growth step (the MIT and the first half of the experts frozen) against a full step of the same model."""
    probes = {variant: run_probe(HERE, "step_probe", experiment, "nativetok", batch, repeats, variant)
              for variant in VARIANTS}
    seconds = {variant: probe["seconds"] for variant, probe in probes.items()}
    full, new, cached = seconds["full"], seconds["growth-new"], seconds["growth-cached"]
    per_view = probes["growth-cached"].get("bytes_per_view", float("nan")) / 1024
    hits = probes["growth-cached"].get("hit_rate", float("nan"))
    return [
        Row(f"2. growth step / full step ({label}, only the new experts train, as HNT prescribes; views seen "
            "before in the stage: Z and the frozen experts' outputs from the prefix cache)",
            cached / full, target=target,
            detail=f"{cached:.3f} s vs {full:.3f} s; {per_view:.0f} KiB cached per view (fp32), "
                   f"hit rate {hits:.2f}").check(),
        Row(f"   growth step / full step ({label}, as above, views not seen before: MIT and frozen experts run)",
            new / full, detail=f"{new:.3f} s vs {full:.3f} s"),
        Row(f"   growth step / full step ({label}, the decoder and codebook train too)",
            seconds["growth-decoder"] / full, detail=f"{seconds['growth-decoder']:.3f} s vs {full:.3f} s"),
        row_frozen_gain(experiment, label, batch, repeats),
    ]


def row_frozen_gain(experiment: str, label: str, batch: int, repeats: int) -> Row:
    """The tokenizer's forward and backward with the growth-decoder parts frozen (`set_trainable`: no autograd
    through them) against every part requiring gradients (freezing done only in the optimizer)."""
    tokenizer = build(experiment)
    images = images_for(tokenizer, batch)
    half = tokenizer.num_tokens // 2

    def forward_backward():
        out = tokenizer(images)
        (out.reconstruction.square().mean() + out.quantizer_loss).backward()
        tokenizer.zero_grad(set_to_none=True)

    everything = median_time(forward_backward, repeats)
    tokenizer.set_trainable(range(half, tokenizer.num_tokens), ["decoder", "codebook"])
    frozen = median_time(forward_backward, repeats)
    return Row(f"   gain: frozen parts without autograd ({label}, decoder trains; forward + backward)",
               everything / frozen, detail=f"{frozen:.3f} s vs every gradient computed: {everything:.3f} s")


def row_encode(experiment: str, label: str, batch: int, repeats: int, target: Optional[str]) -> List[Row]:
    """MoCET's encoding against the reference (tests/test_reference_mocet.py checks their tokens agree)."""
    tokenizer = build(experiment).eval()
    images = images_for(tokenizer, batch)
    count = tokenizer.num_tokens
    with torch.no_grad():
        z = tokenizer.mit(images * 2 - 1)
        identical = torch.equal(tokenizer.experts(z, tokenizer.quantizer, count).ids,
                                reference_mocet(tokenizer.experts, z, tokenizer.quantizer, count)[1])
        t_fast = median_time(lambda: tokenizer.experts(z, tokenizer.quantizer, count), repeats)
        t_slow = median_time(lambda: reference_mocet(tokenizer.experts, z, tokenizer.quantizer, count), repeats)
        t_encode = median_time(lambda: tokenizer.encode(images), repeats)
    return [
        Row(f"3. MoCET encoding, optimised / reference ({label})", t_slow / t_fast, target=target,
            detail=f"{batch / t_fast:.1f} vs {batch / t_slow:.1f} img/s; identical tokens: {identical}").check(),
        Row(f"   whole encode (MIT + MoCET) ({label})", batch / t_encode, unit="img/s"),
    ]


def row_kv_cache(repeats: int) -> List[Row]:
    """AR sampling with the KV cache against recomputing every position (tests/test_fast_sampling.py checks
    they give the same tokens)."""
    rows = []
    labels = torch.arange(8) % 10
    for length in (32, 128):
        torch.manual_seed(0)
        model = ARGenerator(4096, length, 10, width=256, depth=4, heads=4).eval()
        identical = torch.equal(model.sample(labels, cfg_scale=2.0, seed=0),
                                model.sample(labels, cfg_scale=2.0, seed=0, use_cache=False))
        t_cache = median_time(lambda m=model: m.sample(labels, cfg_scale=2.0, seed=0), repeats)
        t_full = median_time(lambda m=model: m.sample(labels, cfg_scale=2.0, seed=0, use_cache=False),
                             max(1, repeats // 2))
        rows.append(Row(f"4. AR sampling, KV cache / recompute ({length} tokens, CFG 2, batch 8)", t_full / t_cache,
                        target=">= 4" if length == 128 else None,
                        detail=f"{8 * length / t_cache:.0f} vs {8 * length / t_full:.0f} tokens/s; "
                               f"identical tokens: {identical}").check())
    return rows


def row_ar_sampling(repeats: int) -> List[Row]:
    rows = row_kv_cache(repeats)
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
    """Images/s the DataModule delivers against images/s the shipped step consumes, both on the embedded data."""
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
    step = run_probe(HERE, "step_probe", TINY, "nativetok", config.data.batch_size, repeats, "full", None)["seconds"]
    consumed = config.data.batch_size / step
    return Row("5. data delivered / consumed by a default training step", delivered / consumed, target=">= 5",
               detail=f"{delivered:.0f} vs {consumed:.0f} img/s ({config.data.num_workers} workers)").check()


def row_inception_layout(repeats: int, images: int = 16) -> Row:
    """The offline Inception extractor (FID's features) in channels_last, its CPU default, against the contiguous
    layout, on Fashion-MNIST-sized grey images, and how far its features move."""
    from nativetok.eval.inception import InceptionFeatures, inception_weights

    weights = inception_weights()
    batch = torch.randint(0, 256, (images, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fast, plain = InceptionFeatures(weights), InceptionFeatures(weights, channels_last=False)
    seconds = {"fast": median_time(lambda: fast(batch), repeats), "plain": median_time(lambda: plain(batch), repeats)}
    reference = plain(batch)["pool"]
    moved = (fast(batch)["pool"] - reference).abs().max() / reference.abs().mean()
    return Row("   gain: Inception features in channels_last (the CPU default)", seconds["plain"] / seconds["fast"],
               detail=f"{1000 * seconds['fast'] / images:.0f} vs {1000 * seconds['plain'] / images:.0f} ms an image; "
                      f"features moved by at most {moved:.1e} of their mean")


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
    tokenizer = build(experiment)
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
    if not native_bf16():  # emulated, a 4096^3 bf16 matmul alone takes minutes: nothing to learn from it
        log.info("bf16 gain at %s not measured: this CPU has no native bf16", label)
        return rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = median_time(lambda: mit(x).sum().backward(), repeats)
    rows.append(Row(f"   gain: bf16 autocast over fp32, MIT fwd+bwd ({label})", seconds["SDPA"] / bf16,
                    detail=f"bf16 4096^3 matmul: {matmul_flops_per_second(torch.bfloat16, repeats) / 1e9:.0f} GFLOP/s"))
    return rows


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it torch emulates bf16."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def row_last_layer_gain(experiment: str, label: str, batch: int, repeats: int) -> Row:
    """Experts forward+backward: the last layer only at the query position, against the whole context."""
    tokenizer = build(experiment)
    z = tokenizer.mit(images_for(tokenizer, batch) * 2 - 1).detach().requires_grad_()
    mocet, quantizer, count = tokenizer.experts, tokenizer.quantizer, tokenizer.num_tokens
    fast = median_time(lambda: mocet(z, quantizer, count).codes.sum().backward(), repeats)
    slow = median_time(lambda: reference_mocet(mocet, z, quantizer, count)[0].sum().backward(), repeats)
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


def compile_probe(repeats: int, compile: bool) -> None:
    """In a fresh process: the default shipped step at batch 32, with `trainer.compile` or without; JSON."""
    overrides = ["growth.stages=[]", f"trainer.compile={str(compile).lower()}"]
    timer = train_steps(TINY, 32, StepTimer(3, repeats), overrides)
    print(json.dumps({"seconds": timer.median}))


def row_compile_gain(repeats: int) -> Row:
    eager = run_probe(HERE, "compile_probe", repeats, False)["seconds"]
    compiled = run_probe(HERE, "compile_probe", repeats, True)["seconds"]
    return Row("   gain: torch.compile of MIT and decoder (trainer.compile), default step", eager / compiled,
               detail=f"{compiled:.3f} s vs {eager:.3f} s eager (after compiling)")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(experiment: str, batch: int) -> None:
    """In a fresh process: peak resident memory (MiB) over two shipped training steps, printed as JSON.

    The peak is reset after the imports (Linux: "5" in /proc/self/clear_refs), so it is the training's own."""
    import pytorch_lightning  # noqa: F401  (imported before the baseline, as everything the training needs)

    from nativetok.lit import train  # noqa: F401

    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train_steps(experiment, batch, StepTimer(0, 2), ["growth.stages=[]"])
    print(json.dumps({"peak_mib": _status_mib("VmHWM"), "baseline_mib": before}))


def row_memory(experiment: str, label: str, batch: int) -> Row:
    measured = run_probe(HERE, "memory_probe", experiment, batch)
    return Row(f"7. peak memory of a stage-1 step ({label}, batch {batch})", measured["peak_mib"], unit="MiB RSS",
               detail=f"process before the training: {measured['baseline_mib']:.0f} MiB")


def rows_for(experiment: str, label: str, batch: int, repeats: int, out: Path, rows: List[Row]) -> None:
    """The rows of one set of shapes, appended to `rows` and written as they come. Each row builds its own
    model and frees it: at L-32 sizes two would not fit in memory. The rows that run in a fresh process
    (steps, memory) come first, while this process is still small."""
    big = experiment == L32
    sections = [
        lambda: [row_memory(experiment, label, batch)],
        lambda: row_dispatch(experiment, label, batch),
        lambda: [row_train_ratio(experiment, label, batch, repeats, "<= 1.10" if big else None)],
        lambda: row_growth_ratio(experiment, label, batch, repeats, "<= 0.5" if big else None),
        lambda: row_mfu(experiment, label, batch, repeats, ">= 0.40" if big else None),
        lambda: [row_last_layer_gain(experiment, label, batch, repeats)],
        lambda: [row_fused_adamw(experiment, label, repeats)],
        lambda: row_encode(experiment, label, 8 if big else 256, repeats, ">= 1.5" if big else None),
    ]
    for section in sections:
        rows += section()
        report(rows, out)


def run(out: Path, repeats: int = 3, quick: bool = False) -> List[Row]:
    """Every row; `quick` leaves out the L-32 shapes."""
    rows: List[Row] = []
    shapes = [(TINY, "tiny default", 32)] + ([] if quick else [(L32, "L-32 shapes", 2)])
    for experiment, label, batch in reversed(shapes):
        rows_for(experiment, label, batch, repeats, out, rows)
    for section in (lambda: row_ar_sampling(repeats), lambda: [row_data(repeats)], lambda: [row_compile_gain(repeats)],
                    lambda: [row_inception_layout(repeats)]):
        rows += section()
        report(rows, out)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu: `make bench`; cuda: `make bench-gpu` (bench_gpu.py)")
    parser.add_argument("--out", default=None, help="JSON file (a .md table beside it); default runs/bench/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes only")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        from benchmarks.bench_gpu import main as bench_gpu

        return bench_gpu(["--device", args.device, "--out", args.out or "runs/bench/bench_gpu.json"]
                         + (["--quick"] if args.quick else []))
    rows = run(Path(args.out or "runs/bench/bench.json"), args.repeats, args.quick)
    print(table(rows))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
