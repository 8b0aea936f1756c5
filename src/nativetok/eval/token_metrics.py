"""How much earlier tokens tell about later ones: per-position entropies of a token sequence.

- marginal entropy H(z_i) of each position, from code counts (plug-in estimate, bits);
- conditional code length of z_i given z_<i, from an AR generator's cross-entropy on held-out tokens
  (bits; an upper bound on H(z_i | z_<i)), unconditional (null class) and given the class;
- their difference, a lower-bound estimate of I(z_i; z_<i): large when the order makes tokens
  predictable from their prefix, which is what an AR generator exploits;
- codebook usage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nativetok.checkpoints import generator_config, load_generator, named_data
from nativetok.data.shards import DatasetIndex
from nativetok.data.stream import ShardSpec, ShardStream
from nativetok.data.tokens import TokenDecoder
from nativetok.lit.figures import position_curves
from nativetok.models.quantizer import code_counts, statistics_from_counts


def sequence_statistics(tokens: Tensor, codebook_size: int) -> Dict[str, float]:
    """How varied the sequences [N, K] are: the share of adjacent token pairs with the same id (a tokenizer whose
    experts copy each other repeats ids), the mean count of distinct ids in a sequence, and the share of the
    codebook in use."""
    tokens = tokens.long()
    repeats = (tokens[:, 1:] == tokens[:, :-1]).double().mean().item() if tokens.shape[1] > 1 else 0.0
    distinct = tokens.sort(dim=1).values.diff(dim=1).ne(0).sum(1).add(1).double().mean().item()
    return {"adjacent_repeat_rate": repeats, "distinct_ids_per_image": distinct,
            "codebook_usage": tokens.unique().numel() / codebook_size}


def marginal_entropy_bits(tokens: Tensor, codebook_size: int) -> Tensor:
    """Plug-in entropy of each position's code distribution [K], in bits."""
    entropies = []
    for column in tokens.t():
        counts = code_counts(column, codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * p.log2()).sum()))
    return torch.tensor(entropies, dtype=torch.float64)


@torch.no_grad()
def conditional_bits(generator, tokens: Tensor, labels: Tensor, batch_size: int = 500) -> Tensor:
    """Mean cross-entropy of an AR generator at each position [K], in bits."""
    device = next(generator.parameters()).device
    total = torch.zeros(tokens.shape[1], dtype=torch.float64)
    for start in range(0, len(tokens), batch_size):
        batch, classes = tokens[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
        _, per_position = generator.loss(batch, classes)
        total += per_position.double().cpu() * len(batch)
    return total / len(tokens) / math.log(2)


def dependency_report(generator, tokens: Tensor, labels: Tensor, codebook_size: int) -> Dict:
    """Per-position marginal and conditional bits, their difference, and codebook usage (JSON-ready)."""
    marginal = marginal_entropy_bits(tokens, codebook_size)
    unconditional = conditional_bits(generator, tokens, torch.full_like(labels, generator.null_class))
    given_class = conditional_bits(generator, tokens, labels)
    usage = statistics_from_counts(code_counts(tokens, codebook_size))
    return {
        "sequences": len(tokens),
        "marginal_bits": marginal.tolist(),
        "conditional_bits": unconditional.tolist(),
        "conditional_bits_given_class": given_class.tolist(),
        "information_from_prefix_bits": (marginal - unconditional).tolist(),
        "total": {
            "marginal_bits": float(marginal.sum()),
            "conditional_bits": float(unconditional.sum()),
            "conditional_bits_given_class": float(given_class.sum()),
            "information_from_prefix_bits": float((marginal - unconditional).sum()),
        },
        "bits_per_token": float(given_class.mean()),
        "codebook_usage": float(usage["usage"]),
        "codebook_perplexity": float(usage["perplexity"]),
    }


def held_out_tokens(index_path: str, split: str = "val") -> tuple[Tensor, Tensor]:
    """Every token sequence and label of a split of token shards (unflipped), in index order."""
    index = DatasetIndex.load(index_path, holds="tokens")
    specs = [ShardSpec(p, s.samples) for p, s in zip(index.shard_paths(split), index.split(split).shards)]
    tokens, labels = [], []
    stream = ShardStream(specs, TokenDecoder(train=False, flip=False), 1000, strict=True)
    for batch in DataLoader(stream, batch_size=None):
        tokens.append(batch["tokens"])
        labels.append(batch["label"])
    return torch.cat(tokens), torch.cat(labels)


def token_metrics(generator_path: str, out: Path, split: str = "val", data: Optional[str] = None) -> Dict:
    """The report for an AR generator on its held-out token shards: JSON and a PNG plot in `out`."""
    config = generator_config(generator_path)
    if config.generator.kind != "ar":
        raise ValueError(f"token metrics need an AR generator; {generator_path} is '{config.generator.kind}'")
    tokens, labels = held_out_tokens(named_data(data, generator_path), split)
    report = dependency_report(load_generator(generator_path), tokens, labels, config.generator.codebook_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    figure = position_curves(
        {"H(z_i)": report["marginal_bits"], "H(z_i | z_<i)": report["conditional_bits"],
         "H(z_i | z_<i, class)": report["conditional_bits_given_class"]},
        "bits", "token entropy by position",
    )
    figure.savefig(out / "token_metrics.png")
    return report
