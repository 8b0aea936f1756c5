"""The paper's comparison as one command: the same AR generator on NativeTok, parallel and causal-mask tokens.

For each tokenizer kind of a preset (experiments/compare/*.yaml): train the tokenizer (same token count
and codebook; baselines get the MIT depth that matches NativeTok's parameter count), tokenize the data,
train the same AR generator on the tokens, then measure rFID/KID of reconstructions, gFID/KID of
samples, validation bits per token, the per-position entropies and codebook usage. Finished runs are
reused, so an interrupted comparison continues where it stopped. Results: `comparison.md`,
`comparison.json` and `bits_per_position.png` in the preset's folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

from nativetok.config import load_config
from nativetok.config.loading import load_preset
from nativetok.config.schema import ComparePreset, ExperimentConfig
from nativetok.models import NativeTokenizer

log = logging.getLogger(__name__)

def preset_path(preset: str) -> Path:
    """A preset by name (experiments/compare/<name>.yaml, from the repository root) or by path."""
    path = Path(preset)
    return path if path.suffix in (".yaml", ".yml") else Path("experiments") / "compare" / f"{preset}.yaml"


def parameter_count(config: ExperimentConfig) -> int:
    with torch.device("meta"):
        model = NativeTokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    return sum(p.numel() for p in model.parameters())


def matched_mit_depth(base: Path, overrides: List[str], target: int) -> int:
    """The MIT depth (1..32) whose parameter count is closest to `target`."""
    def count(depth: int) -> int:
        return parameter_count(load_config(base, overrides + [f"tokenizer.mit.depth={depth}"]))

    return min(range(1, 33), key=lambda depth: abs(count(depth) - target))


def _finished(run_dir: Path, steps: int) -> bool:
    last = run_dir / "checkpoints" / "last.ckpt"
    return last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= steps


def _timed(run_dir: Path, train, config: ExperimentConfig) -> float:
    """Train (unless finished) and return the wall time of the training that produced the run."""
    record = run_dir / "timing.json"
    if _finished(run_dir, config.trainer.max_steps) and record.is_file():
        return json.loads(record.read_text())["seconds"]
    start = time.monotonic()
    train(config)
    seconds = time.monotonic() - start
    record.write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def compare(preset: str = "default", out: Path = Path("runs/compare"), seed: int = 0) -> Dict:
    from nativetok.data.tokens import tokenize_shards
    from nativetok.eval.fid import evaluate_fid
    from nativetok.eval.plots import position_curves
    from nativetok.eval.token_metrics import token_metrics
    from nativetok.lit.train import train_generator, train_tokenizer

    path = preset_path(preset)
    settings: ComparePreset = load_preset(path)
    root = Path(out) / path.stem
    tokenizer_file = path.parent / settings.tokenizer_experiment
    generator_file = path.parent / settings.generator_experiment
    common = [f"seed={seed}", "trainer.progress_bar=false", *settings.tokenizer]
    target = parameter_count(load_config(tokenizer_file, common + ["tokenizer.kind=nativetok", *settings.nativetok]))
    results: Dict[str, Dict] = {}
    for kind in settings.kinds:
        folder = root / kind
        overrides = [*common, f"tokenizer.kind={kind}", f"run.dir={folder / 'tokenizer'}", *getattr(settings, kind)]
        if kind != "nativetok":
            overrides.append("growth.stages=[]")
            if settings.match_parameters:
                overrides.append(f"tokenizer.mit.depth={matched_mit_depth(tokenizer_file, overrides, target)}")
        tokenizer_config = load_config(tokenizer_file, overrides)
        log.info("compare/%s: tokenizer with %s parameters", kind, f"{parameter_count(tokenizer_config):,}")
        tokenizer_seconds = _timed(folder / "tokenizer", train_tokenizer, tokenizer_config)
        tokenizer_ckpt = folder / "tokenizer" / "checkpoints" / "last.ckpt"
        tokens = folder / "tokens"
        if not (tokens / "index.json").is_file():
            tokenize_shards(str(tokenizer_ckpt), tokenizer_config.data.index, tokens)
        q = tokenizer_config.tokenizer
        generator_config = load_config(generator_file, [
            f"seed={seed}", "trainer.progress_bar=false", f"run.dir={folder / 'generator'}",
            f"data.index={tokens / 'index.json'}", "data.hflip=false", f"generator.tokenizer={tokenizer_ckpt}",
            f"generator.codebook_size={q.quantizer.codebook_size}", f"generator.num_tokens={q.num_tokens}",
            *settings.generator,
        ])
        generator_seconds = _timed(folder / "generator", train_generator, generator_config)
        generator_ckpt = folder / "generator" / "checkpoints" / "last.ckpt"
        scores = evaluate_fid(
            tokenizer_path=str(tokenizer_ckpt), generator_path=str(generator_ckpt), num=settings.images, seed=seed,
            out=folder / "fid.json",
        )
        report = token_metrics(str(generator_ckpt), folder)
        results[kind] = {
            "parameters": parameter_count(tokenizer_config),
            "mit_depth": tokenizer_config.tokenizer.mit.depth,
            "rfid": scores[0].fid, "rkid": scores[0].kid_mean,
            "gfid": scores[1].fid, "gkid": scores[1].kid_mean,
            "bits_per_token": report["bits_per_token"],
            "information_from_prefix_bits": report["total"]["information_from_prefix_bits"],
            "codebook_usage": report["codebook_usage"],
            "tokenizer_minutes": tokenizer_seconds / 60, "generator_minutes": generator_seconds / 60,
            "conditional_bits": report["conditional_bits_given_class"],
            "marginal_bits": report["marginal_bits"],
        }
    write_comparison(root, results, settings, weights=scores[0].weights)
    figure = position_curves({k: r["conditional_bits"] for k, r in results.items()},
                             "bits per token (AR, given class)", "code length of token i given the tokens before it")
    figure.savefig(root / "bits_per_position.png")
    return results


def write_comparison(root: Path, results: Dict[str, Dict], settings: ComparePreset, weights: str) -> None:
    lines = [
        "| tokenizer | parameters | rFID | rKID | gFID | gKID | val bits/token | info from prefix (bits) "
        "| codebook usage | tokenizer min | generator min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, r in results.items():
        lines.append(
            f"| {kind} | {r['parameters']:,} | {r['rfid']:.2f} | {r['rkid']:.4f} | {r['gfid']:.2f} | {r['gkid']:.4f} "
            f"| {r['bits_per_token']:.3f} | {r['information_from_prefix_bits']:.1f} | {r['codebook_usage']:.2f} "
            f"| {r['tokenizer_minutes']:.1f} | {r['generator_minutes']:.1f} |"
        )
    lines += ["", f"FID/KID on {settings.images} images; Inception weights: {weights}.",
              "rFID: reconstructions of validation images; gFID: class-balanced AR samples (the generator's "
              "sampling settings) against training images; bits/token: the AR generator's validation "
              "cross-entropy given the class."]
    (root / "comparison.md").write_text("\n".join(lines) + "\n")
    (root / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
