"""`nativetok <command>`: parse the arguments, load the config, call one function per command."""

from __future__ import annotations

import argparse
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
        )


def _config(args: argparse.Namespace) -> None:
    from nativetok.config import load_config, to_yaml

    print(to_yaml(load_config(args.experiment, args.overrides)), end="")


def _train(args: argparse.Namespace) -> None:
    from nativetok.config import load_config

    config = load_config(args.experiment, args.overrides)
    from nativetok.lit.train import train_generator, train_tokenizer

    (train_tokenizer if config.stage == "tokenizer" else train_generator)(config)


def _tokenize(args: argparse.Namespace) -> None:
    from nativetok.data.tokens import tokenize_shards

    tokenize_shards(
        args.tokenizer, args.data, Path(args.out), splits=args.splits, batch_size=args.batch_size,
        flip=args.flip, device=args.device,
    )


def _sample(args: argparse.Namespace) -> None:
    from nativetok.eval.samples import sample_to_folder

    sample_to_folder(
        args.generator, Path(args.out), classes=args.classes, per_class=args.per_class,
        tokenizer_path=args.tokenizer, seed=args.seed, batch_size=args.batch_size, device=args.device,
        png=args.format in ("png", "both"), npz=args.format in ("npz", "both"),
        cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, steps=args.steps,
    )


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
    tokenize.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    tokenize.set_defaults(func=_tokenize)

    sample = commands.add_parser("sample", help="class-conditional samples of a generator, decoded to images")
    sample.add_argument("--generator", required=True, help="stage-2 checkpoint")
    sample.add_argument("--tokenizer", default=None, help="default: the one the generator was trained with")
    sample.add_argument("--out", required=True)
    sample.add_argument("--classes", type=int, nargs="+", default=None, help="default: every class")
    sample.add_argument("--per-class", type=int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--device", default=None)
    sample.add_argument("--format", choices=["png", "npz", "both"], default="both")
    sample.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's)")
    sample.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None)
    sample.add_argument("--temperature", type=float, default=None)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--steps", type=int, default=None, help="MaskGIT decoding steps")
    sample.set_defaults(func=_sample)

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

    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError) as error:
        if args.verbose:
            raise
        print(f"nativetok {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
