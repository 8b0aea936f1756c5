"""`nativetok export`: a checkpoint as model.safetensors + config.json + README.md that the loaders take, giving
the very ids and images the checkpoint gives, under the same checks (as a Hub repo id: tests/test_hub.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nativetok import load_generator, load_tokenizer
from nativetok.checkpoints import CheckpointError, file_sha256, load_generator_tokenizer
from nativetok.cli import main
from nativetok.data import DatasetIndex
from nativetok.data.shards import Manifest
from nativetok.eval.samples import SAMPLE_MANIFEST
from nativetok.pipelines.export import export

from .conftest import trained_tokenizer_and_generator

LABELS = torch.tensor([0, 3, 7])


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_index):
    """A tokenizer and an AR generator pinned to it, both with moving averages and trained two steps, and
    their exports written by the CLI."""
    root = tmp_path_factory.mktemp("export")
    tokenizer, generator = trained_tokenizer_and_generator(root, fmnist_index)
    assert main(["export", str(tokenizer), str(root / "tok_export")]) == 0
    assert main(["export", str(generator), str(root / "gen_export")]) == 0
    return {"root": root, "tok": tokenizer, "gen": generator, "tok_export": root / "tok_export",
            "gen_export": root / "gen_export"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_exports_give_the_checkpoints_ids_and_images_and_are_named_by_them(run, images, tmp_path):
    tok_export, gen_export = run["tok_export"], run["gen_export"]
    assert sorted(p.name for p in tok_export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (gen_export / "tokenizer" / "model.safetensors").is_file()

    # The moving average is what is exported (it differs from the trained weights after two steps).
    saved = torch.load(run["tok"], map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(tok_export / "model.safetensors")
    assert all(torch.equal(t, saved[f"ema.shadow.{k}"]) for k, t in exported.items())
    assert any(not torch.equal(t, saved[f"tokenizer.{k}"]) for k, t in exported.items())

    original, loaded = load_tokenizer(run["tok"]), load_tokenizer(tok_export)
    ids = original.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), original.decode(ids))
    sampled = load_generator(run["gen"]).sample(LABELS, seed=3)
    assert torch.equal(load_generator(gen_export).sample(LABELS, seed=3), sampled)
    bundled, path = load_generator_tokenizer(gen_export)
    assert path == (gen_export / "tokenizer").resolve()
    assert torch.equal(bundled.decode(ids), original.decode(ids))

    # Named by the checkpoint it came from: the generator's pin and `sample`'s manifest hold the same sha256.
    assert file_sha256(tok_export) == file_sha256(gen_export / "tokenizer") == file_sha256(run["tok"])
    assert file_sha256(gen_export) == file_sha256(run["gen"])
    assert main(["sample", "--generator", str(gen_export), "--out", str(tmp_path / "s"), "--classes", "0",
                 "--per-class", "2", "--device", "cpu"]) == 0
    inputs = Manifest.load(tmp_path / "s", SAMPLE_MANIFEST).inputs
    assert inputs["tokenizer_sha256"] == file_sha256(run["tok"])
    assert inputs["generator_sha256"] == file_sha256(run["gen"])

    assert folder_bytes(tok_export) < run["tok"].stat().st_size / 2  # no optimizer state, one set of weights


def test_the_model_card_holds_what_the_run_recorded_and_says_what_it_did_not(run):
    checkpoint = torch.load(run["tok"], map_location="cpu", weights_only=True)
    best = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    card = (run["tok_export"] / "README.md").read_text()
    meta = json.loads((run["tok_export"] / "config.json").read_text())["nativetok"]
    assert card.startswith("---\nlibrary_name: nativetok\n")
    assert f"| steps | {checkpoint['global_step']} (of trainer.max_steps 2) |" in card
    assert f"Best val/loss of the run: {float(best['best_model_score']):.4g}" in card
    assert meta["metrics"]["validation"]["values"]["val/loss"] == pytest.approx(float(best["best_model_score"]))
    classes = DatasetIndex.load(Path(checkpoint["hyper_parameters"]["config"]["data"]["index"])).classes
    assert meta["data"]["classes"] == classes and f"0 {classes[0]}" in card
    assert "moving average (decay 0.5)" in card and 'NativeTokenizer.from_pretrained("path/to/this/folder")' in card

    gen_card = (run["gen_export"] / "README.md").read_text()
    assert "Validation metrics: not recorded" in gen_card and "Best validation score: not recorded" in gen_card
    assert "names not recorded" in gen_card and "index not on the exporting machine" in gen_card
    assert f"sha256 `{file_sha256(run['tok'])}`" in gen_card and "Bundled in `tokenizer/`" in gen_card


def test_damaged_mismatched_and_misused_exports_are_refused(run, tmp_path, capsys):
    tok, gen = tmp_path / "tok", tmp_path / "gen"
    shutil.copytree(run["tok_export"], tok)
    shutil.copytree(run["gen_export"], gen)
    with pytest.raises(CheckpointError, match="is an exported tokenizer, not a generator"):
        load_generator(tok)
    with pytest.raises(CheckpointError, match="holds only its moving-average weights"):
        load_tokenizer(tok, ema=False)

    # Another tokenizer exported into the generator's tokenizer/ (a codebook rolled by one): refused by the pin
    # (the bytes of its weights), and never passed over for a file outside the export.
    checkpoint = torch.load(run["tok"], map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.endswith("quantizer.codebook"):
            checkpoint["state_dict"][key] = torch.roll(value, 1, dims=0)
    torch.save(checkpoint, tmp_path / "other.ckpt")
    export(tmp_path / "other.ckpt", gen / "tokenizer", force=True)  # replaces the earlier export there
    with pytest.raises(CheckpointError, match="was trained with sha256"):
        load_generator_tokenizer(gen, tokenizer_path=str(gen / "tokenizer"))
    with pytest.raises(CheckpointError, match="was trained with sha256"):
        load_generator_tokenizer(gen)
    assert load_generator_tokenizer(gen, tokenizer_path=str(run["tok"]))[1] == run["tok"]

    # Weights replaced after export: refused by the sha256 beside them.
    weights = load_file(tok / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(tok / "model.safetensors"))
    with pytest.raises(CheckpointError, match="replaced or damaged since export"):
        load_tokenizer(tok)
    shutil.copyfile(run["tok_export"] / "model.safetensors", tok / "model.safetensors")
    load_tokenizer(tok)

    # A config that does not build these weights' shapes.
    body = json.loads((tok / "config.json").read_text())
    body["config"]["tokenizer"]["mit"]["width"] = 64
    (tok / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="weights do not fit its config"):
        load_tokenizer(tok)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(run["tok"]), str(tmp_path / "mine")]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
