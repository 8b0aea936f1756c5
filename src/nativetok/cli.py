"""`nativetok <command>`: parse the arguments, load the config, call one function per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
        )


def _config(args: argparse.Namespace) -> None:
    from nativetok.config import load_config, to_yaml

    print(to_yaml(load_config(args.experiment, args.overrides)), end="")


def _bench(args: argparse.Namespace) -> None:
    if args.device == "cpu":
        from nativetok.bench import main as bench_main

        bench_main(["--out", args.out or "runs/bench/bench.json"] + (["--quick"] if args.quick else []))
    else:
        from nativetok.bench_gpu import main as bench_gpu_main

        bench_gpu_main(["--device", args.device, "--out", args.out or "runs/bench/bench_gpu.json"]
                       + (["--quick"] if args.quick else []))


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
    from nativetok.data.tokens import tokenize_shards

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
    from nativetok.eval.samples import sample_to_folder

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
        tokenizer_mismatch_ok=args.tokenizer_mismatch_ok,
    )


def _token_metrics(args: argparse.Namespace) -> None:
    from nativetok.eval.token_metrics import token_metrics

    report = token_metrics(args.generator, Path(args.out), split=args.split, data=args.data)
    print(json.dumps(report["total"], indent=1))


def _compare(args: argparse.Namespace) -> None:
    from nativetok.eval.compare import compare

    compare(args.preset, Path(args.out), seed=args.seed)


def _submit(args: argparse.Namespace) -> None:
    from nativetok.cluster.slurm import Resources, submit

    resources = Resources(args.nodes, args.gpus, args.cpus_per_task, args.time, args.partition, args.account)
    job = submit(args.experiment, args.overrides, resources, venv=Path(args.venv), dry_run=args.dry_run)
    if job:
        print(job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nativetok", description=__doc__)
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
    shard.set_defaults(func=_shard)

    train = commands.add_parser("train", help="train the stage an experiment file describes")
    train.add_argument("experiment", help="experiments/<name>.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. trainer.max_steps=200 data.batch_size=64")
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

    sample = commands.add_parser("sample", help="class-conditional samples of a generator, decoded to images")
    sample.add_argument("--generator", required=True, help="stage-2 checkpoint")
    sample.add_argument("--tokenizer", default=None, help="default: the one the generator was trained with")
    sample.add_argument("--out", required=True)
    sample.add_argument("--classes", type=int, nargs="+", default=None, help="default: every class")
    sample.add_argument("--per-class", type=_positive_int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=_positive_int, default=64)
    sample.add_argument("--device", default=None)
    sample.add_argument("--format", choices=["png", "npz", "both"], default="both")
    sample.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's)")
    sample.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None)
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
    fid.add_argument("--num", type=int, default=1000, help="images on each side")
    fid.add_argument("--data", default=None, help="real images' index.json (default: the tokenizer's data)")
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

    tokens = commands.add_parser("token-metrics", help="per-position entropies of a tokenizer's tokens (AR model)")
    tokens.add_argument("--generator", required=True, help="an AR stage-2 checkpoint")
    tokens.add_argument("--data", default=None, help="token shards' index.json (default: the generator's)")
    tokens.add_argument("--split", default="val")
    tokens.add_argument("--out", default="runs/eval/token_metrics")
    tokens.set_defaults(func=_token_metrics)

    compare = commands.add_parser("compare", help="NativeTok vs parallel vs causal-mask tokens, same generator")
    compare.add_argument("--preset", default="default", help="experiments/compare/<name>.yaml, or a path")
    compare.add_argument("--out", default="runs/compare")
    compare.add_argument("--seed", type=int, default=0)
    compare.set_defaults(func=_compare)

    submit = commands.add_parser("submit", help="render the sbatch script of a training run and submit it")
    submit.add_argument("experiment")
    submit.add_argument("overrides", nargs="*", help="key=value")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus", type=int, default=8, help="GPUs per node (one task each)")
    submit.add_argument("--cpus-per-task", type=int, default=8)
    submit.add_argument("--time", default="24:00:00")
    submit.add_argument("--partition", default=None)
    submit.add_argument("--account", default=None)
    submit.add_argument("--venv", default=".venv", help="virtual environment the job activates")
    submit.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    submit.set_defaults(func=_submit)

    bench = commands.add_parser("bench", help="speed and memory as ratios measured in one run (CPU or GPU table)")
    bench.add_argument("--device", default="cpu", help="cpu: `make bench`; cuda: `make bench-gpu`")
    bench.add_argument("--out", default=None, help="JSON file (a .md table beside it); default runs/bench/")
    bench.add_argument("--quick", action="store_true", help="tiny shapes only")
    bench.set_defaults(func=_bench)

    config = commands.add_parser("config", help="print the resolved, checked config of an experiment")
    config.add_argument("experiment")
    config.add_argument("overrides", nargs="*", help="key=value")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
