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
    if config.stage == "tokenizer":
        from nativetok.lit.train import train_tokenizer

        train_tokenizer(config)


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
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"nativetok {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
