"""Ablations of the tokenizer recipe (`nativetok ablate`): every variant of a preset trained with every seed,
measured by the PSNR of reconstructions from the first k tokens, and reported as mean ± sd over seeds with
each variant's difference from the reference variant set against two standard errors.

Results: `ablation.md`, `ablation.json` and `prefix_psnr.png` in the preset's folder; finished runs are
reused, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List

from nativetok.checkpoints import load_tokenizer
from nativetok.config import load_config
from nativetok.config.loading import load_ablation
from nativetok.config.schema import AblationPreset
from nativetok.eval.fid import real_images
from nativetok.eval.prefix import prefix_psnr
from nativetok.eval.statistics import Difference, Summary
from nativetok.lit.figures import position_curves
from nativetok.lit.train import train_tokenizer
from nativetok.models.tokenizer import prefix_lengths
from nativetok.pipelines.runs import preset_path, timed_training

log = logging.getLogger(__name__)


def measure_run(run_dir: Path, images, ks: List[int], seconds: float) -> Dict:
    """Prefix PSNR of a finished run's evaluated weights (EMA when kept), cached beside the run."""
    record = run_dir / "ablation.json"
    if record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("images") == len(images) and cached.get("ks") == ks:
            return cached
    tokenizer = load_tokenizer(str(run_dir / "checkpoints" / "last.ckpt"), "cpu")
    psnr = prefix_psnr(tokenizer, images, ks)
    result = {"images": len(images), "ks": ks, "psnr": {str(k): v for k, v in psnr.items()},
              "parameters": sum(p.numel() for p in tokenizer.parameters()), "minutes": seconds / 60}
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result


def ablate(preset: str = "hnt", out: Path = Path("runs/ablation")) -> Dict[str, List[Dict]]:
    path = preset_path(preset, "ablation")
    settings = load_ablation(path)
    root = Path(out) / path.stem
    experiment = path.parent / settings.experiment
    results: Dict[str, List[Dict]] = {}
    images = None
    for name, overrides in settings.variants.items():
        results[name] = []
        for seed in settings.seeds:
            run_dir = root / name / f"seed{seed}"
            config = load_config(experiment, [f"seed={seed}", "trainer.progress_bar=false", f"run.dir={run_dir}",
                                              *settings.common, *overrides])
            log.info("ablate/%s seed %d", name, seed)
            seconds = timed_training(run_dir, train_tokenizer, config)
            if images is None:
                images, _ = real_images(config.data.index, "val", settings.images)
            ks = prefix_lengths(config.tokenizer.num_tokens)
            results[name].append({"seed": seed, **measure_run(run_dir, images, ks, seconds)})
    write_ablation(root, results, settings)
    return results


def psnr_summaries(runs: List[Dict]) -> Dict[str, Summary]:
    return {k: Summary.of([r["psnr"][k] for r in runs]) for k in runs[0]["psnr"]}


def write_ablation(root: Path, results: Dict[str, List[Dict]], settings: AblationPreset) -> None:
    ks = list(next(iter(results.values()))[0]["psnr"])
    reference = psnr_summaries(results[settings.reference])
    lines = [
        "| variant | parameters | " + " | ".join(f"PSNR k={k} (dB)" for k in ks) + " | minutes |",
        "| --- | ---: | " + " | ".join("---:" for _ in ks) + " | ---: |",
    ]
    for name, runs in results.items():
        psnr = psnr_summaries(runs)
        minutes = Summary.of([r["minutes"] for r in runs])
        lines.append(f"| {name} | {runs[0]['parameters']:,} | " + " | ".join(psnr[k].text() for k in ks)
                     + f" | {minutes.mean:.1f} |")
    lines += ["", f"Mean ± sd over seeds {list(settings.seeds)}; PSNR per image averaged over the first "
              f"{settings.images} validation images; k: reconstruction from the first k tokens.", "",
              f"Differences from `{settings.reference}` (variant - reference, dB; decisive when beyond 2 SE):", ""]
    for name, runs in results.items():
        if name == settings.reference:
            continue
        psnr = psnr_summaries(runs)
        cells = ", ".join(f"k={k}: {Difference.between(psnr[k], reference[k]).text()}" for k in ks)
        lines.append(f"- {name}: {cells}")
    (root / "ablation.md").write_text("\n".join(lines) + "\n")
    (root / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
    curves = {name: [psnr_summaries(runs)[k].mean for k in ks] for name, runs in results.items()}
    figure = position_curves(curves, "PSNR (dB)", "reconstruction from the first k tokens",
                             positions=[int(k) for k in ks], xlabel="k (tokens decoded)")
    figure.savefig(root / "prefix_psnr.png")
    print("\n".join(lines))
