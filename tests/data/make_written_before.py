"""Writes tests/data/written_before/: a tiny tokenizer and AR generator trained, checkpointed and exported by an
earlier NativeTok, and what that code computed with them. Run it with the earlier checkout's src first on the path:

    PYTHONPATH=/path/to/old/checkout/src python tests/data/make_written_before.py tests/data/written_before COMMIT
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[2]
out, commit = Path(sys.argv[1]), sys.argv[2]
work = Path(tempfile.mkdtemp(prefix="written-before-"))
import nativetok  # noqa: E402  (the earlier checkout's, from PYTHONPATH)
from nativetok import load_generator, load_tokenizer  # noqa: E402
from nativetok.config import load_config  # noqa: E402
from nativetok.config.schema import DataConfig  # noqa: E402
from nativetok.data import ImageShardsDataModule  # noqa: E402
from nativetok.lit.train import build_trainer, generator_module, train_tokenizer  # noqa: E402
from nativetok.pipelines.export import export  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.conftest import TINY, random_token_batches, tiny_generator_config  # noqa: E402

print("nativetok from", nativetok.__file__)
index = REPO / "data" / "fmnist" / "index.json"
train_tokenizer(load_config(REPO / "experiments" / "fmnist_tiny.yaml", TINY + [
    f"data.index={index}", f"run.dir={work / 'tok'}", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
    "data.val_samples=16", "optim.ema_decay=0.5"]))
tok = work / "tok" / "checkpoints" / "last.ckpt"
config = tiny_generator_config(work / "gen", "ar", f"generator.tokenizer={tok}", "optim.ema_decay=0.5",
                               "trainer.max_steps=2", f"data.index={work / 'no_tokens' / 'index.json'}")
module = generator_module(config)
_ = module.tokenizer  # pins it (the earlier code's property)
build_trainer(config, [], work / "gen").fit(module, train_dataloaders=random_token_batches())
gen = work / "gen" / "checkpoints" / "last.ckpt"
shutil.rmtree(out, ignore_errors=True)
(out / "tok" / "checkpoints").mkdir(parents=True)
(out / "gen" / "checkpoints").mkdir(parents=True)
shutil.copyfile(tok, out / "tok" / "checkpoints" / "last.ckpt")
shutil.copyfile(gen, out / "gen" / "checkpoints" / "last.ckpt")
export(out / "gen" / "checkpoints" / "last.ckpt", out / "gen_export")
batch = next(iter(ImageShardsDataModule(DataConfig(index=str(index), batch_size=6, num_workers=0)).make_stream(False)))
images = batch["image"].float() / 255
t = load_tokenizer(out / "tok" / "checkpoints" / "last.ckpt")
ids = t.encode(images)
labels = torch.tensor([0, 3, 7])
sampled = load_generator(out / "gen" / "checkpoints" / "last.ckpt").sample(labels, seed=2)
torch.save({"images": images, "ids": ids, "decoded": t.decode(ids), "labels": labels, "sampled": sampled},
           out / "expected.pt")
(out / "README.md").write_text(
    f"Written by NativeTok at commit {commit} (`tests/data/make_written_before.py`): a tokenizer and an AR "
    "generator trained two steps at test sizes, the generator's export, and in `expected.pt` what that code "
    "computed with them (ids of six validation images, their decoding, samples of classes 0, 3, 7 at seed 2). "
    "`tests/test_written_before.py` loads them with today's code.\n")
shutil.rmtree(work)
print(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), "bytes in", out)
