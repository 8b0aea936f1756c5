"""`nativetok compare`: the token-order study of docs/study.md, as one resumable command.

Per seed: each tokenizer of the preset is trained (its validation PSNR curve kept for the plateau check),
encodes a class-balanced subset of the data once, and is measured on the evaluation half of the test split
(PSNR, rFD, FD-FMNIST from the first k tokens, token statistics). Each arm trains the same AR generator on
one tokenizer's token shards, in the arm's order (the order controls reuse the NativeTok shards), samples
from its checkpoint with the lowest validation NLL and is measured on the classifier's features (FD-FMNIST
against the decoder's reconstructions, the primary metric, and against the real images; KID; class
accuracy; bits per position). Differences between arms are paired by seed with t-intervals, and the
decision rule of docs/study.md gives the verdict.

Every cell (a tokenizer or an arm at one seed) records its inputs beside its result: a finished cell is
reused when they match, a cell whose inputs changed is refused, and a killed run resumes from its last
checkpoint. A progress line per cell gives the elapsed time and an ETA. Results: `study.md`, `study.json`
and the plots in the preset's folder, rewritten after every seed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

from nativetok.checkpoints import file_sha256, load_generator, load_tokenizer, with_tokenizer_sizes
from nativetok.config import load_config
from nativetok.config.loading import load_preset, to_container
from nativetok.config.schema import UNUSED_SECTIONS, ComparePreset, ExperimentConfig
from nativetok.data.shards import (
    DatasetIndex,
    ShardEntry,
    SplitIndex,
    encode_image,
    plan_shards,
    shard_name,
    write_shard,
)
from nativetok.eval.classifier import fmnist_classifier, scores_of_features
from nativetok.eval.fid import class_balanced_positions, frechet_distance, images_at, real_images, split_labels
from nativetok.eval.inception import InceptionFeatures, inception_weights
from nativetok.eval.prefix import prefix_reconstructions, psnr_per_image
from nativetok.eval.samples import balanced_labels, generate_images, to_uint8
from nativetok.eval.statistics import PairedDifference, Summary
from nativetok.eval.token_metrics import dependency_report, held_out_tokens, sequence_statistics
from nativetok.io import atomic_open
from nativetok.lit.callbacks import PLATEAU_DB, plateau_gain, psnr_curve
from nativetok.lit.figures import position_curves
from nativetok.lit.train import train_generator, train_tokenizer
from nativetok.models.tokenizer import build_tokenizer, prefix_lengths
from nativetok.pipelines.runs import preset_path, timed_training, trained_steps
from nativetok.pipelines.tokenize import tokenize_shards

log = logging.getLogger(__name__)

RECORD = "cell.json"
# The decision rule of docs/study.md: (arm, other arm) pairs on the primary metric, lower is better.
PRIMARY = "fd_vs_reconstructions"
DECISION_PAIRS = (("nativetok", "parallel"), ("nativetok", "reversed"), ("nativetok", "permuted"))
# Per-arm metrics in the table: key -> (label, digits).
ARM_METRICS = {
    "fd_vs_reconstructions": ("FD-FMNIST vs rec. (primary)", 2), "fd_vs_real": ("FD-FMNIST vs real", 2),
    "kid_vs_real": ("KID vs real", 4), "class_accuracy": ("class accuracy", 3), "bits_per_token": ("bits/token", 3),
    "inception_fid": ("Inception FID", 2),
}
# What a preset's `paired` comparisons report: arm metrics, then their tokenizers' (key -> digits).
PAIRED_ARM_METRICS = {PRIMARY: 2, "bits_per_token": 3}
PAIRED_TOKENIZER_METRICS = {"psnr": 2, "adjacent_repeat_rate": 4, "distinct_ids_per_image": 2}
TOKENIZER_METRICS = {
    "psnr": ("PSNR (dB)", 2), "rfd": ("rFD", 2), "adjacent_repeat_rate": ("adjacent repeats", 3),
    "distinct_ids_per_image": ("distinct ids", 2), "codebook_usage": ("codebook usage", 3),
    "plateau_gain_db": ("PSNR gain, last 20% (dB)", 3), "steps": ("steps", 0), "minutes": ("minutes", 1),
    "parameters": ("parameters", 0),
}  # parameters: the same for every seed, shown once


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


# -- cells -----------------------------------------------------------------------------------------------------


class InputsChanged(ValueError):
    """A finished cell was made from other inputs than the preset now gives."""


def reuse(folder: Path, inputs: Dict) -> Optional[Dict]:
    """The recorded result of a finished cell made from `inputs`; None when it has not finished."""
    record = folder / RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    changed = changed_inputs(saved["inputs"], inputs)
    if changed:
        raise InputsChanged(f"{folder} was made from other inputs ({', '.join(changed)} changed): remove the folder "
                            f"to run it again with the preset as it is, or give another --out")
    return saved["result"]


def changed_inputs(saved: Dict, now: Dict) -> List[str]:
    """The keys whose values differ between a cell's recorded inputs and today's (dotted inside the config)."""
    changed = []
    for name in sorted(set(saved) | set(now)):
        if name == "config" and isinstance(saved.get(name), dict) and isinstance(now.get(name), dict):
            changed += changed_config(saved[name], now[name], schema_defaults(), "config")
        elif name not in saved or name not in now or saved[name] != now[name]:
            changed.append(name)
    return sorted(changed)


def changed_config(saved: Dict, now: Dict, defaults: Dict, prefix: str) -> List[str]:
    """A key the schema gained after the cell was made counts as unchanged when it holds its default (the code
    that made the cell behaved as that default); a key the schema has since lost is not compared (no code reads
    it any more). So a new option does not invalidate finished cells, and any changed value does."""
    changed = []
    for name, value in now.items():
        key, default = f"{prefix}.{name}", defaults.get(name, _NO_DEFAULT)
        if name not in saved:
            if value != default:
                changed.append(key)
        elif isinstance(value, dict) and isinstance(saved[name], dict):
            changed += changed_config(saved[name], value, default if isinstance(default, dict) else {}, key)
        elif saved[name] != value:
            changed.append(key)
    return changed


_NO_DEFAULT = object()


def read_sections(config: ExperimentConfig) -> Dict:
    """The config as a cell records it: the sections its stage reads, so that changing the other stage's (say a
    generator setting) leaves finished tokenizers reusable."""
    unused = UNUSED_SECTIONS[config.stage]
    return {name: value for name, value in to_container(config).items() if name not in unused}


def schema_defaults() -> Dict:
    """The experiment config's defaults, in the form a cell records its config."""
    return to_container(OmegaConf.structured(ExperimentConfig))


def record(folder: Path, inputs: Dict, result: Dict) -> Dict:
    with atomic_open(folder / RECORD, "w") as file:
        file.write(json.dumps({"inputs": inputs, "result": result}, indent=1) + "\n")
    return result


@dataclass
class Progress:
    """A line per cell: which, whether reused, elapsed time and an ETA from the cells computed so far (the work
    left, shared among the lanes)."""

    total: Dict[str, int]
    lanes: int = 1
    started: float = field(default_factory=time.monotonic)
    done: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    computed: Dict[str, int] = field(default_factory=dict)

    def finished(self, kind: str, name: str, seconds: float, reused: bool) -> None:
        self.done[kind] = self.done.get(kind, 0) + 1
        if not reused:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
            self.computed[kind] = self.computed.get(kind, 0) + 1
        overall = sum(self.seconds.values()) / max(1, sum(self.computed.values()))
        left = sum((self.total[k] - self.done.get(k, 0)) * (self.seconds[k] / self.computed[k] if self.computed.get(k)
                                                            else overall) for k in self.total)
        count, total = sum(self.done.values()), sum(self.total.values())
        eta = clock(left / self.lanes) if self.computed or count == total else "unknown until a cell has run"
        log.info("compare [%d/%d] %s %s %s in %s | elapsed %s | ETA %s", count, total, kind, name,
                 "reused" if reused else "done", clock(seconds), clock(time.monotonic() - self.started), eta)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class EvaluationSet:
    """The evaluation half of the test split: images, labels and the classifier's features of them."""

    images: torch.Tensor
    labels: torch.Tensor
    features: Dict[str, torch.Tensor]


# -- the study -------------------------------------------------------------------------------------------------


def compare(preset: str = "default", out: Path = Path("runs/compare"), seeds: Optional[Sequence[int]] = None,
            jobs: int = 1) -> Dict:
    """Run (or continue) the study of a preset in `jobs` lanes; returns what study.json holds."""
    path = preset_path(preset, "compare")
    settings = load_preset(path)
    root = Path(out).resolve() / path.stem  # cells record absolute paths: the same folder given either way matches
    root.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds) if seeds is not None else list(settings.seeds)
    used = sorted({arm.tokenizer for arm in settings.arms.values()}, key=list(settings.tokenizers).index)
    image_index = load_config(path.parent / settings.tokenizer_experiment, list(settings.tokenizer)).data.index
    subset = study_images(root / "data", image_index, settings)
    classifier = fmnist_classifier(image_index)  # trained here (once per machine) before any lane starts
    study = Study(path.resolve(), root, str(subset), image_index, str(classifier.path))
    cells = ([Cell("tokenizer", name, seed) for seed in seeds for name in used]
             + [Cell("arm", name, seed) for seed in seeds for name in settings.arms])
    progress = Progress({"tokenizer": len(seeds) * len(used), "arm": len(seeds) * len(settings.arms)}, lanes=jobs)
    results: Dict[Cell, Dict] = {}
    report: Dict = {}
    reported: List[int] = []
    for finished, result in run_cells(study, cells, jobs, progress):
        results[finished] = result
        complete = [seed for seed in seeds if all(c in results for c in cells if c.seed == seed)]
        if complete != reported:  # the report of every complete seed, rewritten as each seed completes
            reported = complete
            tokenizers = {name: [results[Cell("tokenizer", name, s)] for s in complete] for name in used}
            arms = {name: [results[Cell("arm", name, s)] for s in complete] for name in settings.arms}
            timing = {"training_minutes": sum(results[c]["minutes"] for c in cells if c.seed in complete),
                      "wall_minutes": (time.monotonic() - progress.started) / 60, "lanes": jobs,
                      "cells_computed": sum(progress.computed.values()), "cells": len(cells)}
            report = write_report(root, settings, tokenizers, arms, classifier.label, timing)
    return report


@dataclass(frozen=True)
class Cell:
    """One tokenizer or one arm at one seed: a folder with its inputs and result (`cell.json`)."""

    kind: str  # "tokenizer" or "arm"
    name: str
    seed: int

    def folder(self, root: Path) -> Path:
        return root / f"{self.kind}s" / self.name / f"seed{self.seed}"

    def __str__(self) -> str:
        return f"{self.name} seed {self.seed}"


@dataclass(frozen=True)
class Study:
    """What every cell of a run shares, small enough to hand to a lane: the preset, the output folder, the
    study's images and the classifier's weights (each lane loads them once)."""

    preset: Path
    root: Path
    subset: str
    image_index: str
    classifier_weights: str


def default_lanes() -> int:
    """Cells computed at once: on CPU cores, one lane per core up to 4; one lane on a GPU. Small models use
    threads poorly, so one-thread lanes gain where cores are free: on 2 cores, two lanes did 1.1x (a NativeTok
    and a parallel tokenizer side by side) to 1.4x (two parallel tokenizers) the work of one two-thread process."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def run_cells(study: Study, cells: List[Cell], jobs: int, progress: Progress) -> Iterator[Tuple[Cell, Dict]]:
    """Each cell's result as it finishes. A finished cell is reused at once (a changed one is refused); the
    others are computed in `jobs` lanes, an arm once its tokenizer has finished, tokenizers first (they unlock
    the arms). A failing cell stops the run once the cells already computing have finished and been kept."""
    settings = load_preset(study.preset)
    made: Dict[Tuple[str, int], Dict] = {}
    inputs: Dict[Cell, Dict] = {}
    waiting = list(cells)
    running: Dict[Future, Cell] = {}

    def dependency(cell: Cell) -> Optional[Dict]:
        return made.get((settings.arms[cell.name].tokenizer, cell.seed)) if cell.kind == "arm" else None

    def finish(cell: Cell, result: Dict, seconds: float, reused: bool):
        if cell.kind == "tokenizer":
            made[(cell.name, cell.seed)] = result
        progress.finished(cell.kind, str(cell), seconds, reused)
        return cell, result

    with lanes(jobs) as pool:
        while waiting or running:
            changed = True
            while changed:  # reuse what is finished and fill the free lanes before waiting on one
                changed = False
                for cell in [c for c in waiting if c.kind == "tokenizer" or dependency(c) is not None]:
                    if cell not in inputs:
                        inputs[cell] = prepared(study, cell, dependency(cell))[0]
                    result = reuse(cell.folder(study.root), inputs[cell])
                    if result is not None:
                        waiting.remove(cell)
                        changed = True
                        yield finish(cell, result, 0.0, reused=True)
                    elif len(running) < jobs:
                        waiting.remove(cell)
                        running[pool.submit(computed_cell, study, cell, dependency(cell))] = cell
            if not running:
                if waiting:
                    raise RuntimeError(f"compare: no cell can start: {', '.join(map(str, waiting))}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                result, seconds = future.result()
                yield finish(cell, result, seconds, reused=False)


@contextmanager
def lanes(jobs: int) -> Iterator:
    """An executor of `jobs` processes with an equal share of the CPU threads each; with one lane, this process."""
    if jobs < 1:
        raise ValueError(f"compare needs at least one lane, got jobs={jobs}")
    if jobs == 1:
        yield InlineLane()
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=lane_started,
                             initargs=(threads, logging.getLogger().getEffectiveLevel())) as pool:
        yield pool


class InlineLane:
    """The one-lane executor: runs the cell here, now (its error is raised where the result is read)."""

    def submit(self, function: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:
            future.set_exception(error)
        return future


def lane_started(threads: int, level: int) -> None:
    """A lane's threads and log format. A spawned process inherits `spawn` as its start method, so its own children
    (each DataLoader's workers, started again for every validation and epoch) would import torch afresh, about 5 s
    of CPU each (some 17 minutes of a 2-core `make compare`): they start as the platform's default instead, as in
    `nativetok train`."""
    torch.set_num_threads(threads)
    multiprocessing.set_start_method(None, force=True)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [lane %(process)d] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def prepared(study: Study, cell: Cell, made: Optional[Dict]) -> Tuple[Dict, Callable[[], Dict]]:
    """A cell's inputs (what its record must match to be reused) and the function that computes it."""
    settings = load_preset(study.preset)
    if cell.kind == "tokenizer":
        return tokenizer_cell(settings, study, cell)
    return arm_cell(settings, study, cell, made)


def computed_cell(study: Study, cell: Cell, made: Optional[Dict]) -> Tuple[Dict, float]:
    """Compute one cell and record it (in a lane); returns its result and how long it took."""
    started = time.monotonic()
    inputs, compute = prepared(study, cell, made)
    folder = cell.folder(study.root)
    folder.mkdir(parents=True, exist_ok=True)
    return record(folder, inputs, compute()), time.monotonic() - started


_LOADED: Dict[Tuple, object] = {}


def loaded(study: Study, what: str):
    """The study's classifier or evaluation set, loaded once a process (keyed by the subset's and the weights'
    content, so a rewritten subset is loaded again)."""
    key = (what, study.subset, file_sha256(study.subset), study.classifier_weights)
    if key not in _LOADED:
        _LOADED[key] = (fmnist_classifier(study.image_index, path=study.classifier_weights) if what == "classifier"
                        else evaluation_set(study.subset, loaded(study, "classifier")))
    return _LOADED[key]


def study_images(folder: Path, image_index: str, settings: ComparePreset) -> Path:
    """Image shards of the study's subsets (written once): `train` (the generators' training images), `val`
    (the selection half of the test split) and `eval` (the evaluation half), each class-balanced with
    `subset_seed`; only these images are ever tokenized."""
    inputs = {"images_sha256": file_sha256(image_index), "seed": settings.subset_seed,
              "train": settings.generator_images, "val": settings.selection_images,
              "eval": settings.evaluation_images}
    index_path = folder / "index.json"
    if index_path.is_file() and reuse(folder, inputs) is not None:
        return index_path
    source = DatasetIndex.load(image_index, holds="images")
    train_labels, test_labels = split_labels(image_index, "train"), split_labels(image_index, "val")
    train = class_balanced_positions(train_labels, settings.generator_images, settings.subset_seed)
    selection = class_balanced_positions(test_labels, settings.selection_images, settings.subset_seed)
    rest = sorted(set(range(len(test_labels))) - set(selection))
    evaluation = [rest[i] for i in class_balanced_positions([test_labels[p] for p in rest],
                                                            settings.evaluation_images, settings.subset_seed)]
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, (origin, positions, labels) in {"train": ("train", train, train_labels),
                                               "val": ("val", selection, test_labels),
                                               "eval": ("val", evaluation, test_labels)}.items():
        images = images_at(image_index, origin, positions).numpy()
        entries = []
        for number, rows in enumerate(plan_shards(len(positions), 5000)):
            samples = ({"__key__": f"{split}{i:07d}", "png": encode_image(images[i].squeeze(0)),
                        "cls": str(labels[positions[i]]).encode()} for i in rows)
            file = shard_name("study", split, number)
            entries.append(ShardEntry(file, write_shard(folder / file, samples)))
        splits[split] = SplitIndex(entries)
    DatasetIndex(name="study", image_size=source.image_size, channels=source.channels, classes=source.classes,
                 splits=splits, root=folder).save(folder)
    record(folder, inputs, {"splits": {k: v.samples for k, v in splits.items()}})
    log.info("compare: study images in %s (%s)", folder, {k: v.samples for k, v in splits.items()})
    return index_path


def evaluation_set(subset: str, classifier) -> EvaluationSet:
    images, labels = real_images(subset, "eval", sum_split(subset, "eval"))
    return EvaluationSet(images, labels, classifier.features(images))


def sum_split(index: str, split: str) -> int:
    return DatasetIndex.load(index).split(split).samples


def tokenizer_overrides(settings: ComparePreset, presets: Path, name: str) -> List[str]:
    overrides = ["trainer.progress_bar=false", *settings.tokenizer, *settings.tokenizers[name]]
    reference = settings.match_parameters.get(name)
    if reference is not None:
        target = parameter_count(load_config(presets / settings.tokenizer_experiment,
                                             ["trainer.progress_bar=false", *settings.tokenizer,
                                              *settings.tokenizers[reference]]))
        overrides.append(f"tokenizer.mit.depth="
                         f"{matched_mit_depth(presets / settings.tokenizer_experiment, overrides, target)}")
    return overrides


def tokenizer_cell(settings: ComparePreset, study: Study, cell: Cell) -> Tuple[Dict, Callable[[], Dict]]:
    """Train one tokenizer, tokenize the study's images with it, and measure it."""
    folder, presets = cell.folder(study.root), study.preset.parent
    config = load_config(presets / settings.tokenizer_experiment, [
        f"seed={cell.seed}", f"run.dir={folder / 'run'}", *tokenizer_overrides(settings, presets, cell.name)])
    inputs = {"config": read_sections(config), "subset": subset_digest(study.subset),
              "classifier": classifier_label(study)}

    def compute() -> Dict:
        classifier, evaluation = loaded(study, "classifier"), loaded(study, "evaluation")
        seconds = timed_training(folder / "run", train_tokenizer, config)
        checkpoint = folder / "run" / "checkpoints" / "last.ckpt"
        tokenize_shards(str(checkpoint), study.subset, folder / "tokens", splits=("train", "val"))
        return {
            "seed": cell.seed, "checkpoint": str(checkpoint), "tokens": str(folder / "tokens" / "index.json"),
            "parameters": parameter_count(config), "minutes": seconds / 60, "max_steps": config.trainer.max_steps,
            "steps": trained_steps(folder / "run"), **plateau(folder / "run"),
            **measure_tokenizer(str(checkpoint), str(folder / "tokens" / "index.json"), evaluation, classifier,
                                folder),
        }

    return inputs, compute


def classifier_label(study: Study) -> str:
    return loaded(study, "classifier").label


def subset_digest(subset: str) -> str:
    return file_sha256(subset)


def plateau(run_dir: Path) -> Dict:
    """The validation PSNR curve and the plateau check on it."""
    curve = psnr_curve(run_dir)
    gain = plateau_gain(curve)
    if gain is None:
        return {"psnr_curve": [], "plateau_gain_db": None, "plateaued": None}
    return {"psnr_curve": curve, "plateau_gain_db": gain, "plateaued": gain < PLATEAU_DB}


def measure_tokenizer(checkpoint: str, tokens: str, evaluation: EvaluationSet, classifier, folder: Path) -> Dict:
    """PSNR, rFD and FD-FMNIST from the first k tokens on the evaluation half; token statistics on the selection
    half. The reconstructions' features are kept for the arms that use this tokenizer."""
    tokenizer = load_tokenizer(checkpoint, "cpu")
    ks = prefix_lengths(tokenizer.num_active)
    rebuilt = prefix_reconstructions(tokenizer, evaluation.images, ks)
    target = evaluation.images.float() / 255
    fd_at_k = {}
    for k, images in rebuilt.items():
        features = classifier.features(to_uint8(images))
        fd_at_k[str(k)] = scores_of_features(features, evaluation.features).fd
        if k == ks[-1]:
            save_file({key: value.contiguous() for key, value in features.items()},
                      str(folder / "reconstructions.safetensors"))
    selection, _ = held_out_tokens(tokens, "val")
    return {"psnr": psnr_per_image(rebuilt[ks[-1]], target).mean().item(), "rfd": fd_at_k[str(ks[-1])],
            "fd_at_k": fd_at_k, **sequence_statistics(selection, tokenizer.quantizer.codebook_size)}


def arm_cell(settings: ComparePreset, study: Study, cell: Cell, made: Dict) -> Tuple[Dict, Callable[[], Dict]]:
    """Train the generator of one arm on its tokenizer's shards and measure its samples."""
    arm = settings.arms[cell.name]
    folder = cell.folder(study.root)
    config = with_tokenizer_sizes(load_config(study.preset.parent / settings.generator_experiment, [
        f"seed={cell.seed}", "trainer.progress_bar=false", f"run.dir={folder / 'generator'}",
        f"data.index={made['tokens']}", f"generator.tokenizer={made['checkpoint']}",
        f"generator.token_order={arm.order}", f"generator.order_seed={settings.order_seed}", *settings.generator,
    ]))
    inputs = {"config": read_sections(config), "tokenizer": made, "samples": settings.samples,
              "inception_images": settings.inception_images, "classifier": classifier_label(study)}

    def compute() -> Dict:
        classifier, evaluation = loaded(study, "classifier"), loaded(study, "evaluation")
        seconds = timed_training(folder / "generator", train_generator, config)
        return {"seed": cell.seed, "minutes": seconds / 60,
                **measure_arm(folder, config, made, settings, evaluation, classifier, cell.seed)}

    return inputs, compute


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint with the lowest validation NLL (ModelCheckpoint keeps one best-step file)."""
    found = sorted((run_dir / "checkpoints").glob("best-step*.ckpt"))
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no best-step checkpoint: the generator never validated")
    return found[-1]


def measure_arm(folder: Path, config: ExperimentConfig, made: Dict, settings: ComparePreset,
                evaluation: EvaluationSet, classifier, seed: int) -> Dict:
    checkpoint = best_checkpoint(folder / "generator")
    generator = load_generator(str(checkpoint))
    tokenizer = load_tokenizer(made["checkpoint"])
    labels = balanced_labels(config.data.num_classes, settings.samples)
    images = generate_images(generator, tokenizer, labels, config.sampling, seed, batch_size=500)
    grid = torch.cat([images[labels == c][:8] for c in range(config.data.num_classes)])
    save_image(grid.float() / 255, folder / "samples.png", nrow=8)
    features = classifier.features(images)
    reconstructions = load_file(str(Path(made["tokens"]).parent.parent / "reconstructions.safetensors"))
    versus_reconstructions = scores_of_features(features, reconstructions, labels)
    versus_real = scores_of_features(features, evaluation.features, labels)
    tokens, token_labels = held_out_tokens(made["tokens"], "val")
    bits = dependency_report(generator, tokens, token_labels, config.generator.codebook_size)
    out = {
        "checkpoint": str(checkpoint), "step": int(checkpoint.stem.removeprefix("best-step")),
        "fd_vs_reconstructions": versus_reconstructions.fd, "kid_vs_reconstructions": versus_reconstructions.kid_mean,
        "fd_vs_real": versus_real.fd, "kid_vs_real": versus_real.kid_mean,
        "class_accuracy": versus_real.class_accuracy, "samples": len(images),
        "bits_per_token": bits["bits_per_token"], "bits_per_position": bits["conditional_bits_given_class"],
    }
    if settings.inception_images:
        out["inception_fid"] = inception_fid(images, evaluation.images, settings.inception_images)
    return out


def inception_fid(samples: torch.Tensor, real: torch.Tensor, count: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = InceptionFeatures(inception_weights(None), device)
    return frechet_distance(extractor(samples[:count])["pool"], extractor(real[:count])["pool"])


# -- the report ------------------------------------------------------------------------------------------------


def verdict(differences: Dict[str, PairedDifference]) -> str:
    """The decision rule of docs/study.md on the three paired differences of the primary metric."""
    signs = [differences[f"{a} - {b}"].sign() for a, b in DECISION_PAIRS if f"{a} - {b}" in differences]
    if not signs:
        return "none (the preset holds no arm pair of the decision rule)"
    if len(signs) < len(DECISION_PAIRS):
        return "undecided (the preset lacks an arm of the decision rule, or a seed)"
    if all(s < 0 for s in signs):
        return "supported"
    if all(s > 0 for s in signs):
        return "refuted"
    return "undecided"


def paired_comparisons(settings: ComparePreset, tokenizers: Dict[str, List[Dict]], arms: Dict[str, List[Dict]]
                       ) -> Dict[str, Dict[str, Tuple[PairedDifference, int]]]:
    """The preset's `paired` arms, metric by metric: (paired difference, digits), keyed "a - b"."""
    def values(metric: str, arm: str) -> List[float]:
        runs = arms[arm] if metric in PAIRED_ARM_METRICS else tokenizers[settings.arms[arm].tokenizer]
        return [r[metric] for r in runs]

    return {f"{a} - {b}": {m: (PairedDifference.of(values(m, a), values(m, b)), digits)
                           for m, digits in {**PAIRED_ARM_METRICS, **PAIRED_TOKENIZER_METRICS}.items()}
            for a, b in settings.paired}


def as_record(difference: PairedDifference) -> Dict:
    return {"values": list(difference.differences), "mean": difference.summary.mean,
            "interval": list(difference.interval())}


def reading(a: str, b: str, difference: PairedDifference) -> str:
    ahead = a if difference.summary.mean < 0 else b
    sign = difference.sign()
    strength = "its 95% interval excludes 0" if sign else "its 95% interval holds 0"
    return f"`{a}` - `{b}`: {difference.text()}; `{ahead}` is ahead, {strength}"


def write_report(root: Path, settings: ComparePreset, tokenizers: Dict[str, List[Dict]], arms: Dict[str, List[Dict]],
                 classifier: str, timing: Dict) -> Dict:
    """study.md, study.json and the plots, from the cells finished so far (complete seeds only)."""
    seeds = [r["seed"] for r in next(iter(arms.values()))]
    differences = {f"{a} - {b}": PairedDifference.of([r[PRIMARY] for r in arms[a]], [r[PRIMARY] for r in arms[b]])
                   for a, b in DECISION_PAIRS if a in arms and b in arms}
    decision = verdict(differences)
    comparisons = paired_comparisons(settings, tokenizers, arms)
    lines = [f"Seeds {seeds} (paired); {settings.samples} samples an arm and seed against {settings.evaluation_images} "
             f"evaluation images; features: {classifier}. Mean ± sd over seeds.", "",
             "| arm | tokenizer | order | " + " | ".join(label for label, _ in ARM_METRICS.values()) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in ARM_METRICS) + " |"]
    for name, runs in arms.items():
        arm = settings.arms[name]
        cells = [Summary.of([r[m] for r in runs]).text(d) if all(r.get(m) is not None for r in runs) else "n/a"
                 for m, (_, d) in ARM_METRICS.items()]
        lines.append(f"| {name} | {arm.tokenizer} | {arm.order} | " + " | ".join(cells) + " |")
    lines += ["", "| tokenizer | " + " | ".join(label for label, _ in TOKENIZER_METRICS.values()) + " | plateaued |",
              "| --- | " + " | ".join("---:" for _ in TOKENIZER_METRICS) + " | --- |"]
    for name, runs in tokenizers.items():
        cells = [Summary.of([r[m] for r in runs]).text(d) if all(r.get(m) is not None for r in runs) else "n/a"
                 for m, (_, d) in TOKENIZER_METRICS.items() if m != "parameters"]
        cells.append(f"{runs[0]['parameters']:,}")
        plateaued = sum(bool(r["plateaued"]) for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {plateaued} of {len(runs)} |")
    if differences:
        lines += ["", f"Paired differences of {ARM_METRICS[PRIMARY][0]} (negative: the first arm is better):", ""]
        lines += [f"- {reading(*key.split(' - '), d)}" for key, d in differences.items()]
    if comparisons:
        lines += ["", "Paired comparisons of the preset (first minus second, 95% t-intervals):", ""]
        lines += [f"- `{key}`: " + "; ".join(f"{ARM_METRICS.get(m, TOKENIZER_METRICS.get(m))[0]} {d.text(digits)}"
                                             for m, (d, digits) in metrics.items())
                  for key, metrics in comparisons.items()]
    lines += ["", f"**Verdict (docs/study.md): {decision}.**", "",
              f"Time: training of the finished cells, summed: {timing['training_minutes']:.0f} min; this run's wall "
              f"time: {timing['wall_minutes']:.0f} min in {timing['lanes']} lane(s), computing "
              f"{timing['cells_computed']} of {timing['cells']} cells (the others were reused)."]
    text = "\n".join(lines) + "\n"
    (root / "study.md").write_text(text)
    report = {"seeds": seeds, "verdict": decision, **timing, "classifier": classifier,
              "differences": {k: as_record(d) for k, d in differences.items()},
              "paired": {key: {m: as_record(d) for m, (d, _) in metrics.items()}
                         for key, metrics in comparisons.items()},
              "arms": arms, "tokenizers": tokenizers}
    (root / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    mean = lambda rows: [sum(column) / len(column) for column in zip(*rows)]  # noqa: E731
    position_curves({n: mean([r["bits_per_position"] for r in runs]) for n, runs in arms.items()},
                    "bits per token (given class)", "code length at each generation position"
                    ).savefig(root / "bits_per_position.png")
    ks = list(next(iter(tokenizers.values()))[0]["fd_at_k"])
    position_curves({n: mean([[r["fd_at_k"][k] for k in ks] for r in runs]) for n, runs in tokenizers.items()},
                    "FD-FMNIST", "reconstructions from the first k tokens", positions=[int(k) for k in ks],
                    xlabel="k").savefig(root / "fd_at_k.png")
    plot_plateaus(tokenizers).savefig(root / "tokenizer_psnr.png")
    log.info("compare: verdict %s\n%s", decision, text)
    return report


def plot_plateaus(tokenizers: Dict[str, List[Dict]]):
    """Validation PSNR against steps, a line per tokenizer and seed: the curves behind the plateau check."""
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axis = figure.subplots()
    for name, runs in tokenizers.items():
        for run in runs:
            steps, values = zip(*run["psnr_curve"]) if run["psnr_curve"] else ((), ())
            axis.plot(steps, values, marker="o", markersize=2, label=f"{name} seed {run['seed']}")
    axis.set_xlabel("step")
    axis.set_ylabel("validation PSNR (dB)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    figure.tight_layout()
    return figure
