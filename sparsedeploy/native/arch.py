"""The native engine's view of an architecture, as data (no torch): where each tensor of a decoder-only
model lives in its safetensors names, which norm / activation / position scheme it uses.

`linears` groups a decoder layer's linears the way the engine runs them: q|k|v stacked into one matrix
(one product per token), gate|up stacked, then o and down. Adding a model type means adding an entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class NativeArch:
    name: str
    model_types: tuple[str, ...]
    layers: str                      # prefix of decoder layer i: f"{layers}.{i}."
    embed: str
    final_norm: str
    lm_head: str
    norm: str                        # "rms" | "layer"
    attn_norm: str
    mlp_norm: str
    qkv: tuple[str, str, str]
    o: str
    up: tuple[str, ...]              # (gate, up) for gated MLPs, (fc1,) otherwise
    down: str
    act: str                         # "silu_mul" | "relu"
    rope: bool
    positions: str | None = None     # learned position embedding (OPT), with this index offset
    position_offset: int = 0
    project_in: str | None = None
    project_out: str | None = None

    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"qkv": self.qkv, "o": (self.o,), "up": self.up, "down": (self.down,)}


LLAMA = NativeArch(
    name="llama", model_types=("llama", "mistral", "qwen2"), layers="model.layers", embed="model.embed_tokens",
    final_norm="model.norm", lm_head="lm_head", norm="rms", attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o="self_attn.o_proj", up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", act="silu_mul", rope=True)

OPT = NativeArch(
    name="opt", model_types=("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm", lm_head="lm_head", norm="layer", attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o="self_attn.out_proj", up=("fc1",), down="fc2", act="relu", rope=False,
    positions="model.decoder.embed_positions", position_offset=2,
    project_in="model.decoder.project_in", project_out="model.decoder.project_out")

ARCHS = (LLAMA, OPT)


def native_arch(config: dict) -> NativeArch:
    mt = config.get("model_type")
    for a in ARCHS:
        if mt in a.model_types:
            break
    else:
        known = ", ".join(t for a in ARCHS for t in a.model_types)
        raise UserError(f"the native engine does not support model type '{mt}'",
                        f"use --engine deepsparse or onnxruntime (native supports: {known})")
    if a.name == "llama":
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind not in (None, "default"):
            raise UserError(f"the native engine supports plain rotary positions, not rope_type '{kind}'",
                            "use --engine deepsparse or onnxruntime for this model")
        if config.get("hidden_act", "silu") != "silu":
            raise UserError(f"the native engine has no '{config.get('hidden_act')}' activation for Llama-style MLPs",
                            "use --engine deepsparse or onnxruntime")
    if a.name == "opt":
        if not config.get("do_layer_norm_before", True):
            raise UserError("the native engine supports pre-norm OPT only (do_layer_norm_before=true)",
                            "use --engine deepsparse or onnxruntime for this model")
        if config.get("activation_function", "relu") != "relu":
            raise UserError(f"the native engine has no '{config.get('activation_function')}' activation for OPT",
                            "use --engine deepsparse or onnxruntime")
    return a


def rope_theta(config: dict) -> float:
    """transformers 5 keeps it in rope_parameters; older configs at the top level."""
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    if "rope_theta" in config:
        return float(config["rope_theta"])
    raise UserError("config.json has no rope_theta (neither in rope_parameters nor at the top level)",
                    "re-export the model with its config")
