"""`nativetok export`: a training checkpoint as a folder to share, the way Hugging Face models are shared.

A Lightning checkpoint is mostly optimizer state and holds both the trained and the moving-average
weights. The export keeps what inference loads (`checkpoints.weights_state`): the moving average when there
is one, as `model.safetensors`; `config.json` holds the experiment config and what the checkpoint knew
(step, source sha256, tokenizer pin); `README.md` is a model card generated from those and from the run
folder's logs. A generator's folder bundles its pinned tokenizer in `tokenizer/`, so it samples on its own.
Loaders take the folder, or its Hub repo once uploaded (see `checkpoints`). An export is written only into a
new or empty folder, or with `force` over an earlier export holding nothing but an export's files: a folder
with anything else in it is refused untouched.

`export` is what `save_pretrained` is to a Hub model, and `push_to_hub` uploads an export through
`huggingface_hub` once it loads as the loaders load it; `load_tokenizer("owner/name", revision=...)` reads it
back. The card's YAML front matter is the Hub's (library, license, datasets, task, measured metrics).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import yaml
from safetensors.torch import save_file

from nativetok.checkpoints import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    HUB_FILES,
    HUB_ID,
    TOKENIZER_FOLDER,
    WEIGHTS_FILE,
    CheckpointError,
    export_metadata,
    export_sha256,
    file_sha256,
    is_export,
    load_generator,
    load_generator_tokenizer,
    load_tokenizer,
    module_state,
    pinned_tokenizer,
    read_checkpoint,
    run_folder_of,
    weights_sha256,
)
from nativetok.config.loading import from_container, to_container
from nativetok.config.schema import ExperimentConfig
from nativetok.data import DatasetIndex
from nativetok.io import replace_folder
from nativetok.version import __version__

log = logging.getLogger(__name__)

NOT_RECORDED = "not recorded"
CARD_FILE = "README.md"
# What an export holds; its tokenizer/ holds the same but tokenizer/.
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, TOKENIZER_FOLDER)
# What a push uploads: what the loaders read (HUB_FILES) and the cards.
PUSHED_FILES = (*HUB_FILES, CARD_FILE, f"{TOKENIZER_FOLDER}/{CARD_FILE}")
# The card's license unless the exporter names another: NativeTok's own (setup.cfg).
DEFAULT_LICENSE = "apache-2.0"
# Hub dataset ids of the index names `nativetok shard` writes; another name is not linked to a Hub dataset.
HUB_DATASETS = {"fmnist": "zalando-datasets/fashion_mnist", "imagenet": "ILSVRC/imagenet-1k"}
# The Hub's task for each kind: a tokenizer maps images to codes; the generator draws images from class ids, which
# no Hub task names (the card's tags say class-conditional).
PIPELINE_TAGS = {"tokenizer": "image-feature-extraction", "generator": "unconditional-image-generation"}


def export(
    checkpoint: str | os.PathLike, out: str | os.PathLike, tokenizer: Optional[str] = None,
    include_tokenizer: bool = True, force: bool = False, license: str = DEFAULT_LICENSE,
) -> Path:
    """Write the export of a tokenizer or generator checkpoint to `out` and return it; `out` is new or empty, or
    with `force` an earlier export (`check_target`). A generator bundles the tokenizer it is pinned to
    (`tokenizer` to give it another path; its sha256 is checked as `nativetok sample` checks it) unless
    `include_tokenizer` is off. `license` (a Hub license id) is what the card shares the weights under."""
    source, out = Path(checkpoint), Path(out)
    if not source.is_file():
        raise CheckpointError(f"export needs a checkpoint file, got {source}" +
                              (" (already an export)" if is_export(source) else ""))
    check_target(out, force)
    saved = read_checkpoint(source, None)
    kind = saved["nativetok"]["kind"]
    config = from_container(saved["hyper_parameters"]["config"])
    state = module_state(saved, "ema.shadow.")
    ema = bool(state)
    origin = {"file": source.name, "sha256": file_sha256(source), "global_step": saved.get("global_step"),
              "trained_with": saved["nativetok"].get("version"), "written_by": "nativetok export"}

    def bundle(target: Path) -> Optional[dict]:
        if kind == "generator" and include_tokenizer:
            _bundle_tokenizer(source, saved, tokenizer, target)
        return saved["nativetok"].get("tokenizer")

    _write_export(out, kind, config, state or module_state(saved, f"{kind}."), ema, origin,
                  recorded_metrics(source, saved), saved["nativetok"].get("classes"), bundle, license)
    log.info("exported %s %s (%s) to %s", kind, source, "moving-average weights" if ema else "weights", out)
    return out


def save_pretrained(model, out: str | os.PathLike, config: Optional[ExperimentConfig] = None, tokenizer=None,
                    force: bool = False, license: Optional[str] = None) -> Path:
    """`Pretrained.save_pretrained`: a tokenizer or generator in memory, with its current weights, as an export
    in `out`. Its name (the sha256 pins and manifests use) is that of its weights file, as no checkpoint was
    read. A generator bundles `tokenizer` (a tokenizer model, or a checkpoint or export path), by default the one
    it was pinned to when loaded; the bundle must fit the generator's codebook and token count."""
    out = Path(out)
    config = config or model.experiment_config
    if not isinstance(config, ExperimentConfig):
        raise CheckpointError(f"save_pretrained needs the experiment config this {type(model).__name__} was built "
                              f"with (config=...); models from from_pretrained or load_* carry theirs")
    check_target(out, force)
    kind = model.pretrained_kind
    loaded = read_checkpoint(model.loaded_from, kind) if kind == "generator" and model.loaded_from else None
    if kind == "generator" and tokenizer is None:
        if loaded is None:
            raise CheckpointError("save_pretrained of a generator needs the tokenizer its tokens belong to: "
                                  "tokenizer= a tokenizer model, checkpoint or export")
        tokenizer = pinned_tokenizer(model.loaded_from, loaded)[0]
    origin = {"file": None, "sha256": None, "global_step": None, "trained_with": None,
              "written_by": "save_pretrained"}

    def bundle(target: Path) -> Optional[dict]:
        if kind != "generator":
            return None
        _bundle_given_tokenizer(tokenizer, target)  # its fit to the generator is checked with the whole export
        return {"sha256": export_sha256(target), "path": TOKENIZER_FOLDER, "run_path": TOKENIZER_FOLDER}

    classes = loaded["nativetok"].get("classes") if loaded else None  # the sample grid's row names
    _write_export(out, kind, config, model.state_dict(), False, origin, {}, classes, bundle,
                  license or DEFAULT_LICENSE)
    return out


def _write_export(out: Path, kind: str, config: ExperimentConfig, state: dict, ema: bool, origin: dict,
                  metrics: dict, classes: Optional[list], bundle: Callable[[Path], Optional[dict]],
                  license: str) -> None:
    """The export's files, written into a staging folder, loaded back as the loaders load them, then moved to
    `out`. `bundle(tokenizer_folder)` writes a generator's tokenizer there when it bundles one and returns the
    pin to record (None: none)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    meta = {
        "format": EXPORT_FORMAT, "kind": kind, "license": license, "version": __version__,
        "exported_by": f"nativetok {__version__}", "written_by": origin.pop("written_by"), "source": origin,
        "weights": {"file": WEIGHTS_FILE, "ema": ema, "ema_decay": config.optim.ema_decay if ema else None,
                    "parameters": sum(t.numel() for t in tensors.values())},
        "extra_state": {k: v for k, v in state.items() if not torch.is_tensor(v)},
        "data": data_summary(config), "metrics": metrics,
        **({"classes": [str(c) for c in classes]} if isinstance(classes, list) else {}),
    }
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        meta["weights"]["sha256"] = _save_weights(tensors, staging / WEIGHTS_FILE, kind)
        meta["source"]["sha256"] = meta["source"]["sha256"] or meta["weights"]["sha256"]
        pin = bundle(staging / TOKENIZER_FOLDER)
        if pin:  # found again from the export folder in tokenizer/ only, checked by its weights' bytes
            meta["tokenizer"] = {"sha256": pin["sha256"], "path": pin["path"], "run_path": TOKENIZER_FOLDER,
                                 **({"weights_sha256": pin["weights_sha256"]} if "weights_sha256" in pin else {})}
        if (staging / TOKENIZER_FOLDER).exists():
            meta["bundled_tokenizer"] = TOKENIZER_FOLDER
            if pin:
                meta["tokenizer"]["weights_sha256"] = weights_sha256(staging / TOKENIZER_FOLDER)
        body = {"nativetok": meta, "config": to_container(config)}
        (staging / CONFIG_FILE).write_text(json.dumps(body, indent=1) + "\n")
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)  # safetensors writes 0600 files
        (staging / CARD_FILE).write_text(model_card(meta, config))
        checked_export(staging)
        replace_folder(staging, out, aside=out.with_name(f".{out.name}.previous"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def push_to_hub(source: str | os.PathLike, repo_id: str, revision: Optional[str] = None,
                token: Optional[str] = None, private: Optional[bool] = None, commit_message: Optional[str] = None):
    """Upload the export of `source` to Hugging Face Hub model repo `repo_id` (created when new, `private` then) on
    branch `revision` (created from main when new; None: main) and return the commit (`.oid` pins the version,
    `.commit_url`). `source` is an export folder, or a checkpoint exported with the defaults first. Nothing is
    sent before the folder loads as every loader loads it (`checked_export`); only an export's files go up, and
    export files the branch holds that this export lacks (a tokenizer/ no longer bundled) go in that commit."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise CheckpointError('pushing to the Hub needs huggingface_hub: pip install ".[hub]"') from None
    if not HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id} is not a Hugging Face Hub repo id (owner/name)")
    with tempfile.TemporaryDirectory(prefix="nativetok-push-") as scratch:
        folder = Path(source) if Path(source).is_dir() else export(source, Path(scratch) / "export")
        kind, sha256 = checked_export(folder)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        files = list(PUSHED_FILES)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, allow_patterns=files, delete_patterns=files,
            commit_message=commit_message or f"nativetok {__version__}: {kind} exported from sha256 {sha256[:12]}")
    log.info("pushed %s %s to %s (%s): commit %s", kind, source, repo_id, revision or "main", commit.oid)
    return commit


def checked_export(folder: Path) -> Tuple[str, str]:
    """(kind, sha256 of its checkpoint) of an export folder that loads as the loaders load it (config checked,
    weights' sha256, shapes, a generator's bundled tokenizer against its pin) and holds only an export's files."""
    unknown = _unknown_files(folder, EXPORT_FILES)
    if unknown:
        raise CheckpointError(f"{folder} holds {unknown[0].relative_to(folder)}, which is not an export's file: "
                              f"push an export folder (`nativetok export`) or a checkpoint")
    kind = export_metadata(folder)[0].get("kind")
    if kind == "generator":
        load_generator(folder)
        if (folder / TOKENIZER_FOLDER).exists():
            load_generator_tokenizer(folder)
    else:
        load_tokenizer(folder)  # refuses what is neither kind
    return kind, export_sha256(folder)


def check_target(out: Path, force: bool) -> None:
    """Refuse (CheckpointError, nothing touched) an `out` that is neither new, empty, nor an earlier export of
    ours (a readable export config.json and nothing but an export's files), and an earlier export without
    `force`: replacing a folder deletes what it holds, so only what an export wrote may be there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder: choose a new or empty folder")
    if not any(out.iterdir()):
        return
    unknown = _unknown_files(out, EXPORT_FILES)
    try:
        export_metadata(out)
    except CheckpointError:
        unknown = unknown or [out / CONFIG_FILE]
    if unknown:
        shown = ", ".join(str(p.relative_to(out)) for p in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"{out} exists and is not an earlier export ({shown} is not one of its files): "
                              f"choose a new or empty folder; nothing was changed")
    if not force:
        raise CheckpointError(f"{out} holds an earlier export: pass --force to replace it")


def _unknown_files(folder: Path, allowed: tuple) -> list:
    """What `folder` holds beyond an export's files (its tokenizer/ checked as an export itself)."""
    unknown = []
    for path in sorted(folder.iterdir()):
        if path.name not in allowed or path.is_dir() != (path.name == TOKENIZER_FOLDER):
            unknown.append(path)
        elif path.is_dir():
            unknown += _unknown_files(path, tuple(name for name in allowed if name != TOKENIZER_FOLDER))
    return unknown


def _save_weights(tensors: dict, path: Path, kind: str) -> str:
    save_file(tensors, str(path), metadata={"format": "pt", "nativetok_kind": kind})
    return file_sha256(path)


def _bundle_tokenizer(generator: Path, saved: dict, tokenizer: Optional[str], target: Path) -> None:
    """The generator's pinned tokenizer, exported (or copied, when it is an export already) into `target`."""
    path, sha256 = pinned_tokenizer(generator, saved, tokenizer)
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        export(path, target)
    if export_sha256(target) != sha256:
        raise CheckpointError(f"the tokenizer bundled from {path} is not the one {generator} was checked against")


def _bundle_given_tokenizer(tokenizer, target: Path) -> None:
    """A tokenizer given to `save_pretrained`: a model (saved as well), an export (copied when it holds only an
    export's files and loads), or a checkpoint (exported)."""
    if isinstance(tokenizer, torch.nn.Module):
        if getattr(tokenizer, "pretrained_kind", None) != "tokenizer":
            raise CheckpointError(f"tokenizer= is a {type(tokenizer).__name__}, not a NativeTok tokenizer")
        save_pretrained(tokenizer, target)
    elif is_export(tokenizer):
        checked_export(Path(tokenizer))
        shutil.copytree(tokenizer, target)
    else:
        export(tokenizer, target)


def data_summary(config: ExperimentConfig) -> dict:
    """What the run trained on: the configured sizes, and what the data index says when it is on this machine."""
    d = config.data
    summary = {"index": d.index, "image_size": d.image_size, "channels": d.channels, "num_classes": d.num_classes,
               "batch_size": d.batch_size}
    if d.index and Path(d.index).is_file():
        try:
            index = DatasetIndex.load(Path(d.index))
            summary.update(name=index.name, classes=list(index.classes),
                           samples={split: index.split(split).samples for split in index.splits})
        except (OSError, ValueError, KeyError, TypeError) as error:  # the card says not recorded
            log.warning("could not read the data index %s: %s", d.index, error)
    return summary


def recorded_metrics(source: Path, saved: dict) -> dict:
    """Validation metrics the run recorded: the best score kept by its ModelCheckpoint, and the last validation
    at or before the checkpoint's step in the run folder's TensorBoard log. Nothing else is claimed."""
    metrics: dict = {}
    for key, value in (saved.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_score") is not None:
            metrics["best"] = {"monitor": value["monitor"], "value": float(value["best_model_score"]),
                               "checkpoint": Path(value["best_model_path"]).name}
    tb = run_folder_of(source) / "tb"
    if not any(tb.glob("events.*")):
        return metrics
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        events.Reload()
        step_limit = saved.get("global_step") or 0
        series = {tag: [e for e in events.Scalars(tag) if e.step <= step_limit]
                  for tag in events.Tags()["scalars"] if tag.startswith("val/")}
    except Exception as error:  # a damaged or foreign log: the card says not recorded
        log.warning("could not read the validation metrics of %s: %s", tb, error)
        return metrics
    steps = [e.step for values in series.values() for e in values]
    if steps:
        last = max(steps)
        values = {tag: e.value for tag, found in series.items() for e in found if e.step == last}
        metrics["validation"] = {"logged_step": last, "values": values}
    return metrics


def model_card(meta: dict, config: ExperimentConfig) -> str:
    """README.md of an export: what it is, what it was trained on and how long, what the run measured, how
    to load it. Only recorded values; what the checkpoint and run folder did not record is said to be so."""
    kind, data, weights, source = meta["kind"], meta["data"], meta["weights"], meta["source"]
    name = config.run.name
    if kind == "tokenizer":
        t = config.tokenizer
        model = (f"tokenizer (kind {t.kind}): {data['image_size']}x{data['image_size']}x{data['channels']} images -> "
                 f"{meta['extra_state'].get('_extra_state', {}).get('active_tokens', t.num_tokens)} tokens "
                 f"(of {t.num_tokens}) over a codebook of {t.quantizer.codebook_size}")
    else:
        g = config.generator
        model = (f"class-conditional {g.kind} generator of {g.num_tokens} tokens over a codebook of "
                 f"{g.codebook_size}, {data['num_classes']} classes (width {g.width}, depth {g.depth})")
    averaged = f"moving average (decay {weights['ema_decay']})" if weights["ema"] else "trained (no moving average)"
    lines = [
        "---", yaml.safe_dump(card_metadata(meta, config), sort_keys=False).rstrip("\n"), "---", "",
        f"# {name} ({kind})", "",
        f"A NativeTok {model}. {_origin_line(meta)}", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| parameters | {weights['parameters']:,} |",
        f"| weights | {averaged}, `{weights['file']}` |",
        "| experiment config | `config.json` (`config`) |",
        "", "## Training", "",
        "| | |", "|---|---|",
        f"| data | {_data_line(data)} |",
        f"| classes | {_classes_line(data)} |",
        f"| steps | {_or_not_recorded(source['global_step'])} (of trainer.max_steps {config.trainer.max_steps}) |",
        f"| batch size | {data['batch_size']} (global) |",
        f"| seed | {config.seed} |",
        "", "## Metrics", "",
        *_metric_lines(meta["metrics"]),
    ]
    if kind == "generator":
        pin = meta.get("tokenizer")
        lines += ["", "## Tokenizer", "",
                  f"Trained on the tokens of the tokenizer with sha256 `{pin['sha256']}`." if pin
                  else f"The tokenizer's sha256 was {NOT_RECORDED} (trained before generators pinned it).",
                  "Bundled in `tokenizer/` (checked against that sha256 at export)." if meta.get("bundled_tokenizer")
                  else "Not bundled: give it to the loaders (`--tokenizer`)."]
    lines += ["", "## How to load", "", "```python", *_snippet(kind, data), "```", "",
              "NativeTok is not on PyPI: in a checkout of its repository, `pip install \".[hub]\"` (`[hub]` adds "
              "`huggingface_hub`, which reads a Hub repo id `owner/name` given instead of the folder; "
              "`revision=` a branch, tag or commit pins the version).", ""]
    return "\n".join(lines)


def card_metadata(meta: dict, config: ExperimentConfig) -> dict:
    """The card's YAML front matter, in the Hub's model card format. A model-index holds only what the run
    measured (the last validation PSNR, with its image count when the config and data index give it): FIDs are
    not measured in training, and a dataset without a Hub id is named but not linked."""
    kind, data = meta["kind"], meta["data"]
    tags = ["nativetok", "image-tokenizer"] if kind == "tokenizer" else [
        "nativetok", "image-generation", "class-conditional"]
    card = {"library_name": "nativetok", "license": meta.get("license", DEFAULT_LICENSE),
            "pipeline_tag": PIPELINE_TAGS[kind], "tags": tags}
    dataset = HUB_DATASETS.get(data.get("name"))
    if dataset:
        card["datasets"] = [dataset]
    psnr = (meta["metrics"].get("validation") or {}).get("values", {}).get("val/psnr")
    if kind == "tokenizer" and psnr is not None and data.get("name"):
        images = validated_images(config, data)
        name = f"PSNR (dB, {images} images)" if images else "PSNR (dB)"
        metric = {"type": "psnr", "name": name, "value": round(psnr, 4)}
        card["metrics"] = ["psnr"]
        card["model-index"] = [{"name": config.run.name, "results": [{
            "task": {"type": "image-to-image", "name": "Image reconstruction"},
            "dataset": {"type": dataset or data["name"], "name": data["name"], "split": config.data.val_split},
            "metrics": [metric]}]}]
    return card


def validated_images(config: ExperimentConfig, data: dict) -> Optional[int]:
    """How many images a validation of the run read: its split (as the index counts it), or data.val_samples of
    it; None when unknown (no index on the exporting machine, shards given by pattern, limit_val_batches)."""
    split = data.get("samples", {}).get(config.data.val_split)
    if split is None or config.data.val_shards or config.trainer.limit_val_batches not in (1, 1.0):
        return None
    return min(split, config.data.val_samples or split)


def _origin_line(meta: dict) -> str:
    source, writer = meta["source"], f"`{meta.get('written_by', 'nativetok export')}` ({meta['exported_by']})"
    if source["file"]:
        return (f"Exported by {writer} from `{source['file']}` (sha256 `{source['sha256']}`), which names this "
                f"model in pins and manifests.")
    return (f"Written by {writer} from a model in memory; the sha256 of its weights file, `{source['sha256']}`, "
            f"names it in pins and manifests.")


def _or_not_recorded(value) -> str:
    return NOT_RECORDED if value is None else str(value)


def _data_line(data: dict) -> str:
    splits = ", ".join(f"{split} {count:,}" for split, count in data.get("samples", {}).items())
    name = data.get("name", f"name {NOT_RECORDED} (index not on the exporting machine)")
    return f"{name}, `{data['index']}`" + (f" ({splits} samples)" if splits else "")


def _classes_line(data: dict) -> str:
    classes = data.get("classes")
    if not classes:
        return f"{data['num_classes']} (names {NOT_RECORDED})"
    shown = ", ".join(f"{i} {c}" for i, c in enumerate(classes[:20]))
    return f"{len(classes)}: {shown}" + (", ..." if len(classes) > 20 else "")


def _metric_lines(metrics: dict) -> list:
    lines = []
    validation = metrics.get("validation")
    if validation:
        lines += [f"Last validation of the run (TensorBoard step {validation['logged_step']}):", "",
                  "| metric | value |", "|---|---|",
                  *[f"| {tag} | {value:.4g} |" for tag, value in sorted(validation["values"].items())], ""]
    else:
        lines += [f"Validation metrics: {NOT_RECORDED} (no TensorBoard log beside the checkpoint).", ""]
    best = metrics.get("best")
    lines.append(f"Best {best['monitor']} of the run: {best['value']:.4g} (`{best['checkpoint']}`)." if best
                 else f"Best validation score: {NOT_RECORDED}.")
    lines.append("FID: not measured at export; see `nativetok eval-fid`.")
    return lines


def _snippet(kind: str, data: dict) -> list:
    shape = f"[B, {data['channels']}, {data['image_size']}, {data['image_size']}]"
    if kind == "tokenizer":
        return ["from nativetok import NativeTokenizer", "",
                'tokenizer = NativeTokenizer.from_pretrained("path/to/this/folder")  # or "owner/name", '
                'revision="<commit>"',
                f"ids = tokenizer.encode(images)  # float {shape} in [0, 1] -> token ids [B, K]",
                "images = tokenizer.decode(ids)  # and back; decode(ids, k=4) from the first 4 tokens"]
    return ["import torch", "from nativetok import Generator",
            "from nativetok.checkpoints import load_generator_tokenizer", "",
            'generator = Generator.from_pretrained("path/to/this/folder")  # or "owner/name", revision="<commit>"',
            'tokenizer, _ = load_generator_tokenizer("path/to/this/folder")  # tokenizer/, sha256 checked',
            "ids = generator.sample(labels=torch.tensor([0, 1, 2]), seed=0)  # options: config.json's sampling",
            f"images = tokenizer.decode(ids)  # float {shape} in [0, 1]",
            "# or: nativetok sample --generator path/to/this/folder --out samples/  (or owner/name --revision REV)"]
