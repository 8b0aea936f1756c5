"""NativeTok: native visual tokenization (Meta Image Transformer + Mixture of Causal Experts).

    from nativetok import NativeTokenizer, Generator
    tok = NativeTokenizer.from_pretrained("runs/fmnist_tiny/checkpoints/last.ckpt")  # or an export, "owner/name"
    ids = tok.encode(images)          # float [B, C, H, W] in [0, 1] -> LongTensor [B, K]
    rec = tok.decode(ids)             # -> float [B, C, H, W] in [0, 1]
    coarse = tok.decode(ids, k=4)     # from the first 4 tokens
    gen = Generator.from_pretrained("runs/fmnist_tiny_ar/checkpoints/last.ckpt")
    ids = gen.sample(labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, temperature=1.0, seed=0)
    tok.save_pretrained("exports/tok"); tok.push_to_hub("someone/fmnist-tok", revision="v1")

`load_tokenizer` / `load_generator` are the same loaders as functions.
"""

from nativetok.checkpoints import load_generator, load_tokenizer
from nativetok.models import Generator, NativeTokenizer
from nativetok.models.pretrained import ExportFunctions, connect
from nativetok.version import __version__


def _load(kind: str, path, **options):
    return (load_tokenizer if kind == "tokenizer" else load_generator)(path, **options)


def _save(model, folder, **options):
    from nativetok.pipelines.export import save_pretrained  # writing an export loads the data stack: only then

    return save_pretrained(model, folder, **options)


def _push(folder, repo_id, **options):
    from nativetok.pipelines.export import push_to_hub

    return push_to_hub(folder, repo_id, **options)


# The classes' Hub methods read and write exports through the layers above them (models/pretrained.py).
connect(ExportFunctions(load=_load, save=_save, push=_push))

__all__ = ["Generator", "NativeTokenizer", "__version__", "load_generator", "load_tokenizer"]
