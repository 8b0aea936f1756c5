"""`nativetok <command>`: parse the arguments, load the config, call one function per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

log = logging.getLogger("nativetok")


def _shard(args: argparse.Namespace) -> None:
    if args.source == "fmnist":
        from nativetok.data.fmnist import write_fmnist

        write_fmnist(Path(args.out), source=args.raw, size=args.size, per_shard=args.per_shard, force=args.force)
    else:
        from nativetok.data.folders import shard_folder

        shard_folder(
            Path(args.root),
            Path(args.out),
            name=args.name,
            splits=args.splits,
            size=args.size,
            per_shard=args.per_shard,
            fmt=args.format,
            channels=args.channels,
            workers=args.workers,
            classes_file=args.classes,
            val_labels=args.val_labels,
            devkit_meta=args.devkit_meta,
            force=args.force,
            seed=args.seed,
            skip_bad=args.skip_bad,
        )


def _config(args: argparse.Namespace) -> None:
    from nativetok.config import load_config, to_yaml

    print(to_yaml(load_config(args.experiment, args.overrides)), end="")


def _train(args: argparse.Namespace) -> None:
    from nativetok.config import load_config

    config = load_config(args.experiment, args.overrides)
    from nativetok.lit.train import train_generator, train_tokenizer

    (train_tokenizer if config.stage == "tokenizer" else train_generator)(config)


def _precision_option(parser: argparse.ArgumentParser) -> None:
    from nativetok.precision import INFERENCE_PRECISIONS

    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="32-true",
                        help="autocast for the models (bf16-mixed: faster on GPUs); default 32-true")


def _positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (argparse reports anything else with exit code 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tokenize(args: argparse.Namespace) -> None:
    from nativetok.pipelines.tokenize import tokenize_shards

    tokenize_shards(
        args.tokenizer, args.data, Path(args.out), splits=args.splits, batch_size=args.batch_size,
        flip=args.flip, device=args.device, precision=args.precision, force=args.force,
    )


# `nativetok sample`'s options that override the generator's sampling.* settings, by field.
SAMPLING_OPTIONS = {
    "cfg_scale": "--cfg", "cfg_schedule": "--cfg-schedule", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "steps": "--steps",
}


def _sample(args: argparse.Namespace) -> None:
    from nativetok.config.loading import check_sampling_options
    from nativetok.pipelines.sample import sample_to_folder

    sampling = {field: getattr(args, option[2:].replace("-", "_")) for field, option in SAMPLING_OPTIONS.items()}
    check_sampling_options(sampling, SAMPLING_OPTIONS)
    sample_to_folder(
        args.generator, Path(args.out), classes=args.classes, per_class=args.per_class,
        tokenizer_path=args.tokenizer, seed=args.seed, batch_size=args.batch_size, device=args.device,
        png=args.format in ("png", "both"), npz=args.format in ("npz", "both"), precision=args.precision,
        tokenizer_mismatch_ok=args.tokenizer_mismatch_ok, **sampling,
    )


def _eval_fid(args: argparse.Namespace) -> None:
    from nativetok.eval.fid import evaluate_fid

    evaluate_fid(
        tokenizer_path=args.tokenizer, generator_path=args.generator, samples=args.samples, num=args.num,
        data=args.data, real_split=args.split, reference_split=args.reference_split, inception=args.inception,
        device=args.device, seed=args.seed, out=Path(args.out), precision=args.precision,
        tokenizer_mismatch_ok=args.tokenizer_mismatch_ok, reference_images=args.reference_images,
        ref_stats=args.ref_stats,
    )


def _ref_stats(args: argparse.Namespace) -> None:
    import torch

    from nativetok.eval.fid import reference_stats
    from nativetok.eval.inception import InceptionFeatures, inception_weights

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = InceptionFeatures(inception_weights(args.inception), device)
    stats = reference_stats(args.data, args.split, args.images, args.seed, extractor)
    stats.save(Path(args.out))
    print(f"{args.out}: {stats.describe()}")


def _token_metrics(args: argparse.Namespace) -> None:
    from nativetok.eval.token_metrics import token_metrics

    report = token_metrics(args.generator, Path(args.out), split=args.split, data=args.data)
    print(json.dumps(report["total"], indent=1))


def _compare(args: argparse.Namespace) -> None:
    from nativetok.pipelines.compare import compare

    compare(args.preset, Path(args.out), seeds=args.seeds)


def _export(args: argparse.Namespace) -> None:
    from nativetok.pipelines.export import export

    print(export(args.checkpoint, Path(args.out), tokenizer=args.tokenizer, include_tokenizer=not args.no_tokenizer,
                 force=args.force))


def _ablate(args: argparse.Namespace) -> None:
    from nativetok.pipelines.ablation import ablate

    ablate(args.preset, Path(args.out))


def _submit(args: argparse.Namespace) -> None:
    from nativetok.cluster.slurm import Resources, Site, submit
    from nativetok.config.loading import resolve_experiment

    resources = Resources(args.nodes, args.gpus, args.cpus_per_task, args.time, args.partition, args.account)
    site = Site(args.sbatch, args.setup, args.template)
    experiment = str(resolve_experiment(args.experiment))  # the job script names the file, not the name
    job = submit(experiment, args.overrides, resources, venv=Path(args.venv), dry_run=args.dry_run, site=site)
    if job:
        print(job)


DESCRIPTION = """Train native visual tokenizers (stage 1) and class-conditional generators on their tokens
(stage 2), then sample, measure (FID, comparisons, ablations), submit to SLURM and export."""

TASKS = """\
typical tasks (`nativetok <command> --help` for each command's options):
  train the tokenizer            nativetok train fmnist_tiny
  ... on a GPU, for 500 steps    nativetok train fmnist_tiny +trainer=gpu trainer.max_steps=500
  check that a run starts        nativetok train fmnist_tiny trainer.fast_dev_run=true
  print the resolved config      nativetok config fmnist_tiny +trainer=ddp
  images to token shards         nativetok tokenize --tokenizer runs/fmnist_tiny/checkpoints/last.ckpt \\
                                   --out data/tokens/fmnist_tiny --flip
  train the generator            nativetok train fmnist_tiny_ar
  sample images                  nativetok sample --generator runs/fmnist_tiny_ar/checkpoints/last.ckpt \\
                                   --out runs/samples/fmnist_tiny_ar --cfg 2.0
  rFID / gFID                    nativetok eval-fid --tokenizer runs/fmnist_tiny/checkpoints/last.ckpt \\
                                   --generator runs/fmnist_tiny_ar/checkpoints/last.ckpt --data data/fmnist/index.json
  compare token kinds            nativetok compare --preset default --out runs/compare
  ablate the tokenizer           nativetok ablate --preset hnt --out runs/ablation
  train on SLURM                 nativetok submit imagenet256_nativetok_l32 --nodes 2 --time 2-00:00:00
  share a model                  nativetok export runs/fmnist_tiny_ar/checkpoints/last.ckpt exports/fmnist_tiny_ar
"""

EXPERIMENT_HELP = "a name (fmnist_tiny: experiments/fmnist_tiny.yaml, here or in the repository) or a path"
OVERRIDES_HELP = ("+group=name merges experiments/<group>/<name>.yaml (e.g. +trainer=gpu), then key=value, "
                  "e.g. trainer.max_steps=200 data.batch_size=64")


def _experiments_epilog() -> str:
    """The experiment names and presets this directory offers, for --help."""
    from nativetok.config.loading import available_experiments, preset_groups

    names = ", ".join(available_experiments()) or "none found under ./experiments or the repository"
    lines = [textwrap.fill(f"experiments: {names}", width=100, subsequent_indent="  ", break_on_hyphens=False)]
    lines += [f"presets: +{group}={'|'.join(files)}" for group, files in preset_groups().items() if files]
    return "\n".join(lines) + "\n"


def _experiment_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help=EXPERIMENT_HELP)
    command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    from nativetok.config.schema import GUIDANCE_SCHEDULES
    from nativetok.version import __version__

    experiments = _experiments_epilog()
    parser = argparse.ArgumentParser(prog="nativetok", description=DESCRIPTION, epilog=TASKS + "\n" + experiments,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    shard = commands.add_parser("shard", help="write webdataset shards and their index.json")
    sources = shard.add_subparsers(dest="source", required=True)
    fmnist = sources.add_parser("fmnist", help="Fashion-MNIST from its IDX files (the embedded default)")
    fmnist.add_argument("--out", default="data/fmnist")
    fmnist.add_argument("--raw", type=Path, default=None, help="folder with the four IDX .gz files")
    fmnist.add_argument("--size", type=int, default=32, help="pad the 28px images to this size")
    fmnist.add_argument("--per-shard", type=int, default=2000)
    fmnist.add_argument("--force", action="store_true", help="rewrite even when up to date")
    folder = sources.add_parser("folder", help="an image folder tree <root>/<split>/<class>/<image> (ImageNet)")
    folder.add_argument("--root", required=True)
    folder.add_argument("--out", required=True)
    folder.add_argument("--name", required=True, help="shards are <name>-<split>-NNNNNN.tar")
    folder.add_argument("--splits", nargs="+", default=["train", "val"])
    folder.add_argument("--size", type=int, default=256, help="short side resize, then centre crop")
    folder.add_argument("--per-shard", type=int, default=1000)
    folder.add_argument("--format", choices=["png", "jpg", "original"], default="jpg")
    folder.add_argument("--channels", type=int, choices=[1, 3], default=3)
    folder.add_argument("--workers", type=int, default=4)
    folder.add_argument("--classes", type=Path, default=None, help="class names, one per line, in index order")
    folder.add_argument("--val-labels", type=Path, default=None,
                        help="labels of a flat split: LOC_val_solution.csv, '<file> <class>' lines, or the devkit's "
                             "ILSVRC2012_validation_ground_truth.txt (with --devkit-meta)")
    folder.add_argument("--devkit-meta", type=Path, default=None, help="ILSVRC2012_devkit_t12/data/meta.mat")
    folder.add_argument("--force", action="store_true",
                        help="when --out holds shards made with other settings, delete them and start over "
                             "(same settings always resume)")
    folder.add_argument("--seed", type=int, default=0,
                        help="the shuffled order the images are written in (recorded in the manifest)")
    folder.add_argument("--skip-bad", action="store_true",
                        help="leave out (and count) images that cannot be decoded; without it the first one stops "
                             "the run, naming the file")
    shard.set_defaults(func=_shard)

    train = commands.add_parser("train", help="train the stage an experiment describes", epilog=experiments,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _experiment_arguments(train)
    train.set_defaults(func=_train)

    tokenize = commands.add_parser("tokenize", help="encode image shards into token shards with a tokenizer")
    tokenize.add_argument("--tokenizer", required=True, help="stage-1 checkpoint")
    tokenize.add_argument("--data", default="data/fmnist/index.json", help="index.json of the image shards")
    tokenize.add_argument("--out", required=True, help="folder for the token shards and their index.json")
    tokenize.add_argument("--splits", nargs="+", default=["train", "val"])
    tokenize.add_argument("--batch-size", type=int, default=256)
    tokenize.add_argument("--flip", action="store_true", help="also store the tokens of the flipped image")
    tokenize.add_argument("--force", action="store_true",
                          help="when --out holds token shards of other inputs (another tokenizer, --flip, "
                               "image index or precision), delete them and start over (same inputs always resume)")
    tokenize.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    _precision_option(tokenize)
    tokenize.set_defaults(func=_tokenize)

    sample = commands.add_parser(
        "sample", help="class-conditional samples of a generator, decoded to images",
        description="Under torchrun or srun the ranks share the batches and write the images one process would.")
    sample.add_argument("--generator", required=True, help="stage-2 checkpoint")
    sample.add_argument("--tokenizer", default=None, help="default: the one the generator was trained with")
    sample.add_argument("--out", required=True)
    sample.add_argument("--classes", type=int, nargs="+", default=None, help="default: every class")
    sample.add_argument("--per-class", type=_positive_int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=_positive_int, default=64,
                        help="batch b is drawn with seed SEED + b: another batch size gives other images")
    sample.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    sample.add_argument("--format", choices=["png", "npz", "both"], default="both",
                        help="npz: ADM's samples.npz (arr_0, uint8 NHWC RGB) for its evaluator")
    sample.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's)")
    sample.add_argument("--cfg-schedule", choices=GUIDANCE_SCHEDULES, default=None)
    sample.add_argument("--temperature", type=float, default=None)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--steps", type=int, default=None, help="MaskGIT decoding steps")
    sample.add_argument("--tokenizer-mismatch-ok", action="store_true",
                        help="decode with the given or configured tokenizer even if it is not the file the "
                             "generator was trained with (another sha256)")
    _precision_option(sample)
    sample.set_defaults(func=_sample)

    fid = commands.add_parser("eval-fid", help="rFID of a tokenizer, gFID of a generator or of a sample folder")
    fid.add_argument("--tokenizer", default=None, help="stage-1 checkpoint: reconstruction FID")
    fid.add_argument("--generator", default=None, help="stage-2 checkpoint: generation FID of its samples")
    fid.add_argument("--samples", type=Path, default=None, help="a folder of sample images instead of --generator")
    fid.add_argument("--num", type=int, default=None,
                     help="images per set (default: the config's evaluation.images; papers use 50000)")
    fid.add_argument("--reference-images", type=int, default=None,
                     help="gFID reference: a seeded class-balanced subset of this many images of the reference "
                          "split, 0 for all of it (default: the config's evaluation.reference_images)")
    fid.add_argument("--ref-stats", type=Path, default=None,
                     help="gFID against these statistics: a `nativetok ref-stats` .npz or an ADM reference "
                          "batch (.npz with mu/sigma, or arr_0 images)")
    fid.add_argument("--data", default=None, help="real images' index.json (needed but for gFID with --ref-stats: "
                                                  "a checkpoint's stored data.index is not read on its own)")
    fid.add_argument("--split", default="val", help="real split for rFID")
    fid.add_argument("--reference-split", default="train", help="real split gFID compares against")
    fid.add_argument("--inception", default=None, help="torch-fidelity InceptionV3 weights (default: converted)")
    fid.add_argument("--device", default=None)
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--out", default="runs/eval/fid.json")
    fid.add_argument("--tokenizer-mismatch-ok", action="store_true",
                     help="decode --generator's samples with its tokenizer path even if that file is not the "
                          "one it was trained with (another sha256)")
    _precision_option(fid)
    fid.set_defaults(func=_eval_fid)

    ref = commands.add_parser("ref-stats", help="gFID reference statistics of a split, as a reusable .npz")
    ref.add_argument("--data", required=True, help="the real images' index.json")
    ref.add_argument("--split", default="train")
    ref.add_argument("--images", type=int, default=0,
                     help="a seeded class-balanced subset of this many images; 0 (default): the whole split")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--inception", default=None, help="torch-fidelity InceptionV3 weights (default: converted)")
    ref.add_argument("--device", default=None)
    ref.add_argument("--out", required=True, help="the .npz to write (mu, sigma: ADM's keys)")
    ref.set_defaults(func=_ref_stats)

    tokens = commands.add_parser("token-metrics", help="per-position entropies of a tokenizer's tokens (AR model)")
    tokens.add_argument("--generator", required=True, help="an AR stage-2 checkpoint")
    tokens.add_argument("--data", default=None, help="token shards' index.json (needed: a checkpoint's stored "
                                                     "data.index is not read on its own)")
    tokens.add_argument("--split", default="val")
    tokens.add_argument("--out", default="runs/eval/token_metrics")
    tokens.set_defaults(func=_token_metrics)

    compare = commands.add_parser("compare", help="NativeTok vs parallel vs causal-mask tokens, same generator")
    compare.add_argument("--preset", default="default", help="experiments/compare/<name>.yaml, or a path")
    compare.add_argument("--out", default="runs/compare")
    compare.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    compare.set_defaults(func=_compare)

    ablate = commands.add_parser("ablate", help="tokenizer variants x seeds: prefix PSNR, mean ± sd, 2-SE verdicts")
    ablate.add_argument("--preset", default="hnt", help="experiments/ablation/<name>.yaml, or a path")
    ablate.add_argument("--out", default="runs/ablation")
    ablate.set_defaults(func=_ablate)

    from nativetok.cluster.slurm import PLACEHOLDERS, TIME_FORMATS

    submit = commands.add_parser(
        "submit", help="render the sbatch script of a training run and submit it",
        description="Check the experiment and every file the job reads (data index and shards, weights, "
                    "checkpoints, --venv), then render the sbatch script and submit it. Example: nativetok submit "
                    "imagenet256_nativetok_l32 --nodes 2 --time 2-00:00:00 --sbatch=--qos=high "
                    "--sbatch constraint=a100 --setup 'module load cuda/12.1'")
    _experiment_arguments(submit)
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus", type=int, default=8, help="GPUs per node (one task each)")
    submit.add_argument("--cpus-per-task", type=int, default=8)
    submit.add_argument("--time", default="24:00:00",
                        help=f"time limit, as sbatch reads it: {TIME_FORMATS} (e.g. 90, 36:00:00, 2-00:00:00); "
                             "at least 2 minutes. Default 24:00:00")
    submit.add_argument("--partition", default=None)
    submit.add_argument("--account", default=None)
    submit.add_argument("--sbatch", action="append", default=[], metavar="LINE",
                        help="an extra #SBATCH LINE (repeatable): --sbatch=--qos=high, --sbatch 'mem=0', "
                             "--sbatch constraint=a100 (leading -- added when missing)")
    submit.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line run before the venv is activated (repeatable), e.g. 'module load cuda/12.1'")
    submit.add_argument("--template", type=Path, default=None, metavar="FILE",
                        help="a site's copy of src/nativetok/cluster/sbatch.template; placeholders: "
                             + ", ".join(f"${{{name}}}" for name in PLACEHOLDERS) + " (${command} required)")
    submit.add_argument("--venv", default=".venv", help="virtual environment the job activates")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the script instead of submitting it (missing inputs are only warned about)")
    submit.set_defaults(func=_submit)

    export = commands.add_parser("export", help="a checkpoint as a folder to share: model.safetensors (EMA weights "
                                 "when present), config.json and a README.md model card")
    export.add_argument("checkpoint", help="a tokenizer or generator checkpoint (runs/<name>/checkpoints/last.ckpt)")
    export.add_argument("out", help="the folder to write: new or empty (an earlier export there only with --force)")
    export.add_argument("--tokenizer", default=None,
                        help="generators: the tokenizer to bundle in OUT/tokenizer, sha256 checked against the pin "
                             "(default: the pinned one)")
    export.add_argument("--no-tokenizer", action="store_true", help="generators: do not bundle the tokenizer")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier export in OUT (a folder holding anything else is never replaced)")
    export.set_defaults(func=_export)

    config = commands.add_parser("config", help="print the resolved, checked config of an experiment",
                                 epilog=experiments, formatter_class=argparse.RawDescriptionHelpFormatter)
    _experiment_arguments(config)
    config.set_defaults(func=_config)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from nativetok.checkpoints import CheckpointError
    from nativetok.config import ConfigError
    from nativetok.data.stream import DataError
    from nativetok.lit.guards import NonFiniteLossError

    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError, OSError, ValueError) as error:
        if args.verbose:
            raise
        print(f"nativetok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nativetok {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
