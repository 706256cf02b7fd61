"""The one layer-by-layer loop every method uses.

1. Capture what decoder layer 0 receives (hidden states plus whatever the model passes it: rotary
   `position_embeddings`, masks, positions) by running the model until layer 0 and stopping there.
2. Per decoder layer: move it alone to the compute device, hook its prunable linears, stream the
   calibration activations through it in chunks, hand the accumulated statistics to `on_layer`
   (which may change the weights), and run the layer again if it did, so that layer i+1 sees the
   outputs of the already-pruned layers < i+1.
The walker knows nothing about which method runs; `on_layer` knows nothing about hooks or data.

Streaming (`stream=`, a pipeline.stream.StreamedModel): the model is a skeleton on the meta device; the walker
asks the stream for layer i in fp32 just before it runs it (and frees the embeddings once layer 0's inputs are
captured), hands the finished layer to `on_done` (e.g. a shard writer), and returns it to meta. Everything else is the same loop, so a streamed walk equals an in-memory one.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from .arch import ArchSpec, decoder_layers, get_module, spec_for
from .stats import LinearStats

OnLayer = Callable[[int, nn.Module, dict[str, LinearStats]], bool]


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs and stops the forward pass."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        self._sink = sink

    def __getattr__(self, name):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, hidden_states, *args, **kwargs):
        self._sink.append((hidden_states.detach().cpu(), args, kwargs))
        raise _StopForward


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, spec: ArchSpec | None = None):
    """Hidden states entering decoder layer 0 for every sample ([n, L, H], CPU) and the extra
    arguments the model passes its layers (captured at batch size 1; they broadcast over a chunk)."""
    spec = spec or spec_for(model)
    layers = decoder_layers(model, spec)
    sink: list = []
    original = layers[0]
    layers[0] = _Catcher(original, sink)
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(input_ids[i:i + 1], use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = original
    hidden = torch.cat([h for h, _, _ in sink])
    _, args, kwargs = sink[0]
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return hidden, args, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, args, kwargs, device, chunk: int) -> torch.Tensor:
    outs = []
    for start in range(0, hidden.shape[0], chunk):
        x = hidden[start:start + chunk].to(device)
        y = layer(x, *args, **kwargs)
        if isinstance(y, (tuple, list)):
            y = y[0]
        outs.append(y.to("cpu"))
    return torch.cat(outs)


@torch.no_grad()
def walk(model: nn.Module, input_ids: torch.Tensor | None, on_layer: OnLayer, *,
         needs: Iterable[str] = ("col_norm",), device: str | torch.device = "cpu", chunk: int = 8,
         sequential: bool = False, progress: Callable[[int, int], None] | None = None,
         stream=None, on_done: Callable[[int, nn.Module], None] | None = None) -> None:
    """Walk the decoder layers in order, calling `on_layer(index, layer, stats)` per (group of) linears.

    needs: which statistics to accumulate ("col_norm", "hessian"); empty means the method needs no
    data (magnitude), and the walk then runs no forward pass at all.
    sequential: prune the layer's linear groups one after another (each group calibrated on the
    outputs of the already-pruned groups), instead of all of a layer's linears from one pass.
    stream / on_done: see the module docstring; on_done(i, layer) runs once layer i is final (also in memory).
    """
    spec = spec_for(model)
    layers = decoder_layers(model, spec)
    needs = set(needs)
    n = len(layers)

    def finish(i, layer):
        if on_done is not None:
            on_done(i, layer)
        if stream is not None:
            stream.release_layer(layer)

    if not needs:
        for i, layer in enumerate(layers):
            if stream is not None:
                stream.load_layer(i, layer)
            on_layer(i, layer, {})
            finish(i, layer)
            if progress:
                progress(i + 1, n)
        return
    if input_ids is None:
        raise ValueError("this method needs calibration data")
    device = torch.device(device)
    if stream is not None:
        stream.materialize_residents()
    hidden, args, kwargs = capture_inputs(model, input_ids, spec)
    if stream is not None:
        stream.release_residents()   # the embeddings have done their work
    args, kwargs = _to(args, device), _to(kwargs, device)
    groups = spec.groups if sequential else (spec.linears,)
    for i, layer in enumerate(layers):
        if stream is not None:
            stream.load_layer(i, layer)
        layer.to(device)
        changed = False
        for group in groups:
            stats = {}
            hooks = []
            for name in group:
                lin = get_module(layer, name)
                stats[name] = LinearStats(lin.in_features, hessian="hessian" in needs, device=device)
                hooks.append(lin.register_forward_hook(lambda m, inp, out, s=stats[name]: s.add(inp[0])))
            try:
                outs = run_layer(layer, hidden, args, kwargs, device, chunk)
            finally:
                for h in hooks:
                    h.remove()
            changed = bool(on_layer(i, layer, stats)) or changed
        if changed:
            outs = run_layer(layer, hidden, args, kwargs, device, chunk)
        hidden = outs
        if device.type != "cpu":
            layer.to("cpu")
        finish(i, layer)
        if progress:
            progress(i + 1, n)
