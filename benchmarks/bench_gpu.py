"""`make bench-gpu`: the GPU table, as ratios measured in one run.

    python benchmarks/bench_gpu.py --device cuda --out runs/bench/bench_gpu.json [--quick]

One prepared run of a few minutes on one GPU, offline, with nothing beyond the project's dependencies.
At the ImageNet-256 L-32 shapes, batch 32, bf16 autocast, it measures: the chip's bf16 GEMM rate (the
practical peak for MFU); the shipped stage-1 step (`train_tokenizer`: TokenizerModule, Lightning, the
DataModule on shards) of NativeTok, parallel and causal-mask tokenizers, eager and with the encoder
replayed as CUDA graphs (`trainer.cuda_graphs`), with img/s and MFU (FLOPs counted by
`torch.utils.flop_counter`); the Lightning loop with its data against the step alone; a growth step
against a full step; encoding img/s; AR-B sampling tokens/s at 64 and 256 tokens (batch 64, CFG 2), eager
and graphed. `--device cpu --quick` runs the same code at tiny shapes (a smoke test; CPU timings are
`make bench`'s business).
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: `benchmarks` is imported from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

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
    table,
    train_steps,
)
from benchmarks.profiling import sampling_throughput  # noqa: E402
from nativetok.models import ARGenerator, NativeTokenizer  # noqa: E402
from nativetok.models.graphs import FixedShapeStep  # noqa: E402

log = logging.getLogger(__name__)

KINDS = ("nativetok", "parallel", "causal_mask")


def shapes(experiment: str) -> str:
    return "L-32" if experiment == L32 else "tiny"


def autocast(device: torch.device):
    # cache_enabled=False: what Lightning uses, and what CUDA-graph capture requires.
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def gemm_flops_per_second(device: torch.device, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=3, device=device)


def fresh(experiment: str, kind: str, device: torch.device) -> NativeTokenizer:
    """A tokenizer built on the device (initialising 600M parameters there takes a moment, on a CPU minutes)."""
    with device:
        return build(experiment, kind)


def step_flops(experiment: str, kind: str, batch: int, device: torch.device) -> float:
    """Forward and backward FLOPs of the tokenizer in one step (matmuls and attention, as counted by torch)."""
    tokenizer = fresh(experiment, kind, device)
    images = images_for(tokenizer, batch, device)
    with FlopCounterMode(display=False) as counter, autocast(device):
        out = tokenizer(images)
        (out.reconstruction.float().square().mean() + out.quantizer_loss).backward()
    del tokenizer
    release_memory()
    return float(counter.get_total_flops())


def shipped_step(experiment: str, kind: str, batch: int, device: torch.device, repeats: int, graphs: bool,
                 overrides: List[str] = ()) -> StepTimer:
    """The shipped stage-1 step, timed over `repeats` steps after three (the graphs captured in them)."""
    timer = train_steps(experiment, batch, StepTimer(3, repeats), [
        f"tokenizer.kind={kind}", f"trainer.cuda_graphs={str(graphs).lower()}", *(overrides or ["growth.stages=[]"])
    ], device)
    timer.module = None  # the model, its optimizer and graphs: freed before the next one is built
    release_memory()
    return timer


def on_gpu(device: torch.device, target: str) -> Optional[str]:
    """Targets are for the GPU; the CPU smoke run reports its figures without judging them."""
    return target if device.type == "cuda" else None


def rows_steps(experiment: str, batch: int, device: torch.device, peak: float, repeats: int) -> List[Row]:
    """Stage-1 steps of each tokenizer kind, eager and graphed, with img/s and MFU; NativeTok / parallel; the
    Lightning loop with its data against the step alone."""
    rows, best, loop = [], {}, None
    for kind in KINDS:
        flops = step_flops(experiment, kind, batch, device)
        timers = {"eager": shipped_step(experiment, kind, batch, device, repeats, False)}
        if device.type == "cuda":
            timers["graphed"] = shipped_step(experiment, kind, batch, device, repeats, True)
        setting = min(timers, key=lambda name: timers[name].median)
        best[kind] = timers[setting].median
        loop = loop or (timers[setting], setting)
        detail = ", ".join(f"{name} {t.median * 1e3:.1f} ms" for name, t in timers.items())
        rows.append(Row(f"{shapes(experiment)} step, {kind} (batch {batch}, bf16), best: {setting}", batch / best[kind],
                        unit="img/s", target=on_gpu(device, ">= 250") if kind == "nativetok" else None,
                        detail=f"{detail}; MFU {flops / best[kind] / peak:.2f} ({flops / 1e12:.1f} TFLOP a step)"
                        ).check())
        if "graphed" in timers:
            gain = timers["eager"].median / timers["graphed"].median
            rows.append(Row(f"   gain: encoder as CUDA graphs, {kind}", gain))
    rows.append(Row("NativeTok / parallel step, each at its best setting", best["nativetok"] / best["parallel"],
                    target=on_gpu(device, "<= 1.25"),
                    detail=f"causal_mask / parallel: {best['causal_mask'] / best['parallel']:.2f}"
                    ).check())
    timer, setting = loop
    per_step = timer.loop / timer.steps
    rows.append(Row(f"Lightning loop with the DataModule / the step alone (NativeTok, batch {batch}, bf16, {setting})",
                    per_step / timer.median, target=on_gpu(device, "<= 1.15"),
                    detail=f"{per_step * 1e3:.1f} ms vs {timer.median * 1e3:.1f} ms a step").check())
    return rows


def rows_growth(experiment: str, batch: int, device: torch.device, repeats: int) -> List[Row]:
    """A growth step (the MIT and the first half of the experts frozen) against a full step."""
    graphs = device.type == "cuda"
    experts = fresh(experiment, "nativetok", torch.device("meta")).num_tokens
    full = shipped_step(experiment, "nativetok", batch, device, repeats, graphs).median
    seconds = {}
    variants = (("only the new experts train", []), ("decoder and codebook train too", ["decoder", "codebook"]))
    for name, train in variants:
        seconds[name] = shipped_step(experiment, "nativetok", batch, device, repeats, graphs,
                                     growth_stages(experts, train)).median
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
        images = images_for(tokenizer, batch, device)

        def encode(x: Tensor, tokenizer=tokenizer) -> Tensor:
            with autocast(device):
                return tokenizer.encode(x)

        timings = {"eager": median_time(lambda e=encode, x=images: e(x), repeats, 3, device)}
        if device.type == "cuda":
            graph = FixedShapeStep(encode, [images], graph=True, compile=False)
            assert torch.equal(graph(images), encode(images)), "the captured encoder gives other tokens"
            timings["graphed"] = median_time(lambda g=graph, x=images: g(x), repeats, 3, device)
        rates[kind] = batch / min(timings.values())
        detail = ", ".join(f"{name} {batch / t:.0f} img/s" for name, t in timings.items())
        rows.append(Row(f"encode, {kind} (batch {batch}, bf16)", rates[kind], unit="img/s", detail=detail))
        del tokenizer
        release_memory()
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
        # Graphed and eager decode steps may use other kernels (bf16 sums in another order): a last-bit change in
        # the logits can flip one draw, and every later token of that row differs too.
        same = min(float((t == tokens["eager"]).all(1).float().mean()) for t in tokens.values())
        detail = ", ".join(f"{n} {r:.0f} tok/s" for n, r in rates.items())
        target = on_gpu(device, targets[length]) if length in targets else None
        rows.append(Row(f"AR sampling {length} tokens (width {width}, depth {depth}, batch {batch}, CFG 2, bf16)",
                        max(rates.values()), unit="tok/s", target=target,
                        detail=f"{detail}; rows with the eager tokens: {same:.0%}").check())
        del model
        release_memory()
    return rows


SECTIONS = ("steps", "growth", "encode", "sampling")


def run(out: Path, device: torch.device, quick: bool, repeats: Optional[int] = None,
        sections: Sequence[str] = SECTIONS) -> List[Row]:
    experiment, batch = (TINY, 8) if quick else (L32, 32)
    repeats = repeats or (3 if quick else 10)
    rows: List[Row] = []
    peak = gemm_flops_per_second(device, 1024 if quick else 8192, repeats)
    rows.append(Row(f"bf16 GEMM {1024 if quick else 8192}^3", peak / 1e12, unit="TFLOP/s"))
    measure = {
        "steps": lambda: rows_steps(experiment, batch, device, peak, repeats),
        "growth": lambda: rows_growth(experiment, batch, device, repeats),
        "encode": lambda: rows_encode(experiment, 16 if quick else 256, device, repeats),
        "sampling": lambda: rows_sampling(device, (16,) if quick else (64, 256), 4 if quick else 64,
                                          *((64, 2, 2) if quick else (768, 12, 12))),
    }
    for section in sections:
        rows += measure[section]()
        report(rows, out, device=str(device))
        log.info("\n%s", table(rows))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="benchmarks/bench_gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/bench/bench_gpu.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of the code)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats a measurement (default 10, 3 with --quick); fewer fit a short GPU lease")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, in this order or any other: {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: `make bench` measures the CPU")
    context = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    with context:
        rows = run(Path(args.out), device, args.quick, args.repeats, sections)
    print(table(rows))
    print(json.dumps({"torch": torch.__version__, "device": str(device)}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
