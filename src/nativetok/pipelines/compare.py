"""The paper's comparison as one command: the same AR generator on NativeTok, parallel and causal-mask tokens.

Each row of a preset (experiments/compare/*.yaml) is a tokenizer kind in the paper's setup (no prefix
dropout), plus optionally NativeTok with prefix dropout; each row runs once per seed: train the tokenizer
(same token count and codebook; baselines get the MIT depth that matches NativeTok's parameter count),
tokenize the data, train the same AR generator on the tokens, then measure rFID/KID, gFID/KID against
class-balanced reference statistics, the prefix curve (PSNR and FID from the first k tokens), and bits per
token at each position. Tables give mean ± sd over seeds and say which differences exceed two standard
errors. Finished runs and measurements are reused, so an interrupted comparison continues where it stopped.
Results: `comparison.md`, `comparison.json`, `bits_per_position.png`, `prefix_psnr.png` and `prefix_fid.png`
in the preset's folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nativetok.config import load_config
from nativetok.config.loading import load_preset
from nativetok.config.schema import ComparePreset, ExperimentConfig
from nativetok.eval.statistics import Summary, verdict
from nativetok.models.tokenizer import build_tokenizer
from nativetok.pipelines.runs import preset_path, timed_training

log = logging.getLogger(__name__)
BASE = "nativetok"
PREFIX_DROPOUT_ROW = "nativetok+prefix_dropout"
# metric -> (label, lower is better, digits)
METRICS = {
    "gfid": ("gFID", True, 2), "rfid": ("rFID", True, 2), "bits_per_token": ("bits/token", True, 3),
    "psnr": ("PSNR (dB)", False, 2), "codebook_usage": ("codebook usage", False, 2),
}


def parameter_count(config: ExperimentConfig) -> int:
    """The tokenizer's parameter count, from shapes alone (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    return sum(p.numel() for p in model.parameters())


def matched_mit_depth(base: Path, overrides: List[str], target: int) -> int:
    """The MIT depth (1..32) whose parameter count is closest to `target`."""
    def count(depth: int) -> int:
        return parameter_count(load_config(base, overrides + [f"tokenizer.mit.depth={depth}"]))

    return min(range(1, 33), key=lambda depth: abs(count(depth) - target))


def rows(settings: ComparePreset) -> List[Tuple[str, str, List[str]]]:
    """(row name, tokenizer kind, overrides): every kind without prefix dropout, then the optional extra row."""
    out = [(kind, kind, ["tokenizer.decoder.random_prefix=0", *getattr(settings, kind)]) for kind in settings.kinds]
    if settings.prefix_dropout > 0 and BASE in settings.kinds:
        out.append((PREFIX_DROPOUT_ROW, BASE,
                    [f"tokenizer.decoder.random_prefix={settings.prefix_dropout}", *settings.nativetok]))
    return out


def compare(preset: str = "default", out: Path = Path("runs/compare"), seeds: Optional[Sequence[int]] = None) -> Dict:
    path = preset_path(preset, "compare")
    settings: ComparePreset = load_preset(path)
    root = Path(out) / path.stem
    tokenizer_file = path.parent / settings.tokenizer_experiment
    common = ["trainer.progress_bar=false", *settings.tokenizer]
    target = parameter_count(load_config(tokenizer_file, common + [f"tokenizer.kind={BASE}", *settings.nativetok]))
    results: Dict[str, Dict] = {}
    started = time.monotonic()
    for name, kind, own in rows(settings):
        overrides = [*common, f"tokenizer.kind={kind}", *own]
        if kind != BASE:
            overrides.append("growth.stages=[]")
            if settings.match_parameters:
                overrides.append(f"tokenizer.mit.depth={matched_mit_depth(tokenizer_file, overrides, target)}")
        config = load_config(tokenizer_file, overrides)
        runs = [run_row(root / name / f"seed{seed}", settings, path.parent, overrides, seed)
                for seed in (seeds if seeds is not None else settings.seeds)]
        results[name] = {"kind": kind, "parameters": parameter_count(config), "mit_depth": config.tokenizer.mit.depth,
                         "runs": runs}
    write_comparison(root, results, settings, minutes=(time.monotonic() - started) / 60)
    return results


def run_row(folder: Path, settings: ComparePreset, presets: Path, overrides: List[str], seed: int) -> Dict:
    """One row and seed: tokenizer, tokens, generator, then every measurement (cached in metrics.json)."""
    from nativetok.lit.train import train_generator, train_tokenizer
    from nativetok.pipelines.tokenize import tokenize_shards

    tokenizer_config = load_config(presets / settings.tokenizer_experiment,
                                   [f"seed={seed}", f"run.dir={folder / 'tokenizer'}", *overrides])
    log.info("compare %s: tokenizer with %s parameters", folder, f"{parameter_count(tokenizer_config):,}")
    tokenizer_seconds = timed_training(folder / "tokenizer", train_tokenizer, tokenizer_config)
    tokenizer_ckpt = folder / "tokenizer" / "checkpoints" / "last.ckpt"
    tokens = folder / "tokens"
    tokenize_shards(str(tokenizer_ckpt), tokenizer_config.data.index, tokens)  # a no-op once made
    q = tokenizer_config.tokenizer
    generator_config = load_config(presets / settings.generator_experiment, [
        f"seed={seed}", "trainer.progress_bar=false", f"run.dir={folder / 'generator'}",
        f"data.index={tokens / 'index.json'}", "data.hflip=false", f"generator.tokenizer={tokenizer_ckpt}",
        f"generator.codebook_size={q.quantizer.codebook_size}", f"generator.num_tokens={q.num_tokens}",
        *settings.generator,
    ])
    generator_seconds = timed_training(folder / "generator", train_generator, generator_config)
    metrics = measure(folder, settings, str(tokenizer_ckpt), str(folder / "generator" / "checkpoints" / "last.ckpt"),
                      seed)
    return {"seed": seed, **metrics, "tokenizer_minutes": tokenizer_seconds / 60,
            "generator_minutes": generator_seconds / 60}


def measure(folder: Path, settings: ComparePreset, tokenizer_ckpt: str, generator_ckpt: str, seed: int) -> Dict:
    from nativetok.eval.fid import evaluate_fid
    from nativetok.eval.token_metrics import token_metrics

    wanted = {"images": settings.images, "reference_images": settings.reference_images,
              "prefix_images": settings.prefix_images, "prefix_fid": settings.prefix_fid}
    record = folder / "metrics.json"
    if record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("settings") == wanted:
            return cached["metrics"]
    rfid, gfid = evaluate_fid(tokenizer_path=tokenizer_ckpt, generator_path=generator_ckpt, num=settings.images,
                              seed=seed, reference_images=settings.reference_images, out=folder / "fid.json")
    report = token_metrics(generator_ckpt, folder)
    metrics = {
        "rfid": rfid.fid, "rkid": rfid.kid_mean, "gfid": gfid.fid, "gkid": gfid.kid_mean,
        "gfid_reference": gfid.reference, "inception": gfid.weights,
        "bits_per_token": report["bits_per_token"], "conditional_bits": report["conditional_bits_given_class"],
        "information_from_prefix_bits": report["total"]["information_from_prefix_bits"],
        "codebook_usage": report["codebook_usage"],
        **prefix_curve(tokenizer_ckpt, settings),
    }
    record.write_text(json.dumps({"settings": wanted, "metrics": metrics}, indent=1) + "\n")
    return metrics


def prefix_curve(tokenizer_ckpt: str, settings: ComparePreset) -> Dict:
    """PSNR (and FID) of reconstructions of validation images from the first k tokens, k = 1, 2, 4, 8, K."""
    from nativetok.checkpoints import load_tokenizer, tokenizer_config
    from nativetok.eval.fid import InceptionFeatures, frechet_distance, inception_weights, real_images
    from nativetok.eval.prefix import prefix_lengths, prefix_reconstructions, psnr_per_image
    from nativetok.eval.samples import to_uint8

    if settings.prefix_images < 1:
        return {"prefix": {}}
    config = tokenizer_config(tokenizer_ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(tokenizer_ckpt, device)
    images, _ = real_images(config.data.index, "val", settings.prefix_images)
    ks = prefix_lengths(config.tokenizer.num_tokens)
    rebuilt = prefix_reconstructions(tokenizer, images, ks)
    curve = {str(k): {"psnr": psnr_per_image(r, images.float() / 255).mean().item()} for k, r in rebuilt.items()}
    if settings.prefix_fid and settings.prefix_images >= 2:
        extractor = InceptionFeatures(inception_weights(None), device)
        real = extractor(images)["pool"]
        for k, r in rebuilt.items():
            curve[str(k)]["fid"] = frechet_distance(extractor(to_uint8(r))["pool"], real)
    return {"prefix": curve, "psnr": curve[str(ks[-1])]["psnr"]}


def summaries(runs: List[Dict]) -> Dict[str, Summary]:
    out = {m: Summary.of([r[m] for r in runs]) for m in METRICS if all(r.get(m) is not None for r in runs)}
    for k in runs[0]["prefix"]:
        for m in runs[0]["prefix"][k]:
            out[f"{m}@{k}"] = Summary.of([r["prefix"][k][m] for r in runs])
    return out


def write_comparison(root: Path, results: Dict[str, Dict], settings: ComparePreset, minutes: float) -> None:
    from nativetok.eval.plots import position_curves

    stats = {name: summaries(r["runs"]) for name, r in results.items()}
    seeds = [run["seed"] for run in next(iter(results.values()))["runs"]]
    ks = list(next(iter(results.values()))["runs"][0]["prefix"])
    lines = [
        "| tokenizer | parameters | rFID | gFID | bits/token | PSNR (dB) | codebook usage | "
        + " | ".join(f"PSNR k={k}" for k in ks) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in ks) + " |",
    ]
    for name, r in results.items():
        s = stats[name]
        cells = [s[m].text(METRICS[m][2]) if m in s else "n/a" for m in ("rfid", "gfid", "bits_per_token", "psnr",
                                                                          "codebook_usage")]
        prefix = [s[f"psnr@{k}"].text() for k in ks]
        lines.append(f"| {name} | {r['parameters']:,} | " + " | ".join(cells + prefix) + " |")
    if settings.prefix_fid and ks:
        lines += ["", "| tokenizer | " + " | ".join(f"FID k={k}" for k in ks) + " |",
                  "| --- | " + " | ".join("---:" for _ in ks) + " |"]
        lines += [f"| {name} | " + " | ".join(stats[name][f"fid@{k}"].text() for k in ks) + " |" for name in results]
    first = next(iter(results.values()))["runs"][0]
    lines += ["", f"Mean ± sd over seeds {seeds}. FID/KID on {settings.images} images; gFID against "
              f"{first['gfid_reference']}; Inception: {first['inception']}. Prefix curve: the first "
              f"{settings.prefix_images} validation images, reconstructed from the first k tokens. bits/token: the "
              "AR generator's validation cross-entropy given the class. Total time "
              f"{minutes:.0f} min (finished runs reused).", "",
              "Verdicts (differences beyond two standard errors):", ""]
    lines += [f"- {line}" for line in verdicts(stats)]
    (root / "comparison.md").write_text("\n".join(lines) + "\n")
    (root / "comparison.json").write_text(json.dumps(
        {"results": results, "summary": {n: {m: {"mean": v.mean, "sd": v.sd, "n": v.n} for m, v in s.items()}
                                         for n, s in stats.items()}}, indent=1) + "\n")
    bits = {name: [sum(r["conditional_bits"][i] for r in res["runs"]) / len(res["runs"])
                   for i in range(len(res["runs"][0]["conditional_bits"]))] for name, res in results.items()}
    position_curves(bits, "bits per token (AR, given class)",
                    "code length of token i given the tokens before it").savefig(root / "bits_per_position.png")
    if ks:
        for metric, label in (("psnr", "PSNR (dB)"), ("fid", "FID")):
            if all(f"{metric}@{k}" in stats[name] for name in results for k in ks):
                curves = {name: [stats[name][f"{metric}@{k}"].mean for k in ks] for name in results}
                position_curves(curves, label, "reconstruction from the first k tokens",
                                positions=[int(k) for k in ks], xlabel="k").savefig(root / f"prefix_{metric}.png")
    print("\n".join(lines))


def verdicts(stats: Dict[str, Dict[str, Summary]]) -> List[str]:
    """NativeTok against every other row, on every metric both have."""
    if BASE not in stats:
        return []
    out = []
    for name, s in stats.items():
        if name == BASE:
            continue
        for metric, (label, lower, digits) in METRICS.items():
            if metric in s and metric in stats[BASE]:
                out.append(verdict(label, BASE, stats[BASE][metric], name, s[metric], lower, digits))
    return out
