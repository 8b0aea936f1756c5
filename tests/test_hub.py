"""The Hugging Face Hub round trip, without a network: `export` (save_pretrained) -> `push_to_hub` against an
in-memory stand-in of HfApi -> the Hub's cache as `snapshot_download` lays it out -> the loaders and the
commands given `owner/name` and a revision, under the same checks as an exported folder."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Dict, Iterable

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from nativetok import Generator, NativeTokenizer, load_generator, load_tokenizer
from nativetok.checkpoints import (
    HUB_FILES,
    CheckpointError,
    file_sha256,
    load_generator_tokenizer,
    read_checkpoint,
    tokenizer_config,
)
from nativetok.cli import main
from nativetok.data import DatasetIndex
from nativetok.data.shards import Manifest, ShardEntry, SplitIndex, shard_name, write_shard
from nativetok.data.tokens import decode_ids
from nativetok.eval.fid import evaluate_fid
from nativetok.eval.samples import SAMPLE_MANIFEST
from nativetok.models import MaskGITGenerator, build_generator, build_tokenizer
from nativetok.pipelines.export import export, push_to_hub
from nativetok.pipelines.sample import sample_to_folder
from nativetok.pipelines.tokenize import tokenize_shards

from .conftest import trained_tokenizer_and_generator
from .test_data import read_raw

LABELS = torch.tensor([0, 3, 7])
EXPORT_FILES = ["README.md", "config.json", "model.safetensors"]
BUNDLED = EXPORT_FILES + ["tokenizer/README.md", "tokenizer/config.json", "tokenizer/model.safetensors"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, fmnist_index):
    """Tokenizer A (moving average, validated on 16 images), tokenizer B (A with its codebook rolled by one: other
    ids for the same images), an AR generator pinned to A, their exports, and a 20-image index to tokenize."""
    root = tmp_path_factory.mktemp("hub")
    tok_a, gen = trained_tokenizer_and_generator(root, fmnist_index)
    checkpoint = torch.load(tok_a, map_location="cpu", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.endswith("quantizer.codebook"):
            checkpoint["state_dict"][key] = torch.roll(value, 1, dims=0)
    torch.save(checkpoint, root / "tok_b.ckpt")
    images = root / "images"
    images.mkdir()
    index = DatasetIndex.load(fmnist_index)
    file = shard_name("mini", "val", 0)
    entry = ShardEntry(file, write_shard(images / file, read_raw(Path(index.shard_paths("val")[0]))[:20]))
    DatasetIndex("mini", index.image_size, index.channels, index.classes, {"val": SplitIndex([entry])},
                 root=images).save(images)
    return {"tok_a": tok_a, "tok_b": root / "tok_b.ckpt", "gen": gen, "images": images / "index.json",
            "tok_a_export": export(tok_a, root / "tok_a_export"), "tok_b_export": export(root / "tok_b.ckpt",
                                                                                        root / "tok_b_export"),
            "gen_export": export(gen, root / "gen_export")}


def folder_files(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class StandInHub:
    """HfApi as the Hub answers it, in memory: model repos of branches of files, one commit per upload_folder
    (allow_patterns and delete_patterns filtered by huggingface_hub's own matcher), every call recorded."""

    def __init__(self):
        self.calls: list = []
        self.branches: Dict[tuple, Dict[str, bytes]] = {}
        self.commits: Dict[str, Dict[str, bytes]] = {}

    def __call__(self, token=None):  # stands in for the HfApi class
        self.calls.append(("HfApi", token))
        return self

    def create_repo(self, repo_id, *, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        self.branches.setdefault((repo_id, "main"), {})

    def create_branch(self, repo_id, *, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))
        self.branches.setdefault((repo_id, branch), dict(self.branches[(repo_id, "main")]))

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, allow_patterns=None,
                      delete_patterns=None):
        files = self.branches[(repo_id, revision or "main")]
        local = folder_files(Path(folder_path))
        sent = sorted(filter_repo_objects(local, allow_patterns=allow_patterns))
        for path in list(filter_repo_objects(list(files), allow_patterns=delete_patterns)) if delete_patterns else []:
            files.pop(path)
        files.update({path: local[path] for path in sent})
        oid = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items()))
                           .encode()).hexdigest()
        self.commits[oid] = dict(files)
        self.calls.append(("upload_folder", repo_id, revision, commit_message, sent))
        return types.SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")


def cache_commit(repo_id: str, files: Dict[str, bytes], refs: Iterable[str] = ()) -> str:
    """`files` as a commit of `repo_id` in the Hub's cache, laid out as snapshot_download leaves it (blobs named by
    content, snapshot files linking to them, refs naming commits); returns the commit hash."""
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items()))
                          .encode()).hexdigest()
    for path, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No network: the Hub's home and cache under tmp_path, offline mode, snapshot_download limited to the cache
    (its asked arguments recorded), HfApi replaced by a StandInHub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real, asked = huggingface_hub.snapshot_download, []

    def cached_snapshot(repo_id, **options):
        asked.append({"repo_id": repo_id, **options})
        return real(repo_id, local_files_only=True, **options)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_snapshot)
    hub = StandInHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    monkeypatch.chdir(tmp_path)  # the repo ids below are no paths here
    return types.SimpleNamespace(asked=asked, hub=hub)


def test_push_then_load_by_repo_id_gives_the_checkpoints_weights_and_outputs(run, images, offline_hub):
    commit = push_to_hub(run["gen_export"], "someone/tiny-gen", revision="v1")
    hub = offline_hub.hub
    assert hub.calls[1:] == [
        ("create_repo", "someone/tiny-gen", None, True), ("create_branch", "someone/tiny-gen", "v1", True),
        ("upload_folder", "someone/tiny-gen", "v1", hub.calls[-1][3], BUNDLED)]
    assert file_sha256(run["gen"])[:12] in hub.calls[-1][3]  # the default message names the checkpoint
    assert hub.branches[("someone/tiny-gen", "main")] == {}  # the branch got the commit, main did not
    cache_commit("someone/tiny-gen", hub.commits[commit.oid], refs=["v1"])

    exported = load_file(run["gen_export"] / "model.safetensors")
    pulled = load_generator("someone/tiny-gen", revision=commit.oid)
    assert all(torch.equal(pulled.state_dict()[k], v) for k, v in exported.items())
    assert torch.equal(load_generator("someone/tiny-gen", revision="v1").sample(LABELS, seed=2),
                       load_generator(run["gen"]).sample(LABELS, seed=2))
    tokenizer, path = load_generator_tokenizer("someone/tiny-gen", revision="v1")
    ids = load_tokenizer(run["tok_a"]).encode(images)
    assert torch.equal(tokenizer.encode(images), ids)
    assert torch.equal(tokenizer.decode(ids), load_tokenizer(run["tok_a"]).decode(ids))
    assert path.parent.name == commit.oid and path.name == "tokenizer"  # the snapshot's own, nothing else
    assert offline_hub.asked[0] == {"repo_id": "someone/tiny-gen", "revision": commit.oid,
                                    "allow_patterns": list(HUB_FILES)}
    assert [a["revision"] for a in offline_hub.asked] == [commit.oid, "v1", "v1"]


def test_a_revision_picks_its_commit_and_a_missing_one_or_a_path_is_refused(run, images, offline_hub):
    v1 = cache_commit("someone/tiny-tok", folder_files(run["tok_a_export"]), refs=["v1"])
    cache_commit("someone/tiny-tok", folder_files(run["tok_b_export"]), refs=["main"])
    ids_a, ids_b = load_tokenizer(run["tok_a"]).encode(images), load_tokenizer(run["tok_b"]).encode(images)
    assert not torch.equal(ids_a, ids_b)
    assert torch.equal(load_tokenizer("someone/tiny-tok", revision="v1").encode(images), ids_a)
    assert torch.equal(load_tokenizer("someone/tiny-tok", revision=v1).encode(images), ids_a)
    assert torch.equal(load_tokenizer("someone/tiny-tok").encode(images), ids_b)
    assert [a["revision"] for a in offline_hub.asked] == ["v1", v1, None]

    with pytest.raises(CheckpointError, match="could be downloaded at revision v9"):
        load_tokenizer("someone/tiny-tok", revision="v9")
    with pytest.raises(CheckpointError, match="names a version of a Hugging Face Hub repo, but .* is a path here"):
        load_tokenizer(run["tok_a_export"], revision="v1")
    with pytest.raises(CheckpointError, match="checkpoint not found: runs/last.ckpt$"):  # a file, not a repo id
        load_tokenizer("runs/last.ckpt")
    assert main(["tokenize", "--tokenizer", str(run["tok_a"]), "--revision", "v1", "--out", "t"]) == 2


def test_tampered_snapshots_are_refused_as_tampered_folders_are(run, offline_hub):
    gen = folder_files(run["gen_export"])
    other = folder_files(run["tok_b_export"])

    swapped_weights = {**gen, "model.safetensors": folder_files(run["tok_a_export"])["model.safetensors"]}
    cache_commit("someone/tiny-gen", swapped_weights, refs=["weights"])
    with pytest.raises(CheckpointError, match="replaced or damaged since export"):
        load_generator("someone/tiny-gen", revision="weights")

    # Another tokenizer in tokenizer/, its config.json claiming the pinned checkpoint: refused by its weights' bytes.
    claimed = json.loads(other["config.json"])
    claimed["nativetok"]["source"]["sha256"] = file_sha256(run["tok_a"])
    swapped_tokenizer = {**gen, "tokenizer/config.json": json.dumps(claimed).encode(),
                         "tokenizer/model.safetensors": other["model.safetensors"]}
    cache_commit("someone/tiny-gen", swapped_tokenizer, refs=["tokenizer"])
    load_generator("someone/tiny-gen", revision="tokenizer")  # the generator itself is intact
    with pytest.raises(CheckpointError, match="was trained with sha256"):
        load_generator_tokenizer("someone/tiny-gen", revision="tokenizer")

    # A pin leading out of the snapshot, into another commit's tokenizer in the same cache.
    body = json.loads(gen["config.json"])
    body["nativetok"]["tokenizer"]["run_path"] = "../../../models--someone--tiny-tok/snapshots/x/tokenizer"
    cache_commit("someone/tiny-gen", {**gen, "config.json": json.dumps(body).encode()}, refs=["escape"])
    with pytest.raises(CheckpointError, match="is outside the export; refused"):
        load_generator_tokenizer("someone/tiny-gen", revision="escape")


def test_tokenize_sample_and_eval_fid_take_a_repo_id_and_record_the_snapshots_content(run, tmp_path, offline_hub,
                                                                                        capsys):
    cache_commit("someone/tiny-tok", folder_files(run["tok_a_export"]), refs=["v1"])
    cache_commit("someone/tiny-gen", folder_files(run["gen_export"]), refs=["v1"])
    args = ["--data", str(run["images"]), "--splits", "val", "--batch-size", "8", "--device", "cpu"]
    assert main(["tokenize", "--tokenizer", "someone/tiny-tok", "--revision", "v1", "--out", "hub", *args]) == 0
    assert main(["tokenize", "--tokenizer", str(run["tok_a"]), "--out", "local", *args]) == 0
    hub_index, local_index = DatasetIndex.load(Path("hub/index.json")), DatasetIndex.load(Path("local/index.json"))
    assert hub_index.tokens["tokenizer_sha256"] == local_index.tokens["tokenizer_sha256"] == file_sha256(run["tok_a"])

    def stored(index: DatasetIndex) -> list:
        return [decode_ids(s["tokens.npy"]) for path in index.shard_paths("val") for s in read_raw(Path(path))]

    assert len(stored(hub_index)) == 20
    assert all(np.array_equal(a, b) for a, b in zip(stored(hub_index), stored(local_index), strict=True))

    assert main(["sample", "--generator", "someone/tiny-gen", "--revision", "v1", "--out", "s", "--classes", "0",
                 "--per-class", "2", "--device", "cpu"]) == 0
    inputs = Manifest.load(Path("s"), SAMPLE_MANIFEST).inputs
    assert inputs["generator_sha256"] == file_sha256(run["gen"])
    assert inputs["tokenizer_sha256"] == file_sha256(run["tok_a"])

    # eval-fid reads the snapshot's stored config (and, unnamed, refuses its data.index) before any Inception work.
    capsys.readouterr()
    assert main(["eval-fid", "--tokenizer", "someone/tiny-tok", "--tokenizer-revision", "v1"]) == 2
    assert "--data is needed: the data.index stored in" in capsys.readouterr().err
    assert main(["eval-fid", "--tokenizer", "someone/tiny-tok", "--tokenizer-revision", "v9"]) == 2
    assert "at revision v9" in capsys.readouterr().err
    assert [a["revision"] for a in offline_hub.asked] == ["v1", "v1", "v1", "v9"]


def test_push_sends_only_a_loadable_exports_files(run, tmp_path, offline_hub, capsys, monkeypatch):
    hub = offline_hub.hub
    assert main(["push", str(run["tok_a"]), "someone/tiny-tok", "--private", "--message", "first"]) == 0
    assert hub.calls[1:] == [("create_repo", "someone/tiny-tok", True, True),
                             ("upload_folder", "someone/tiny-tok", None, "first", EXPORT_FILES)]
    pushed = hub.branches[("someone/tiny-tok", "main")]
    assert json.loads(pushed["config.json"])["nativetok"]["source"]["sha256"] == file_sha256(run["tok_a"])
    assert f"load this version with revision {list(hub.commits)[-1]}" in capsys.readouterr().out

    # A folder with a file no export holds, or weights replaced since export: refused before any call.
    calls = len(hub.calls)
    extra = tmp_path / "extra"
    shutil.copytree(run["tok_a_export"], extra)
    (extra / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds notes.txt, which is not an export's file"):
        push_to_hub(extra, "someone/tiny-tok")
    tampered = tmp_path / "tampered"
    shutil.copytree(run["tok_a_export"], tampered)
    shutil.copyfile(run["tok_b_export"] / "model.safetensors", tampered / "model.safetensors")
    with pytest.raises(CheckpointError, match="replaced or damaged since export"):
        push_to_hub(tampered, "someone/tiny-tok")
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub repo id"):
        push_to_hub(run["tok_a_export"], "tiny-tok")
    assert len(hub.calls) == calls

    # A generator re-pushed without its tokenizer: the branch's tokenizer/ goes in the same commit.
    push_to_hub(run["gen_export"], "someone/tiny-gen")
    bare = export(run["gen"], tmp_path / "bare", include_tokenizer=False)
    push_to_hub(bare, "someone/tiny-gen")
    assert sorted(hub.branches[("someone/tiny-gen", "main")]) == EXPORT_FILES

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointError, match=r'pip install "\.\[hub\]"'):
        push_to_hub(run["tok_a_export"], "someone/tiny-tok")
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        load_tokenizer("someone/tiny-tok")


def test_the_card_is_a_hub_model_card_with_only_measured_metrics(run):
    card = ModelCard((run["tok_a_export"] / "README.md").read_text())
    meta = json.loads((run["tok_a_export"] / "config.json").read_text())["nativetok"]
    psnr = meta["metrics"]["validation"]["values"]["val/psnr"]
    data = card.data
    assert (data.library_name, data.license, data.pipeline_tag) == ("nativetok", "apache-2.0",
                                                                     "image-feature-extraction")
    assert data.datasets == ["zalando-datasets/fashion_mnist"] and data.metrics == ["psnr"]
    assert "nativetok" in data.tags and "image-tokenizer" in data.tags
    [result] = data.eval_results
    assert (result.metric_type, result.metric_name, result.dataset_type, result.dataset_split) == (
        "psnr", "PSNR (dB, 16 images)", "zalando-datasets/fashion_mnist", "val")
    assert result.metric_value == pytest.approx(psnr, abs=1e-4 * max(1.0, abs(psnr)))
    assert 'pip install ".[hub]"' in card.text and "not on PyPI" in card.text

    gen = ModelCard((run["gen_export"] / "README.md").read_text()).data
    assert gen.pipeline_tag == "unconditional-image-generation" and "class-conditional" in gen.tags
    assert gen.eval_results is None and gen.datasets is None  # nothing measured, its data index not here


def test_the_classes_save_and_load_themselves_as_the_loaders_do(run, images, tmp_path):
    tok = NativeTokenizer.from_pretrained(run["tok_a_export"])
    assert tok.loaded_from == run["tok_a_export"] and tok.experiment_config == tokenizer_config(run["tok_a"])
    with torch.no_grad():  # "fine-tuned" in memory: other ids for the same images
        tok.quantizer.codebook.copy_(torch.roll(tok.quantizer.codebook, 1, dims=0))
    saved = tok.save_pretrained(tmp_path / "tok_c")
    again = NativeTokenizer.from_pretrained(saved)
    assert torch.equal(again.encode(images), tok.encode(images))
    assert not torch.equal(again.encode(images), load_tokenizer(run["tok_a"]).encode(images))
    meta = json.loads((saved / "config.json").read_text())["nativetok"]
    assert meta["written_by"] == "save_pretrained" and meta["source"]["sha256"] == meta["weights"]["sha256"]
    assert file_sha256(saved) == meta["weights"]["sha256"]  # named by its weights, no checkpoint behind it
    assert "from a model in memory" in (saved / "README.md").read_text()
    with pytest.raises(CheckpointError, match="holds an earlier export: pass --force"):
        tok.save_pretrained(saved)
    assert tok.save_pretrained(saved, force=True) == saved

    with pytest.raises(CheckpointError, match="not a generator"):
        Generator.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="needs the experiment config"):
        build_tokenizer(tok.config, tok.image_size, tok.channels).save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_a_generator_saves_with_its_pinned_or_a_given_tokenizer_and_refuses_one_that_does_not_fit(
        run, images, tmp_path):
    gen = Generator.from_pretrained(run["gen"])
    with pytest.raises(TypeError, match="not a MaskGITGenerator"):
        MaskGITGenerator.from_pretrained(run["gen"])
    pinned = gen.save_pretrained(tmp_path / "pinned")  # the tokenizer it was pinned to, found from its checkpoint
    assert torch.equal(Generator.from_pretrained(pinned).sample(LABELS, seed=2), gen.sample(LABELS, seed=2))
    tokenizer, path = load_generator_tokenizer(pinned)
    assert path == (pinned / "tokenizer").resolve()
    assert torch.equal(tokenizer.encode(images), load_tokenizer(run["tok_a"]).encode(images))

    tok_b = load_tokenizer(run["tok_b"])
    given = gen.save_pretrained(tmp_path / "given", tokenizer=tok_b)  # a model: saved as well, then pinned
    assert torch.equal(load_generator_tokenizer(given)[0].encode(images), tok_b.encode(images))
    with pytest.raises(CheckpointError, match="needs the tokenizer its tokens belong to"):
        build_generator(gen.experiment_config.generator, gen.num_classes).save_pretrained(
            tmp_path / "fresh", config=gen.experiment_config)

    smaller = copy.deepcopy(tok_b.experiment_config)
    smaller.tokenizer.quantizer.codebook_size = gen.codebook_size // 2
    misfit = build_tokenizer(smaller.tokenizer, tok_b.image_size, tok_b.channels)
    misfit.experiment_config = smaller
    with pytest.raises(CheckpointError, match=f"has codebook_size {gen.codebook_size // 2} but the generator expects"):
        gen.save_pretrained(tmp_path / "misfit", tokenizer=misfit)
    assert not (tmp_path / "misfit").exists() and not any(tmp_path.glob(".misfit*"))


def test_push_to_hub_from_a_model_then_from_pretrained_at_that_revision(run, images, offline_hub):
    gen = Generator.from_pretrained(run["gen_export"])
    commit = gen.push_to_hub("someone/tiny-gen", revision="v2", private=True)
    hub = offline_hub.hub
    assert hub.calls[1:] == [
        ("create_repo", "someone/tiny-gen", True, True), ("create_branch", "someone/tiny-gen", "v2", True),
        ("upload_folder", "someone/tiny-gen", "v2", hub.calls[-1][3], BUNDLED)]
    cache_commit("someone/tiny-gen", hub.commits[commit.oid], refs=["v2"])
    pulled = Generator.from_pretrained("someone/tiny-gen", revision=commit.oid)
    assert torch.equal(pulled.sample(LABELS, seed=2), load_generator(run["gen"]).sample(LABELS, seed=2))
    assert torch.equal(load_generator_tokenizer("someone/tiny-gen", revision="v2")[0].encode(images),
                       load_tokenizer(run["tok_a"]).encode(images))


def test_an_export_keeps_the_class_names_a_sample_grid_is_labelled_with(run, tmp_path):
    checkpoint = torch.load(run["gen"], map_location="cpu", weights_only=True)
    checkpoint["nativetok"]["classes"] = [f"class {i}" for i in range(10)]
    torch.save(checkpoint, tmp_path / "named.ckpt")
    folder = export(tmp_path / "named.ckpt", tmp_path / "named")
    assert read_checkpoint(folder, "generator")["nativetok"]["classes"] == checkpoint["nativetok"]["classes"]
    saved = load_generator(folder).save_pretrained(tmp_path / "resaved")
    assert read_checkpoint(saved, "generator")["nativetok"]["classes"] == checkpoint["nativetok"]["classes"]


def test_the_python_functions_take_a_repo_id_and_revision_as_the_commands_do(run, tmp_path, offline_hub):
    cache_commit("someone/tiny-tok", folder_files(run["tok_a_export"]), refs=["v1"])
    cache_commit("someone/tiny-gen", folder_files(run["gen_export"]), refs=["v1"])
    index = tokenize_shards("someone/tiny-tok", str(run["images"]), Path("tokens"), splits=["val"], batch_size=8,
                            device="cpu", revision="v1")
    assert index.tokens["tokenizer_sha256"] == file_sha256(run["tok_a"])
    sample_to_folder("someone/tiny-gen", Path("s"), classes=[0], per_class=2, device="cpu", revision="v1")
    assert Manifest.load(Path("s"), SAMPLE_MANIFEST).inputs["generator_sha256"] == file_sha256(run["gen"])
    with pytest.raises(CheckpointError, match="at revision v9"):
        evaluate_fid(tokenizer_path="someone/tiny-tok", tokenizer_revision="v9")
    with pytest.raises(CheckpointError, match="revision v1 is given without the model"):
        evaluate_fid(generator_path=str(run["gen"]), tokenizer_revision="v1")


def test_the_cards_loading_code_runs_on_its_own_folder(run, images):
    for folder, count in ((run["tok_a_export"], len(images)), (run["gen_export"], len(LABELS))):
        card = (folder / "README.md").read_text()
        code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(folder))
        scope = {"images": images}
        exec(compile(code, f"{folder}/README.md", "exec"), scope)
        assert scope["images"].shape == (count, *images.shape[1:])
