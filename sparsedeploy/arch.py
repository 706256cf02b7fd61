"""Architectures as data: the one table that the pruning walker, the ONNX export and the native packer read.

An entry says where a decoder-only model keeps each tensor (names relative to the CausalLM's state dict and
to a decoder layer), which norm, activation and position scheme it uses, and which ONNX graph builder
exports it. Adding a Llama-family model is one entry (see QWEN2); a family with a quirk the engines must know
about says so in a field (QWEN3's per-head q/k norms), and an engine that lacks the quirk refuses the model
in one line (`native_unsupported`). No torch here: every layer, the engine included, may import this module.

Read by:
- pipeline/arch.py (torch): `groups` — the prunable linears of a layer, in the order their inputs appear;
- export/onnx_kv.py: `graph` — the KV-cache graph class for the family;
- engine/native: `stacks()` — how linears are stacked into one product each (q|k|v, gate|up, o, down), and
  the tensor names of norms, embeddings and positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    layers: str                      # prefix of decoder layer i: f"{layers}.{i}."
    embed: str
    final_norm: str
    lm_head: str
    norm: str                        # "rms" | "layer"
    attn_norm: str
    mlp_norm: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]          # (gate, up) for gated MLPs, (fc1,) otherwise
    down: str
    act: str                         # "silu_mul" | "relu"
    rope: bool
    graph: str                       # ONNX graph builder: "llama" | "opt"
    attn: str = "self_attn"          # the attention module (head geometry, q/k norms)
    qk_norm: bool = False            # per-head RMSNorm on q and k before rotary (Qwen3)
    positions: str | None = None     # learned position embedding (OPT), with this index offset
    position_offset: int = 0
    project_in: str | None = None
    project_out: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Prunable linears of one decoder layer, grouped in the order their inputs become available."""
        return ((self.q, self.k, self.v), (self.o,), self.mlp_in, (self.down,))

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def stacks(self) -> dict[str, tuple[str, ...]]:
        """The native engine's products per layer: stacked linears share one input."""
        return {"qkv": (self.q, self.k, self.v), "o": (self.o,), "up": self.mlp_in, "down": (self.down,)}


LLAMA = Arch(
    name="llama", model_types=("llama", "mistral"), layers="model.layers", embed="model.embed_tokens",
    final_norm="model.norm", lm_head="lm_head", norm="rms", attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", act="silu_mul",
    rope=True, graph="llama")

# Same module tree as Llama; q/k/v carry biases, which every reader takes from the state dict when present.
QWEN2 = Arch(**{**LLAMA.__dict__, "name": "qwen2", "model_types": ("qwen2",)})

QWEN3 = Arch(**{**LLAMA.__dict__, "name": "qwen3", "model_types": ("qwen3",), "qk_norm": True})

OPT = Arch(
    name="opt", model_types=("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm", lm_head="lm_head", norm="layer", attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    o="self_attn.out_proj", mlp_in=("fc1",), down="fc2", act="relu", rope=False, graph="opt",
    positions="model.decoder.embed_positions", position_offset=2,
    project_in="model.decoder.project_in", project_out="model.decoder.project_out")

ARCHS: tuple[Arch, ...] = (LLAMA, QWEN2, QWEN3, OPT)


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def arch_for(config) -> Arch:
    """The entry for a config (a dict such as config.json, or a transformers config / model), else UserError."""
    config = getattr(config, "config", config)
    model_type = _get(config, "model_type")
    for a in ARCHS:
        if model_type in a.model_types:
            return a
    known = ", ".join(t for a in ARCHS for t in a.model_types)
    raise UserError(f"unsupported architecture '{model_type}'",
                    f"supported model types: {known} (add an entry to sparsedeploy/arch.py)")


def rope_kind(config) -> str:
    rope = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    if not isinstance(rope, dict):
        rope = getattr(rope, "__dict__", {})
    return rope.get("rope_type", rope.get("type", "default")) or "default"


def rope_theta(config) -> float:
    """transformers 5 keeps it in rope_parameters; older configs at the top level."""
    rp = _get(config, "rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if _get(config, "rope_theta") is not None:
        return float(_get(config, "rope_theta"))
    raise UserError("config.json has no rope_theta (neither in rope_parameters nor at the top level)",
                    "re-export the model with its config")


def native_unsupported(config) -> str | None:
    """Why the native engine cannot run this model (None: it can). The ONNX engines run every entry."""
    a = arch_for(config)
    if a.qk_norm:
        return f"the native engine has no per-head q/k norms ({a.name})"
    if a.rope and rope_kind(config) != "default":
        return f"the native engine supports plain rotary positions, not rope_type '{rope_kind(config)}'"
    if a.act == "silu_mul" and _get(config, "hidden_act", "silu") != "silu":
        return f"the native engine has no '{_get(config, 'hidden_act')}' activation for gated MLPs"
    if a.name == "opt":
        if not _get(config, "do_layer_norm_before", True):
            return "the native engine supports pre-norm OPT only (do_layer_norm_before=true)"
        if _get(config, "activation_function", "relu") != "relu":
            return f"the native engine has no '{_get(config, 'activation_function')}' activation for OPT"
    return None


def native_arch(config) -> Arch:
    """The entry for a model the native engine runs, else one-line UserError."""
    a = arch_for(config)
    why = native_unsupported(config)
    if why is not None:
        raise UserError(why, "use --engine deepsparse or onnxruntime for this model")
    return a
