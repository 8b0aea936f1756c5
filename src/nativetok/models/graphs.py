"""The tokenizer's encoder captured as CUDA graphs: one replay instead of thousands of kernel launches.

At NativeTok's sizes a GPU step waits on the host, which dispatches every op of 32 sequential experts
(about 15,000 aten ops a step at L-32 shapes); the FLOPs are not the limit. A CUDA graph records the
kernels of the encoder's forward and backward once and replays them with one launch each. Its
conditions, which the encoder meets and the tests check on CPU: fixed shapes (the batch, and per HNT
stage the number of active experts and what trains), no host synchronisation inside (the quantizer's
argmax and lookups stay on the device), and weights updated in place (optimizers, dead-code restarts
and growth all write into the same tensors). A capture is valid for one `key`; its owner captures anew
when the key changes (a new growth stage, another batch shape or precision).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from nativetok.models.quantizer import Quantized


def encoder_key(tokenizer: nn.Module, images: Tensor) -> Hashable:
    """What a capture depends on: input shape and type, autocast, the active experts, what trains."""
    device = images.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    trains = tuple(p.requires_grad for p in tokenizer.parameters())
    return tuple(images.shape), images.dtype, autocast, getattr(tokenizer, "num_active", None), trains


class EncoderGraph:
    """`tokenizer.quantize` (images in [-1, 1] -> quantized tokens) as a CUDA-graphed autograd function.

    Gradients reach the trainable parameters as they would eagerly; the outputs are the graph's static
    buffers, valid until the next call (a training step uses them before the next step begins).
    """

    def __init__(self, tokenizer: nn.Module, images: Tensor):
        if not images.is_cuda:
            raise ValueError("CUDA graphs need the tokenizer and its images on a CUDA device")
        self.key = encoder_key(tokenizer, images)
        decoder = {id(p) for p in tokenizer.decoder.parameters()}
        self.params: Tuple[nn.Parameter, ...] = tuple(
            p for p in tokenizer.parameters() if p.requires_grad and id(p) not in decoder
        )

        def encode(images: Tensor, *params: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
            # The parameters are inputs only so that the graph returns their gradients; the
            # tokenizer reads the very same tensors.
            tokens = tokenizer.quantize(images)
            return tokens.codes, tokens.loss, tokens.ids, tokens.inputs

        sample = (images.detach().clone(), *self.params)
        self._graphed = torch.cuda.make_graphed_callables(encode, sample, allow_unused_input=True)

    def __call__(self, images: Tensor) -> Quantized:
        codes, loss, ids, inputs = self._graphed(images, *self.params)
        return Quantized(codes, ids, loss, inputs)


Compile = Union[bool, Dict[str, Any]]


class FixedShapeStep:
    """`fn(*inputs, *state)` for inputs whose shapes never change: run eagerly, compiled whole (`compile`: True,
    or the options of torch.compile, e.g. {"backend": "aot_eager"}), and/or recorded once in a CUDA graph
    (`graph`) that each call replays after copying the inputs into the graph's own. `state` (e.g. a KV cache)
    is the same tensors at every call; passing it as arguments lets compiled code serve any model and cache of
    the same shapes. A replay returns the same output tensor every time: use it before the next call."""

    def __init__(
        self, fn: Callable[..., Tensor], example_inputs: Sequence[Tensor], graph: bool, compile: Compile, state=()
    ):
        if compile:
            fn = torch.compile(fn, fullgraph=True, **({} if compile is True else compile))
        self.run = lambda *inputs: fn(*inputs, *state)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if graph:
            self.inputs = [t.clone() for t in example_inputs]
            self.graph, self.output = record_cuda_graph(self.run, self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.graph is None:
            return self.run(*inputs)
        for recorded, given in zip(self.inputs, inputs):
            recorded.copy_(given)
        self.graph.replay()
        return self.output


def record_cuda_graph(fn: Callable[..., Tensor], inputs: Sequence[Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Warm `fn` up on a side stream, then record one call on it (the recipe of the torch.cuda.graphs docs).

    Autocast keeps its state but not its cast cache: cached casts would be freed while the graph uses them.
    """
    device = inputs[0].device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    with torch.cuda.device(device), torch.cuda.stream(stream), autocast:
        for _ in range(3):
            fn(*inputs)
        with torch.cuda.graph(graph, stream=stream):
            output = fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph, output
