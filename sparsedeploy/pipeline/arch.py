"""The torch side of the architecture table (sparsedeploy/arch.py): find a model's decoder layers and its
prunable linears. No module branches on the model type; the table says where everything lives."""
from __future__ import annotations

import torch.nn as nn

from ..arch import ARCHS, Arch, arch_for  # noqa: F401  (re-exported)

ArchSpec = Arch


def spec_for(model_or_config) -> Arch:
    return arch_for(model_or_config)


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def decoder_layers(model: nn.Module, spec: Arch | None = None) -> nn.ModuleList:
    spec = spec or spec_for(model)
    return get_module(model, spec.layers)


def layer_linears(layer: nn.Module, spec: Arch) -> dict[str, nn.Linear]:
    return {name: get_module(layer, name) for name in spec.linears}


def prunable_linears(model: nn.Module, spec: Arch | None = None) -> dict[str, nn.Linear]:
    """Every prunable linear of the model, keyed by its full parameter prefix (e.g. model.layers.3.mlp.up_proj)."""
    spec = spec or spec_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name, lin in layer_linears(layer, spec).items():
            out[f"{spec.layers}.{i}.{name}"] = lin
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} of the state-dict entries that are one tensor under several names (tied embeddings),
    first in state-dict order. Works on a `meta` skeleton too (it compares the parameters, not their storage)."""
    ids = {name: id(t) for name, t in list(model.named_parameters(remove_duplicate=False))
           + list(model.named_buffers(remove_duplicate=False))}
    first: dict[int, str] = {}
    out = {}
    for name in model.state_dict(keep_vars=True):
        key = ids.get(name)
        if key is None:
            continue
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out
