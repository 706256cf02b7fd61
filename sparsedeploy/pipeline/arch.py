"""Architectures as data: where a model keeps its decoder layers and which linears are prunable.

Adding an architecture means adding one `ArchSpec` to `ARCHS`; no other module branches on the
model type. `groups` lists the prunable linears of one decoder layer (paths relative to the layer)
in the order their inputs become available, so a "true sequential" walk can prune group by group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str                      # attribute path from the CausalLM to the decoder-layer list
    groups: tuple[tuple[str, ...], ...]
    # Names used by the ONNX export / native runtime (relative to a decoder layer).
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


LLAMA = ArchSpec(
    name="llama",
    # Llama-style decoders share one module tree: SmolLM2 is Llama; Mistral and Qwen2 add only
    # sliding windows / biases, which the tree does not see.
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    o="self_attn.out_proj",
)

ARCHS: tuple[ArchSpec, ...] = (LLAMA, OPT)


def spec_for(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in ARCHS for t in s.model_types)
    raise UserError(f"unsupported architecture '{model_type}'",
                    f"supported model types: {known} (add an ArchSpec in sparsedeploy/pipeline/arch.py)")


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or spec_for(model)
    return get_module(model, spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    return {name: get_module(layer, name) for name in spec.linears}


def prunable_linears(model: nn.Module, spec: ArchSpec | None = None) -> dict[str, nn.Linear]:
    """Every prunable linear of the model, keyed by its full parameter prefix (e.g. model.layers.3.mlp.up_proj)."""
    spec = spec or spec_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name, lin in layer_linears(layer, spec).items():
            out[f"{spec.layers}.{i}.{name}"] = lin
    return out
