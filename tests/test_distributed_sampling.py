"""`nativetok sample` on several CPU processes (gloo): torchrun and srun-style launches write the same images,
PNG for PNG, as one process, and an ADM-style `samples.npz` (`arr_0`, uint8 NHWC RGB) in image order."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nativetok.checkpoints import tokenizer_pin
from nativetok.config import load_config
from nativetok.config.loading import to_container
from nativetok.eval.samples import check_sample_folder
from nativetok.models import build_generator
from nativetok.models.tokenizer import build_tokenizer

from .conftest import REPO, TINY, tiny_generator_config

SRC = str(REPO / "src")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# 3 classes x 3 = 9 images in 5 batches of 2 (the last one short): rank 0 draws 3 batches, rank 1 two.
ARGS = ["--classes", "0", "1", "2", "--per-class", "3", "--batch-size", "2", "--seed", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory, fmnist_index) -> Path:
    """A randomly initialised tiny AR generator pinned to a randomly initialised tiny tokenizer (no training)."""
    root = tmp_path_factory.mktemp("distributed_sampling")
    torch.manual_seed(0)
    config = load_config(REPO / "experiments" / "fmnist_tiny.yaml",
                         TINY + [f"data.index={fmnist_index}", f"run.dir={root / 'tok'}"])
    tokenizer = build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels)
    torch.save({"nativetok": {"kind": "tokenizer"}, "hyper_parameters": {"config": to_container(config)},
                "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}}, root / "tok.ckpt")
    config = tiny_generator_config(root / "gen", "ar", f"generator.tokenizer={root / 'tok.ckpt'}")
    model = build_generator(config.generator, config.data.num_classes)
    torch.save({"nativetok": {"kind": "generator", "tokenizer": tokenizer_pin(root / "tok.ckpt", root / "gen")},
                "hyper_parameters": {"config": to_container(config)},
                "state_dict": {f"generator.{k}": v for k, v in model.state_dict().items()}}, root / "gen.ckpt")
    return root / "gen.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without any launcher's ranks, one thread per process (the same arithmetic in each)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    return {**env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}


def check(processes: list) -> None:
    """Every process succeeded; on a failure the rest (a rank waiting at a barrier) are killed with their children."""
    try:
        for process in processes:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def sample(generator: Path, out: Path) -> list:
    return [sys.executable, "-m", "nativetok", "sample", "--generator", str(generator), "--out", str(out), *ARGS]


def popen(command: list, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=clean_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_ranks_under_torchrun_or_srun_write_the_images_of_one_process(generator, tmp_path):
    one, torchrun, srun = tmp_path / "one", tmp_path / "torchrun", tmp_path / "srun"
    port = str(free_port())
    check([
        popen(sample(generator, one), tmp_path),
        popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", *sample(generator, torchrun)[1:]], tmp_path),
        # srun's variables only (the address from SLURM's node list, as under `srun` without MASTER_ADDR), npz only
        *[popen(sample(generator, srun) + ["--format", "npz"], tmp_path, SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank), SLURM_NODELIST="localhost", MASTER_PORT=port) for rank in range(2)],
    ])

    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == [f"{i:06d}_class{i // 3:04d}.png" for i in range(9)]
    reference = np.load(one / "samples.npz")
    images, labels = reference["arr_0"], reference["labels"]
    assert images.dtype == np.uint8 and images.shape == (9, 32, 32, 3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, name in enumerate(names):  # grey PNGs, replicated to RGB in the npz
        grey = np.asarray(Image.open(one / "images" / name))
        assert grey.shape == (32, 32) and all(np.array_equal(images[i, ..., c], grey) for c in range(3))
    assert len({image.tobytes() for image in images}) == 9  # every image its own: the comparison below means something
    assert sorted(p.name for p in (torchrun / "images").iterdir()) == names
    assert all((torchrun / "images" / n).read_bytes() == (one / "images" / n).read_bytes() for n in names)
    assert sorted(p.name for p in srun.iterdir()) == ["grid.png", "samples.json", "samples.npz"]
    for folder in (torchrun, srun):
        assert (folder / "grid.png").read_bytes() == (one / "grid.png").read_bytes()
        npz = np.load(folder / "samples.npz")
        assert np.array_equal(npz["arr_0"], images) and np.array_equal(npz["labels"], labels)
        assert check_sample_folder(folder).inputs["count"] == 9
        assert not folder.with_name(folder.name + ".partial").exists()
    assert json.loads((one / "samples.json").read_text())["seed"] == 5

