"""The GPU-grade samplers: a static KV cache with fixed-shape decode steps, draws without host syncs,
compiled steps, and the same tokens as the multinomial-based samplers they replace."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from benchmarks.profiling import DispatchCounter, dispatch_cost_per_token, sampling_throughput
from nativetok.models import ARGenerator, MaskGITGenerator, ar, graphs, maskgit
from nativetok.models.layers import Rotary, rotate_pairs
from nativetok.models.maskgit import masked_after_step
from nativetok.models.sampling import StepKey, filter_logits, guidance_scale, guide

LABELS = torch.tensor([0, 1, 2, 3, 4, 0])
AOT_EAGER = {"backend": "aot_eager"}


def tiny_ar(num_tokens: int = 12) -> ARGenerator:
    torch.manual_seed(0)
    return ARGenerator(codebook_size=32, num_tokens=num_tokens, num_classes=5, width=32, depth=2, heads=2).eval()


def tiny_maskgit(num_tokens: int = 12) -> MaskGITGenerator:
    torch.manual_seed(0)
    return MaskGITGenerator(codebook_size=32, num_tokens=num_tokens, num_classes=5, width=32, depth=2, heads=2).eval()


# -- the samplers as they were: torch.multinomial, the whole prefix recomputed, the old rotary ----------------


def multinomial_draw(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def old_ar_sample(model, labels, cfg_scale=1.0, cfg_schedule="constant", temperature=1.0, top_k=0, top_p=1.0, seed=0):
    """Teacher forcing over the whole prefix at every position, tokens drawn by torch.multinomial."""
    rows, guided = model.sampling_rows(labels, cfg_scale, cfg_schedule)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(rows), 1, dtype=torch.long)  # the last column is never read by forward
    for i in range(model.num_tokens):
        logits = model(tokens, rows)[:, i]
        if guided:
            logits = guide(logits, guidance_scale(cfg_scale, cfg_schedule, (i + 1) / model.num_tokens))
        token = multinomial_draw(logits, temperature, top_k, top_p, generator)
        tokens[:, i] = torch.cat([token, token]) if guided else token
        tokens = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1)
    return tokens[: len(labels), :-1]


@torch.no_grad()
def old_maskgit_sample(model, labels, steps=8, cfg_scale=1.0, temperature=1.0, choice_temperature=4.5, seed=0):
    rows, guided = model.sampling_rows(labels, cfg_scale, "constant")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(labels), model.num_tokens), model.mask_id)
    for t, keep_masked in enumerate(masked_after_step(model.num_tokens, steps, model.schedule)):
        logits = model(torch.cat([ids, ids]) if guided else ids, rows)
        if guided:
            logits = guide(logits, cfg_scale)
        unknown = ids == model.mask_id
        drawn = multinomial_draw(logits.flatten(0, 1), temperature, generator=generator).view(ids.shape)
        drawn = torch.where(unknown, drawn, ids)
        probs = F.softmax(logits.float(), dim=-1).gather(-1, drawn[..., None]).squeeze(-1)
        uniform = torch.rand(ids.shape, generator=generator).clamp(1e-20, 1 - 1e-7)
        noise = -torch.log(-torch.log(uniform))
        confidence = probs.clamp_min(1e-30).log() + choice_temperature * (1 - (t + 1) / steps) * noise
        confidence = confidence.masked_fill(~unknown, float("inf"))
        rank = confidence.argsort(dim=1).argsort(dim=1)
        ids = torch.where(rank < keep_masked, torch.full_like(ids, model.mask_id), drawn)
    return ids


def split_and_stack_rotation(x, start=0):
    """The rotary embedding as trained checkpoints know it."""
    head_dim, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(start, start + length).float(), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


# -- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_bit_for_bit_the_split_and_stack_one(dtype):
    x = torch.randn(3, 2, 10, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    rotary = Rotary(16, 12)
    assert torch.equal(rotate_pairs(x, *rotary.tables(slice(0, 10))), split_and_stack_rotation(x))
    at = torch.tensor([7])  # one decoding position, chosen by a device tensor
    assert torch.equal(rotate_pairs(x[..., :1, :], *rotary.tables(at)), split_and_stack_rotation(x[..., :1, :], 7))


@pytest.mark.parametrize("settings", [
    dict(),
    dict(cfg_scale=3.0, top_k=8, top_p=0.9, temperature=0.8),
    dict(cfg_scale=1.5, cfg_schedule="linear", top_k=5),
    dict(cfg_scale=2.0, temperature=0.0),
])
def test_static_cache_sampling_gives_the_tokens_of_recomputing_and_of_multinomial(settings):
    model = tiny_ar()
    fast = model.sample(LABELS, seed=3, graph=False, **settings)
    assert fast.shape == (6, 12) and 0 <= int(fast.min()) and int(fast.max()) < 32
    assert torch.equal(fast, model.sample(LABELS, seed=3, use_cache=False, **settings))
    assert torch.equal(fast, old_ar_sample(model, LABELS, seed=3, **settings))
    assert torch.equal(fast, model.sample(LABELS, seed=3, **settings))  # cached step reused: same tokens


def test_the_compiled_decode_step_is_one_graph_for_every_position_and_gives_the_same_tokens():
    torch.compiler.reset()
    model = tiny_ar()
    settings = dict(cfg_scale=2.0, top_k=8, seed=5)
    eager = model.sample(LABELS, **settings)
    assert torch.equal(model.sample(LABELS, compile=AOT_EAGER, **settings), eager)  # fullgraph: no graph break
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    assert torch.equal(model.sample(LABELS, compile={"backend": counting_backend}, **settings), eager)
    assert len(graphs) == 1  # 12 positions, one compiled graph: the position is a device tensor


def test_no_host_sync_per_token_and_fewer_ops():
    counts = {}
    for num_tokens in (8, 16):
        model = tiny_ar(num_tokens)
        model.sample(LABELS, cfg_scale=2.0, top_k=8, top_p=0.9)  # warm-up: the decode step is built once
        with DispatchCounter() as counter:
            model.sample(LABELS, cfg_scale=2.0, top_k=8, top_p=0.9)
        assert counter.host_data == {}
        counts[num_tokens] = sum(counter.syncs.values())
    assert counts[8] == counts[16] <= 1  # the labels' validation, once per call
    cost = dispatch_cost_per_token(tiny_ar(16), batch=6, cfg_scale=2.0, top_k=8, top_p=0.9)
    assert cost["host_data"] == 0 and cost["syncs"] <= 1 / 16
    assert cost["ops"] < 160  # 147 measured; the multinomial sampler with its dynamic cache dispatched 182


def test_maskgit_gives_the_tokens_of_the_multinomial_sampler_and_compiles_whole():
    model = tiny_maskgit()
    for settings in (dict(cfg_scale=2.0, seed=1), dict(steps=5, temperature=0.7, seed=2)):
        fast = model.sample(LABELS, **settings)
        assert torch.equal(fast, old_maskgit_sample(model, LABELS, **settings))
    assert torch.equal(model.sample(LABELS, cfg_scale=2.0, seed=1, compile=AOT_EAGER),
                       old_maskgit_sample(model, LABELS, cfg_scale=2.0, seed=1))


def test_maskgit_steps_make_no_host_sync():
    model = tiny_maskgit()
    syncs = {}
    for steps in (4, 8):
        model.sample(LABELS, steps=steps, cfg_scale=2.0)  # warm-up: the schedule is computed once
        with DispatchCounter() as counter:
            model.sample(LABELS, steps=steps, cfg_scale=2.0)
        assert counter.host_data == {}
        syncs[steps] = sum(counter.syncs.values())
    assert syncs[4] == syncs[8] <= 1


def test_bf16_autocast_sampling_keeps_its_cache_in_bf16_and_gives_valid_ids():
    model, maskgit = tiny_ar(), tiny_maskgit()
    cache_dtypes = set()
    model.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: cache_dtypes.add(kwargs["cache"].keys[0].dtype), with_kwargs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = model.sample(LABELS, cfg_scale=2.0, seed=0)
        assert torch.equal(model.sample(LABELS, cfg_scale=2.0, seed=0, compile=AOT_EAGER), ids)
        masked = maskgit.sample(LABELS, cfg_scale=2.0, seed=0)
    assert cache_dtypes == {torch.bfloat16}
    for tokens in (ids, masked):
        assert tokens.shape == (6, 12) and 0 <= int(tokens.min()) and int(tokens.max()) < 32
    cache_dtypes.clear()
    model.sample(LABELS, cfg_scale=2.0, seed=0)  # autocast off: another step, with a float32 cache
    assert cache_dtypes == {torch.float32}


def test_converted_or_pickled_models_drop_their_built_steps():
    model = tiny_ar()
    model.sample(LABELS, cfg_scale=2.0, compile=AOT_EAGER)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the compiled step is not pickled
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert torch.equal(copy.sample(LABELS, cfg_scale=2.0, seed=1), model.sample(LABELS, cfg_scale=2.0, seed=1))
    model.double()  # a float32 cache would no longer fit: the step is built anew in float64
    assert torch.equal(model.sample(LABELS, cfg_scale=2.0, seed=1), model.sample(LABELS, cfg_scale=2.0, seed=1,
                                                                                 use_cache=False))


class ReplayOnCPU:
    """Stands in for a CUDA graph: a replay reruns the step on the recorded inputs into the recorded output."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs
        self.output = fn(*inputs)

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))


def test_graph_replays_feed_static_buffers_and_give_the_eager_tokens(monkeypatch):
    """The plumbing of a replayed step on CPU: inputs copied into recorded buffers, one output tensor reused."""
    replays = []

    def record(fn, inputs):
        replays.append(ReplayOnCPU(fn, inputs))
        return replays[-1], replays[-1].output

    monkeypatch.setattr(graphs, "record_cuda_graph", record)
    for module in (ar, maskgit):
        monkeypatch.setattr(module, "step_key", lambda device, rows, graph, compile: StepKey(rows, None, True, False))
    for model in (tiny_ar(), tiny_maskgit()):
        eager = model.sample(LABELS, cfg_scale=2.0, seed=4, graph=False)
        assert torch.equal(model.sample(LABELS, cfg_scale=2.0, seed=4, graph=True), eager)
    assert len(replays) == 2


def test_throughput_is_measured_in_tokens_per_second():
    assert sampling_throughput(tiny_ar(8), batch=2, device="cpu", graph=False, repeats=1) > 0


def test_cuda_graphs_are_refused_off_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        tiny_ar().sample(LABELS, graph=True)
