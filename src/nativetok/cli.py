"""`nativetok <command>`: parse the arguments, load the config, call one function per command.

Each command imports what it runs inside its own function, so that `nativetok --help`, `config` and a
`submit --dry-run` answer without loading Lightning, torchvision or the evaluation stack. Elsewhere in the
package an import sits inside a function only when it is optional or heavy and used by one path
(docs/architecture.md, "Imports").
"""

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
    """The resolved config; with -m, every combination's, each under a comment naming its swept values."""
    from nativetok.config import load_config, to_yaml
    from nativetok.config.loading import override_combinations

    combinations = override_combinations(args.overrides, args.multirun)
    for number, combination in enumerate(combinations):
        if args.multirun:
            swept = " ".join(f"{key}={value}" for key, value in combination.swept.items())
            print(f"# combination {number} of {len(combinations)}: {swept or 'nothing swept'}")
        print(to_yaml(load_config(args.experiment, combination.overrides)), end="")


# Exit codes of a sweep: a run failed; a run was stopped by a signal (as an interrupted command).
SWEEP_FAILED, SWEEP_STOPPED = 1, 130


def _train(args: argparse.Namespace) -> int:
    """One run; with -m a sweep of runs (exit code 1 when one failed); with --sweep-task one task of a submitted
    sweep's job array."""
    import os

    if args.sweep_task and (args.multirun or args.sweep_dir):
        raise ValueError("--sweep-task runs one task of a submitted sweep: -m and --sweep-dir do not go with it")
    if args.sweep_task:
        from nativetok.pipelines.sweep import FINISHED, STOPPED, run_task

        outcome = run_task(args.experiment, Path(args.sweep_task), args.overrides,
                           os.environ.get("SLURM_ARRAY_TASK_ID"))
        return 0 if outcome["state"] in (FINISHED, STOPPED) else SWEEP_FAILED  # a stop is requeued, not failed
    if args.multirun:
        from nativetok.pipelines.sweep import FAILED, STOPPED, run_sweep, summary_table

        rows = run_sweep(args.experiment, args.overrides, args.sweep_dir and Path(args.sweep_dir))
        print(summary_table(rows), end="")
        states = {row["state"] for row in rows}
        return SWEEP_STOPPED if STOPPED in states else SWEEP_FAILED if FAILED in states else 0
    if args.sweep_dir:
        raise ValueError("--sweep-dir is the folder of a sweep: give -m (--multirun) too")
    from nativetok.config import load_config
    from nativetok.config.loading import override_combinations

    config = load_config(args.experiment, override_combinations(args.overrides, multirun=False)[0].overrides)
    from nativetok.lit.train import train_generator, train_tokenizer

    (train_tokenizer if config.stage == "tokenizer" else train_generator)(config)
    return 0


def _runs(args: argparse.Namespace) -> None:
    from nativetok.pipelines.sweep import summarize, summary_table

    print(summary_table(summarize(Path(args.sweep_dir))), end="")


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


def _hub_revision_option(parser: argparse.ArgumentParser, flag: str, model: str) -> None:
    parser.add_argument(flag, default=None, metavar="REV",
                        help=f"when {model} is a Hugging Face Hub repo id (owner/name): its branch, tag or commit "
                             "(default main; a commit pins the version)")


def _tokenize(args: argparse.Namespace) -> None:
    from nativetok.pipelines.tokenize import tokenize_shards

    tokenize_shards(
        args.tokenizer, args.data, Path(args.out), splits=args.splits, batch_size=args.batch_size, flip=args.flip,
        device=args.device, precision=args.precision, force=args.force, revision=args.revision,
    )


# `nativetok sample`'s options that override the generator's sampling.* settings, by field.
SAMPLING_OPTIONS = {
    "cfg_scale": "--cfg", "cfg_schedule": "--cfg-schedule", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "steps": "--steps",
}


def _sample(args: argparse.Namespace) -> None:
    from nativetok.config.checks import check_sampling_options
    from nativetok.pipelines.sample import sample_to_folder

    sampling = {field: getattr(args, option[2:].replace("-", "_")) for field, option in SAMPLING_OPTIONS.items()}
    check_sampling_options(sampling, SAMPLING_OPTIONS)
    sample_to_folder(
        args.generator, Path(args.out), classes=args.classes, per_class=args.per_class, revision=args.revision,
        tokenizer_path=args.tokenizer, tokenizer_revision=args.tokenizer_revision, seed=args.seed,
        batch_size=args.batch_size, device=args.device,
        png=args.format in ("png", "both"), npz=args.format in ("npz", "both"), precision=args.precision,
        tokenizer_mismatch_ok=args.tokenizer_mismatch_ok, **sampling,
    )


def _eval_fid(args: argparse.Namespace) -> None:
    from nativetok.eval.fid import evaluate_fid

    evaluate_fid(
        tokenizer_path=args.tokenizer, tokenizer_revision=args.tokenizer_revision, generator_path=args.generator,
        generator_revision=args.generator_revision, samples=args.samples, num=args.num,
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
    from nativetok.pipelines.compare import compare, default_lanes

    compare(args.preset, Path(args.out), seeds=args.seeds, jobs=args.jobs or default_lanes())


def _export(args: argparse.Namespace) -> None:
    from nativetok.pipelines.export import DEFAULT_LICENSE, export

    print(export(args.checkpoint, Path(args.out), tokenizer=args.tokenizer, include_tokenizer=not args.no_tokenizer,
                 force=args.force, license=args.license or DEFAULT_LICENSE))


def _push(args: argparse.Namespace) -> None:
    from nativetok.pipelines.export import push_to_hub

    commit = push_to_hub(args.source, args.repo_id, revision=args.revision, private=args.private or None,
                         commit_message=args.message)
    print(commit.commit_url)
    print(f"load this version with revision {commit.oid}")


def _ablate(args: argparse.Namespace) -> None:
    from nativetok.pipelines.ablation import ablate

    ablate(args.preset, Path(args.out))


def _submit(args: argparse.Namespace) -> None:
    """One job; with -m one job array, a task per combination (--max-concurrent of them at once)."""
    from nativetok.cluster.slurm import Resources, Site, submit, submit_sweep
    from nativetok.config.loading import override_combinations, resolve_experiment

    resources = Resources(args.nodes, args.gpus, args.cpus_per_task, args.time, args.partition, args.account)
    site = Site(args.sbatch, args.setup, args.template)
    experiment = str(resolve_experiment(args.experiment))  # the job script names the file, not the name
    if args.multirun:
        job = submit_sweep(experiment, args.overrides, resources, args.sweep_dir and Path(args.sweep_dir),
                           venv=Path(args.venv), dry_run=args.dry_run, site=site, max_concurrent=args.max_concurrent)
    elif args.sweep_dir or args.max_concurrent:
        raise ValueError("--sweep-dir and --max-concurrent are options of a sweep: give -m (--multirun) too")
    else:
        overrides = override_combinations(args.overrides, multirun=False)[0].overrides
        job = submit(experiment, overrides, resources, venv=Path(args.venv), dry_run=args.dry_run, site=site)
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
OVERRIDES_HELP = ("group=name (or +group=name) merges experiments/<group>/<name>.yaml (e.g. trainer=gpu), then "
                  "key=value, e.g. trainer.max_steps=200 data.batch_size=64; they may stand before or after options")
MULTIRUN_HELP = ("a sweep over every combination of comma-separated values (seed=0,1,2 optim.lr=1e-4,3e-4: 6 runs); "
                 "one value holding commas is quoted (run.name='a,b') or a list (optim.betas=[0.9,0.95])")


def _experiments_epilog() -> str:
    """The experiment names and presets this directory offers, for --help."""
    from nativetok.config.loading import available_experiments, preset_groups

    names = ", ".join(available_experiments()) or "none found under ./experiments or the repository"
    lines = [textwrap.fill(f"experiments: {names}", width=100, subsequent_indent="  ", break_on_hyphens=False)]
    lines += [f"presets: +{group}={'|'.join(files)}" for group, files in preset_groups().items() if files]
    return "\n".join(lines) + "\n"


def _experiment_arguments(command: argparse.ArgumentParser, sweep: str) -> None:
    """The experiment and its overrides (anywhere among the options: see `main`), and -m for `sweep`."""
    command.add_argument("experiment", help=EXPERIMENT_HELP)
    command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    command.add_argument("-m", "--multirun", action="store_true", help=f"{sweep}: {MULTIRUN_HELP}")


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
    _experiment_arguments(train, "train every combination, one after another, each in <sweep dir>/<n>; a summary "
                                 "table of their final validation metrics at the end (exit code 1 if one failed)")
    train.add_argument("--sweep-dir", default=None, metavar="DIR",
                       help="the sweep folder (default runs/multirun/<experiment>/<date>_<time>); the same folder "
                            "again continues that sweep")
    train.add_argument("--sweep-task", default=None, metavar="DIR",
                       help="run one task of a sweep submitted as a job array: the combination numbered "
                            "$SLURM_ARRAY_TASK_ID in DIR/sweep.json (overrides given here apply after its own)")
    train.set_defaults(func=_train)

    tokenize = commands.add_parser("tokenize", help="encode image shards into token shards with a tokenizer")
    tokenize.add_argument("--tokenizer", required=True,
                          help="a checkpoint, an export folder or a Hugging Face Hub repo id (owner/name)")
    _hub_revision_option(tokenize, "--revision", "--tokenizer")
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
    sample.add_argument("--generator", required=True,
                        help="a checkpoint, an export folder or a Hugging Face Hub repo id (owner/name)")
    _hub_revision_option(sample, "--revision", "--generator")
    sample.add_argument("--tokenizer", default=None, help="default: the one the generator was trained with")
    _hub_revision_option(sample, "--tokenizer-revision", "--tokenizer")
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
    fid.add_argument("--tokenizer", default=None, help="stage-1 checkpoint, export or Hub repo id: reconstruction FID")
    _hub_revision_option(fid, "--tokenizer-revision", "--tokenizer")
    fid.add_argument("--generator", default=None,
                     help="stage-2 checkpoint, export or Hub repo id: generation FID of its samples")
    _hub_revision_option(fid, "--generator-revision", "--generator")
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

    compare = commands.add_parser("compare", help="the token-order study of docs/study.md: NativeTok vs parallel "
                                  "tokens and the order controls")
    compare.add_argument("--preset", default="default", help="experiments/compare/<name>.yaml, or a path")
    compare.add_argument("--out", default="runs/compare")
    compare.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    compare.add_argument("--jobs", type=int, default=None,
                         help="cells computed at once, each in a process with its share of the CPU threads "
                              "(default: one per CPU core up to 4; 1 on a GPU)")
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
    _experiment_arguments(submit, "one job array, a task per combination, each task's overrides read from "
                                  "<sweep dir>/sweep.json beside the script by its $SLURM_ARRAY_TASK_ID")
    submit.add_argument("--sweep-dir", default=None, metavar="DIR",
                        help="with -m: the sweep folder (default runs/multirun/<experiment>/<date>_<time>)")
    submit.add_argument("--max-concurrent", type=_positive_int, default=None, metavar="M",
                        help="with -m: at most M tasks of the array run at once (#SBATCH --array=0-N%%M)")
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
    export.add_argument("--license", default=None,
                        help="the Hub license id the model card shares the weights under (default: apache-2.0, "
                             "NativeTok's own)")
    export.set_defaults(func=_export)

    push = commands.add_parser(
        "push", help="upload an export to a Hugging Face Hub model repo",
        description="Load SOURCE as every loader does (config, weights' sha256, bundled tokenizer's pin), then "
                    "upload its export files in one commit. The token is huggingface_hub's: HF_TOKEN or "
                    "`hf auth login`. Example: nativetok push exports/fmnist_tiny someone/fmnist-tiny --revision v1")
    push.add_argument("source", help="an export folder, or a checkpoint (exported with the defaults first)")
    push.add_argument("repo_id", help="owner/name; created when new")
    push.add_argument("--revision", default=None, metavar="BRANCH",
                      help="the branch to commit to, created from main when new (default main)")
    push.add_argument("--private", action="store_true", help="create a new repo as private")
    push.add_argument("--message", default=None, help="the commit message (default: kind and source sha256)")
    push.set_defaults(func=_push)

    config = commands.add_parser("config", help="print the resolved, checked config of an experiment",
                                 epilog=experiments, formatter_class=argparse.RawDescriptionHelpFormatter)
    _experiment_arguments(config, "print every combination's config")
    config.set_defaults(func=_config)

    runs = commands.add_parser("runs", help="the table of a sweep's runs: state, swept values, final validation "
                                            "metrics (also for a sweep whose tasks ran under SLURM)")
    runs.add_argument("sweep_dir", help="a sweep folder (holding sweep.json), e.g. runs/multirun/fmnist_tiny/<date>")
    runs.set_defaults(func=_runs)
    return parser


# Commands whose `key=value` overrides may stand anywhere among their options.
OVERRIDE_COMMANDS = ("train", "submit", "config")


def parse_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The arguments, with the overrides of train, submit and config taken wherever they stand (`submit EXP
    --nodes 2 optim.lr=1e-4`): what follows an option is left over by argparse and joins them, in order. Anything
    else left over (an unknown --option) is refused as argparse would."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("-") or args.command not in OVERRIDE_COMMANDS]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_arguments(argv)
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
        code = args.func(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError, OSError, ValueError) as error:
        if args.verbose:
            raise
        print(f"nativetok {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nativetok {args.command}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
