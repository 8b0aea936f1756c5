"""Pure-torch models: the block's shortcuts, causality of the token order, quantizer, decoder prefixes."""

from __future__ import annotations

import pytest
import torch

from nativetok.losses import LPIPS, LeCam, adaptive_weight, load_lpips
from nativetok.models.layers import Block, causal_mask
from nativetok.models.prefix_cache import FrozenPrefixCache
from nativetok.models.quantizer import VectorQuantizer, code_statistics
from nativetok.models.tokenizer import build_tokenizer
from nativetok.pixels import to_signed, to_unit


def make_tokenizer(tiny_config, kind="nativetok", *extra):
    torch.manual_seed(0)
    config = tiny_config(f"tokenizer.kind={kind}", *extra)
    return build_tokenizer(config.tokenizer, config.data.image_size, config.data.channels).eval()


def test_block_last_positions_equal_the_full_computation():
    torch.manual_seed(0)
    block = Block(32, 4).eval()
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(block(x, last=2), block(x)[:, -2:])
    torch.testing.assert_close(block(x, causal=True, last=3), block(x, causal=True)[:, -3:])
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_changing_expert_j_changes_no_earlier_token(tiny_config, images):
    tokenizer = make_tokenizer(tiny_config)
    before = tokenizer.quantize(to_signed(images))
    j = 5
    with torch.no_grad():
        for p in tokenizer.experts.experts[j].parameters():
            p.add_(torch.randn_like(p))
    after = tokenizer.quantize(to_signed(images))
    assert torch.equal(after.inputs[:, :j], before.inputs[:, :j]) and torch.equal(after.ids[:, :j], before.ids[:, :j])
    assert not torch.allclose(after.inputs[:, j], before.inputs[:, j])


def test_changing_tokens_from_position_j_on_changes_no_earlier_token(tiny_config, images):
    """Perturb the quantized token handed to later experts from position j on: earlier tokens stay."""
    tokenizer = make_tokenizer(tiny_config)
    z = tokenizer.mit(to_signed(images))
    j = 3

    class Perturbing(torch.nn.Module):
        def __init__(self, quantizer):
            super().__init__()
            self.quantizer, self.calls = quantizer, 0
            self.normalized_codebook, self.finish = quantizer.normalized_codebook, quantizer.finish

        def snap(self, vectors, codebook):
            snapped = self.quantizer.snap(vectors, codebook)
            if self.calls >= j:
                snapped = snapped._replace(codes=torch.roll(snapped.codes, 1, dims=0))  # another image's token
            self.calls += 1
            return snapped

    clean = tokenizer.experts(z, tokenizer.quantizer, 8)
    perturbed = tokenizer.experts(z, Perturbing(tokenizer.quantizer), 8)
    assert torch.equal(perturbed.inputs[:, : j + 1], clean.inputs[:, : j + 1])  # token j itself reads only < j
    assert not torch.allclose(perturbed.inputs[:, j + 1 :], clean.inputs[:, j + 1 :])


@pytest.mark.parametrize("kind, causal", [("causal_mask", True), ("parallel", False)])
def test_baselines_latent_order(tiny_config, images, kind, causal):
    """causal_mask: latent j cannot reach earlier tokens; parallel: it can (the test has teeth)."""
    tokenizer = make_tokenizer(tiny_config, kind)
    before = tokenizer.quantize(to_signed(images)).inputs
    j = 4
    with torch.no_grad():
        # random, not a constant: LayerNorm would remove a constant shift
        tokenizer.latents.tokens[:, j] += torch.randn_like(tokenizer.latents.tokens[:, j])
    after = tokenizer.quantize(to_signed(images)).inputs
    assert torch.equal(after[:, :j], before[:, :j]) == causal
    assert not torch.allclose(after[:, j], before[:, j])


@pytest.mark.parametrize("kind", ["nativetok", "parallel", "causal_mask"])
def test_encode_decode_shapes_and_prefix_decoding(tiny_config, images, kind):
    tokenizer = make_tokenizer(tiny_config, kind)
    ids = tokenizer.encode(images)
    assert ids.shape == (6, 8) and ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 32
    full = tokenizer.decode(ids)
    assert full.shape == images.shape and 0 <= float(full.min()) and float(full.max()) <= 1
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 32
    torch.testing.assert_close(tokenizer.decode(changed, k=4), tokenizer.decode(ids, k=4))
    torch.testing.assert_close(tokenizer.decode(ids[:, :4]), tokenizer.decode(ids, k=4))
    assert not torch.allclose(tokenizer.decode(changed), full)
    codes = tokenizer.quantizer.lookup(ids)
    lengths = torch.full((6,), 4)
    torch.testing.assert_close(tokenizer.decoder(codes, lengths), tokenizer.decoder(codes[:, :4]))


@pytest.mark.parametrize("kind", ["nativetok", "parallel", "causal_mask"])
def test_every_public_method_speaks_pixels_in_0_1(tiny_config, images, kind):
    """forward's reconstruction is on the scale of its input and of decode (unclamped, decode clamps)."""
    tokenizer = make_tokenizer(tiny_config, kind)
    out = tokenizer(images)
    assert torch.equal(out.reconstruction, to_unit(out.signed))
    assert torch.equal(out.ids, tokenizer.encode(images))
    torch.testing.assert_close(out.reconstruction.clamp(0, 1), tokenizer.decode(out.ids))
    assert torch.equal(to_signed(to_unit(torch.tensor([-1.0, 0.0, 1.0]))), torch.tensor([-1.0, 0.0, 1.0]))


def test_the_kind_registry_builds_one_class_per_kind(tiny_config):
    from nativetok.config.schema import TOKENIZER_KINDS
    from nativetok.models.tokenizer import TOKENIZERS, NativeTokenizer

    assert set(TOKENIZERS) == set(TOKENIZER_KINDS)
    for kind in TOKENIZER_KINDS:
        tokenizer = make_tokenizer(tiny_config, kind)
        assert isinstance(tokenizer, NativeTokenizer) and tokenizer.kind == kind
    config = tiny_config().tokenizer
    with pytest.raises(TypeError, match="build_tokenizer"):
        NativeTokenizer(config, 32, 1)
    with pytest.raises(ValueError, match="registered twice"):  # one class per kind, as for generators
        type("Again", (NativeTokenizer,), {}, kind="parallel")
    with pytest.raises(ValueError, match="not one of"):
        type("Unknown", (NativeTokenizer,), {}, kind="pixels")
    config.kind = "other"
    with pytest.raises(ValueError, match="unknown tokenizer kind 'other'"):
        build_tokenizer(config, 32, 1)
    with pytest.raises(ValueError, match="always produces all 8 tokens"):
        make_tokenizer(tiny_config, "causal_mask").set_active(4)


def test_bad_inputs_are_named(tiny_config, images):
    tokenizer = make_tokenizer(tiny_config)
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 32, 32\].*got \[6, 3, 32, 32\]"):
        tokenizer.encode(images.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"got \[6, 1, 24, 24\]"):
        tokenizer.encode(images[..., :24, :24])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        tokenizer.decode(torch.full((2, 8), 32))
    with pytest.raises(ValueError, match="n <= 8"):
        tokenizer.decode(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot grow to 9 experts"):
        tokenizer.grow(9, "copy_last")
    with pytest.raises(ValueError, match="no experts to grow"):
        make_tokenizer(tiny_config, "parallel").grow(4, "copy_last")


def test_quantizer_picks_the_nearest_normalised_code_with_straight_through_gradients():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, commitment=0.25)
    vectors = torch.randn(5, 7, 4, requires_grad=True)
    out = quantizer(vectors)
    z = torch.nn.functional.normalize(vectors.detach(), dim=-1)
    codebook = quantizer.normalized_codebook().detach()
    distances = ((z[..., None, :] - codebook) ** 2).sum(-1)
    assert torch.equal(out.ids, distances.argmin(-1))
    torch.testing.assert_close(out.codes.detach(), codebook[out.ids])
    expected = 1.25 * ((codebook[out.ids] - z) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    out.codes.sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    stats = code_statistics(torch.tensor([0, 0, 1, 1]), 4)
    assert stats["usage"] == 0.5 and torch.isclose(stats["perplexity"], torch.tensor(2.0))


def test_dead_codes_restart_onto_encoder_outputs():
    quantizer = VectorQuantizer(8, 3)
    assert bool((0 - quantizer.last_used > 10**6).all())  # never used: the first restart initialises all
    quantizer.note_usage(torch.tensor([0, 1]), step=100)
    candidates = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1)
    restarted = quantizer.restart_dead(candidates, 120, after=30, generator=torch.Generator().manual_seed(0))
    assert restarted == 6
    rows = quantizer.codebook.detach()[2:]
    assert all(any(torch.allclose(r, c) for c in candidates) for r in rows)
    assert quantizer.restart_dead(candidates, 125, after=30, generator=torch.Generator()) == 0


def test_maintain_notes_usage_every_step_and_restarts_every_quarter_of_after():
    torch.manual_seed(0)
    quantizer, twin = VectorQuantizer(8, 3), VectorQuantizer(8, 3)
    twin.load_state_dict(quantizer.state_dict())
    ids, vectors = torch.tensor([[0, 1]]), torch.randn(1, 2, 3)
    gathered = []

    def gather(t):
        gathered.append(t)
        return t

    assert quantizer.maintain(ids, vectors, 0, after=0, seed=3) is None  # off
    assert quantizer.maintain(ids, vectors, 1, after=8, seed=3, gather=gather) is None  # not a restart step
    assert quantizer.last_used[:2].tolist() == [1, 1] and len(gathered) == 1
    moved = quantizer.maintain(ids, vectors, 2, after=8, seed=3, gather=gather, allowed=torch.tensor(True))
    twin.note_usage(ids, 1)
    twin.note_usage(ids, 2)
    expected = twin.restart_dead(vectors.reshape(-1, 3), 2, 8, torch.Generator().manual_seed(3 * 1_000_003 + 2))
    assert moved == expected == 6 and len(gathered) == 3
    assert torch.equal(quantizer.codebook, twin.codebook)
    assert quantizer.maintain(ids, vectors, 4, 8, 3, allowed=torch.tensor(False)) == 0  # vetoed
    quantizer.codebook.requires_grad_(False)
    assert quantizer.maintain(ids, vectors, 6, 8, 3) is None  # a frozen codebook stays as it is


def test_growing_copies_the_last_expert_or_initialises_fresh_ones(tiny_config):
    tokenizer = make_tokenizer(tiny_config)
    tokenizer.set_active(2)
    tokenizer.grow(4, "copy_last")
    experts = tokenizer.experts.experts
    assert tokenizer.num_active == 4
    for i in (2, 3):
        torch.testing.assert_close(experts[i].blocks.state_dict(), experts[1].blocks.state_dict())
        torch.testing.assert_close(experts[i].token_positions[:, :1], experts[1].token_positions)
    tokenizer.grow(6, "fresh", torch.Generator().manual_seed(1))
    assert not torch.allclose(experts[4].head.weight, experts[3].head.weight)
    reloaded = make_tokenizer(tiny_config)
    reloaded.load_state_dict(tokenizer.state_dict())
    assert reloaded.num_active == 6  # the expert count travels with the weights
    frozen = tokenizer.set_trainable(range(4, 6), ["decoder"])
    assert {"mit", "codebook", "expert.0", "expert.3", "expert.6"} <= set(frozen) and "decoder" not in frozen
    assert all(p.requires_grad for p in experts[5].parameters())
    assert not any(p.requires_grad for p in experts[6].parameters())  # not active yet


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    layer = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    rec = (x @ layer).pow(2).mean()
    gan = -(x @ layer).sum() * 0.1
    grad_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(gan, layer, retain_graph=True)[0]
    expected = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, gan, layer), expected)


def test_lecam_penalises_logits_past_the_other_side_running_mean():
    """reg = E[relu(D(real) - mean D(fake))^2] + E[relu(mean D(real) - D(fake))^2] (Tseng et al. 2021)."""
    lecam = LeCam(decay=0.0)
    assert float(lecam(torch.full((4,), -1.0), torch.full((4,), 1.0))) == 0.0
    assert float(lecam(torch.full((4,), 3.0), torch.full((4,), -2.0))) == 2 * 5.0**2


def test_lpips_loads_local_weight_files_and_measures_distance(tmp_path, images):
    torch.manual_seed(0)
    reference = LPIPS()
    for conv in reference.lins:
        conv.weight.copy_(torch.rand_like(conv.weight))
    torch.save({f"features.{k}": v for k, v in reference.features.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": c.weight for i, c in enumerate(reference.lins)}, tmp_path / "vgg.pth")
    lpips = load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x = to_signed(images)
    assert float(lpips(x, x)) == 0.0
    noisy = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    distance = lpips(noisy, x)
    assert float(distance.detach()) > 0
    distance.backward()
    assert noisy.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_lpips(tmp_path / "bad.pth", tmp_path / "vgg.pth")


def test_lpips_names_the_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.perceptual.vgg_weights: LPIPS weights file"):
        load_lpips(tmp_path / "none.pth", tmp_path / "none.pth")


def vit_params(width: int, depth: int) -> float:
    """Weights of `depth` pre-norm blocks (attention 4 w^2, MLP 8 w^2): the bulk of a ViT."""
    return depth * 12 * width**2


@pytest.mark.parametrize(
    "name, tokens, vit, experts",
    [
        ("nativetok_l32", 32, (1024, 24), 32),
        ("parallel_l32", 32, (1024, 24), 0),
        ("causal_mask_l32", 32, (1024, 24), 0),
        ("nativetok_b64", 64, (768, 12), 64),
        ("nativetok_s128", 128, (512, 8), 128),
    ],
)
def test_imagenet_models_build_on_the_meta_device_with_their_sizes(name, tokens, vit, experts):
    from nativetok.config import load_config

    from .conftest import REPO

    config = load_config(REPO / "experiments" / f"imagenet256_{name}.yaml")
    with torch.device("meta"):
        tokenizer = build_tokenizer(config.tokenizer, 256, 3)
    counts = tokenizer.parameter_counts()
    assert tokenizer.num_tokens == tokens and config.tokenizer.quantizer.codebook_size == 4096
    assert counts["mit"] == pytest.approx(vit_params(*vit), rel=0.03)
    assert counts["decoder"] == pytest.approx(vit_params(*vit), rel=0.03)
    assert counts.get("experts", 0) == pytest.approx(experts * vit_params(256, 2), rel=0.05)
    if name == "nativetok_l32":  # ViT-L encoder and decoder plus 32 small experts: about 655M
        assert 640e6 < counts["total"] < 670e6


@pytest.mark.parametrize("train, prefix", [([], 4), (["codebook", "decoder"], 0)])
def test_a_prefix_cache_gives_the_same_tokens_loss_and_gradients(tiny_config, images, train, prefix):
    """A growth stage (MIT and experts 0-3 frozen): a step whose views miss the cache, then one whose views
    hit it, give the tokens, loss and gradients of an uncached step; what is cached follows what is frozen."""
    tokenizer = make_tokenizer(tiny_config)
    tokenizer.set_trainable(range(4, 8), train)
    assert tokenizer.frozen_prefix() == prefix
    cache = FrozenPrefixCache(1 << 20)
    cache.reset(prefix)
    views = [f"view{i}" for i in range(len(images))]

    def step(**cached):
        tokenizer.zero_grad(set_to_none=True)
        out = tokenizer(images, **cached)
        loss = (out.reconstruction - images).square().mean() + out.quantizer_loss
        loss.backward()
        return out.ids, loss.detach(), {n: p.grad for n, p in tokenizer.named_parameters() if p.requires_grad}

    ids, loss, grads = step()
    for expected_hits in (0, len(images)):
        before = cache.hits
        got_ids, got_loss, got_grads = step(cache=cache, views=views)
        assert cache.hits - before == expected_hits
        assert torch.equal(got_ids, ids)
        assert torch.allclose(got_loss, loss, rtol=1e-5, atol=0)
        # another summation order: an element near zero is off by ulps of the tensor's largest values, not its own
        assert grads.keys() == got_grads.keys() and all(
            torch.allclose(got_grads[n], g, rtol=1e-5, atol=1e-5 * g.abs().max().item()) for n, g in grads.items())
    z, outputs = cache.entries["view0"]
    assert z.shape == (tokenizer.mit.num_patches, 16) and outputs.shape == (prefix, 12)


def test_a_prefix_cache_is_refused_when_stale_and_stops_storing_at_its_budget(tiny_config, images):
    tokenizer = make_tokenizer(tiny_config)
    tokenizer.set_trainable(range(8), ["all"])
    assert tokenizer.frozen_prefix() is None  # the MIT trains: Z moves
    tokenizer.set_trainable(range(2, 8), ["old_experts"])
    assert tokenizer.frozen_prefix() == 0  # experts 0-1 train through old_experts: only Z is fixed
    tokenizer.set_trainable(range(6, 8), [])
    views = [f"view{i}" for i in range(len(images))]
    entry = tokenizer.mit.num_patches * 16 * 4 + 6 * 12 * 4  # bytes of one view: Z and 6 outputs, fp32
    cache = FrozenPrefixCache(2 * entry + 1)
    cache.reset(6)
    with torch.no_grad():
        expected = tokenizer.encode(images)
        assert torch.equal(tokenizer(images, cache=cache, views=views).ids, expected)
        assert len(cache) == 2 and cache.bytes == 2 * entry
        assert torch.equal(tokenizer(images, cache=cache, views=views).ids, expected)
        assert (cache.hits, cache.misses) == (2, 2 * len(images) - 2)
        tokenizer.set_trainable(range(4, 8), [])  # expert 4 and 5 train again: their outputs move
        with pytest.raises(RuntimeError, match="6 experts' outputs but 4 are fixed"):
            tokenizer(images, cache=cache, views=views)
        with pytest.raises(ValueError, match="one view name per image"):
            tokenizer(images, cache=cache, views=views[:2])
