"""NativeTok: native visual tokenization (Meta Image Transformer + Mixture of Causal Experts).

    from nativetok import load_tokenizer
    tok = load_tokenizer("runs/fmnist_tiny/checkpoints/last.ckpt")
    ids = tok.encode(images)          # float [B, C, H, W] in [0, 1] -> LongTensor [B, K]
    rec = tok.decode(ids)             # -> float [B, C, H, W] in [0, 1]
    coarse = tok.decode(ids, k=4)     # from the first 4 tokens
    gen = load_generator("runs/fmnist_tiny_ar/checkpoints/last.ckpt")
    ids = gen.sample(labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, temperature=1.0, seed=0)
"""

from nativetok.checkpoints import load_generator, load_tokenizer
from nativetok.version import __version__

__all__ = ["__version__", "load_generator", "load_tokenizer"]
