"""Export a Hugging Face causal LM as a KV-cache ONNX graph in the layout DeepSparse's text generation uses.

Graph interface (B = batch, L = tokens fed this call, S = total attention window, past = S - L):

    inputs   input_ids                  [B, L]        int64
             attention_mask             [B, S]        int64   1 = this column may be attended
             past_key_values.{i}.key    [B, Hkv, S-L, D] float32   (then .value, for every layer i)
             positions                  [B, L]        int64   absolute 0-based position of each fed token
             causal_mask                [B, 1, L, S]  int64   1 = query row may attend key column
    outputs  logits                     [B, L, V]     float32
             present.{i}.key / .value   [B, Hkv, S, D] float32  = concat(past, new) on axis 2

Key columns 0 .. S-L-1 are the cache slots, the last L columns are the fed tokens. The input order
(non-cache inputs input_ids, attention_mask, positions, causal_mask with causal_mask last; caches in
layer order, key before value) and the output order (logits, then presents in the same order as the
pasts) are what DeepSparse's pipeline relies on when it zips names with arrays.

Why the attention is written here rather than by calling the HF attention modules: the HF attention
code, its cache classes and its mask helpers change between transformers releases and some paths
(SDPA with `enable_gqa`, flash kernels, dynamic cache bookkeeping) do not trace into opset-14 ONNX.
So each architecture's decoder block is written out from its weights (names from arch.py, head
counts and rotary frequencies from the config and the model's own rotary module), while the simple
HF submodules (RMSNorm / LayerNorm, MLP, embeddings, lm_head) are reused as they are. Rotary
embeddings are applied to the keys before they are cached, so the attention is invariant to the
order of the cache slots: the decode loop may fill slots in any order as long as the masks say
which slots are valid (sparsedeploy/engine/decode.py uses that to avoid shifting the cache).

Masks are combined as causal_mask AND attention_mask (broadcast over rows), so either one alone is
enough to hide an empty slot; DeepSparse's own pipeline sets both consistently.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..pipeline.arch import ArchSpec, decoder_layers, get_module, spec_for

DEFAULT_OPSET = 14          # as SparseML's LLM exports; see export_onnx for why not newer
OPSETS = range(13, 19)
TWO_GB = 2 * 1024 ** 3
from ..engine.deployment import DEPLOY_FILES, DEPLOY_META, ONNX_NAME, read_deployment  # noqa: F401  (re-exported)


def cache_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), in the graph's order."""
    past, present = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past.append(f"past_key_values.{i}.{kind}")
            present.append(f"present.{i}.{kind}")
    return past, present


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past, present = cache_io_names(num_layers)
    return ["input_ids", "attention_mask", *past, "positions", "causal_mask"], ["logits", *present]


# ------------------------------------------------------------------------------------- attention
class _Attention:
    """Head geometry of one model, shared by every layer."""

    def __init__(self, config, attn_module: nn.Module):
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        if self.heads % self.kv_heads:
            raise UserError(f"{self.heads} attention heads are not a multiple of {self.kv_heads} key/value heads",
                            "this config is not a valid grouped-query attention model")
        self.groups = self.heads // self.kv_heads
        self.scaling = float(getattr(attn_module, "scaling", None) or self.head_dim ** -0.5)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, L, heads*D] -> [B, heads, L, D]"""
        b, l = x.shape[0], x.shape[1]
        return x.view(b, l, heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k_all, v_all, mask_bias, scale: float) -> torch.Tensor:
        """q [B,H,L,D], k_all/v_all [B,Hkv,S,D], mask_bias [B,1,G*L,S] additive (row g*L + l = query l) -> [B, L, H*D].

        Grouped-query attention without repeating the cache: query head h uses kv head h // G (as HF's
        repeat_kv does), so the G query heads of each kv head are stacked along the row axis and attend
        to that kv head with one plain 4-D matmul. Expanding K/V to H heads instead costs a copy of the
        whole cache per layer and step, which dominated DeepSparse's decode time (measured on SmolLM2)."""
        b, l = q.shape[0], q.shape[2]
        g = self.groups
        if g > 1:
            q = q.reshape(b, self.kv_heads, g * l, self.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3))
        if scale != 1.0:
            scores = scores * scale
        probs = torch.softmax(scores + mask_bias, dim=-1)
        out = torch.matmul(probs, v_all)                   # [B, Hkv, G*L, D]
        if g > 1:
            out = out.reshape(b, self.heads, l, self.head_dim)
        return out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --------------------------------------------------------------------------------- architectures
class _Graph(nn.Module):
    """What every architecture's graph holds: the model, its decoder layers, head geometry, embeddings."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.layers = decoder_layers(model, spec)
        self.att = _Attention(model.config, get_module(self.layers[0], spec.attn))
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()


class _LlamaGraph(_Graph):
    """Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3): pre-norm blocks, rotary positions, GQA."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        super().__init__(model, spec)
        cfg = model.config
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.norm = base.norm
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise UserError(f"{spec.name} model without a rotary embedding module", "this export supports HF rotary models only")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type == "dynamic":
            raise UserError("dynamic RoPE scaling cannot be exported to a static graph", "use a model with static rope scaling")
        # inv_freq already includes any static scaling (linear, llama3, yarn); attention_scaling scales cos/sin.
        # cos/sin come from a table gathered by position: DeepSparse 1.8 has no Cos/Sin kernels (they ran
        # outside its engine), and the table holds exactly HF's float32 values. Positions beyond
        # max_position_embeddings are out of the table; the decode loop refuses them up front.
        inv_freq = rotary.inv_freq.detach().float().cpu()
        scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        n_pos = int(getattr(cfg, "max_position_embeddings", None) or 8192)
        freqs = torch.arange(n_pos, dtype=torch.int64)[:, None].float() * inv_freq      # HF's formula, per position
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos() * scale, persistent=False)          # [P, D]
        self.register_buffer("rope_sin", emb.sin() * scale, persistent=False)

    def forward(self, input_ids, positions, mask_bias, pasts):
        h = self.embed(input_ids)
        cos = F.embedding(positions, self.rope_cos).unsqueeze(1)          # [B, 1, L, D]
        sin = F.embedding(positions, self.rope_sin).unsqueeze(1)
        spec, att = self.spec, self.att
        presents = []
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            attn = get_module(layer, spec.attn)
            q = att.split(get_module(layer, spec.q)(x), att.heads)
            k = att.split(get_module(layer, spec.k)(x), att.kv_heads)
            v = att.split(get_module(layer, spec.v)(x), att.kv_heads)
            if spec.qk_norm:                                               # Qwen3: per-head RMSNorm before rope
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k_all = torch.cat((pasts[2 * i], k), dim=2)
            v_all = torch.cat((pasts[2 * i + 1], v), dim=2)
            presents += [k_all, v_all]
            a = att.attend(q, k_all, v_all, mask_bias, att.scaling)
            h = h + get_module(layer, spec.o)(a)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)), presents

    def head(self, input_ids):
        """Everything outside the decoder layers (embedding, final norm, lm_head): timed alone by the bench."""
        return self.lm_head(self.norm(self.embed(input_ids)))


class _OPTGraph(_Graph):
    """OPT: learned positions (offset 2), pre- or post-LayerNorm blocks, optional in/out projections."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        super().__init__(model, spec)
        cfg = model.config
        dec = model.model.decoder
        self.pos = dec.embed_positions
        self.pos_offset = int(getattr(dec.embed_positions, "offset", 2))
        self.project_in = dec.project_in
        self.project_out = dec.project_out
        self.final_norm = dec.final_layer_norm
        self.pre_norm = bool(cfg.do_layer_norm_before)

    def forward(self, input_ids, positions, mask_bias, pasts):
        h = self.embed(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + F.embedding(positions + self.pos_offset, self.pos.weight)
        spec, att = self.spec, self.att
        presents = []
        for i, layer in enumerate(self.layers):
            res = h
            x = layer.self_attn_layer_norm(h) if self.pre_norm else h
            q = att.split(get_module(layer, spec.q)(x) * att.scaling, att.heads)   # OPT scales q before the product
            k = att.split(get_module(layer, spec.k)(x), att.kv_heads)
            v = att.split(get_module(layer, spec.v)(x), att.kv_heads)
            k_all = torch.cat((pasts[2 * i], k), dim=2)
            v_all = torch.cat((pasts[2 * i + 1], v), dim=2)
            presents += [k_all, v_all]
            h = res + get_module(layer, spec.o)(att.attend(q, k_all, v_all, mask_bias, 1.0))
            if not self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            res = h
            x = layer.final_layer_norm(h) if self.pre_norm else h
            h = res + layer.fc2(layer.activation_fn(layer.fc1(x)))
            if not self.pre_norm:
                h = layer.final_layer_norm(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h), presents

    def head(self, input_ids):
        h = self.embed(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)


GRAPHS = {"llama": _LlamaGraph, "opt": _OPTGraph}          # keyed by the table's `graph` field (sparsedeploy/arch.py)


class KVCacheLM(nn.Module):
    """The exported module: DeepSparse's KV-cache signature around a HF causal LM (weights shared, not copied)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        spec = spec_for(model)
        if spec.graph not in GRAPHS:
            raise UserError(f"no ONNX KV-cache graph '{spec.graph}' for architecture '{spec.name}'",
                            "add one to GRAPHS in sparsedeploy/export/onnx_kv.py")
        self.spec = spec
        self.graph = GRAPHS[spec.graph](model, spec)
        self.num_layers = len(self.graph.layers)
        att = self.graph.att
        self.kv_heads, self.head_dim = att.kv_heads, att.head_dim
        self.input_names, self.output_names = io_names(self.num_layers)

    def forward(self, input_ids, attention_mask, *rest):
        pasts, positions, causal_mask = rest[:-2], rest[-2], rest[-1]
        allowed = causal_mask * attention_mask.unsqueeze(1).unsqueeze(1)          # [B,1,L,S] int64
        g = self.graph.att.groups
        if g > 1:   # one mask row per grouped query row (see _Attention.attend). Expand+Reshape: DeepSparse
            # runs it natively, while Tile falls out of its engine and Concat of copies aborted its compiler.
            allowed = allowed.expand(-1, g, -1, -1).reshape(allowed.shape[0], 1, -1, allowed.shape[3])
        mask_bias = (1 - allowed).to(torch.float32) * torch.finfo(torch.float32).min
        logits, presents = self.graph(input_ids, positions, mask_bias, pasts)
        return (logits, *presents)

    def example_inputs(self, seq_len: int = 2, past_len: int = 3, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs in graph order, right-aligned the way DeepSparse fills them (all slots valid here)."""
        total = past_len + seq_len
        ids = torch.randint(0, 8, (batch, seq_len), dtype=torch.int64)
        attn = torch.ones(batch, total, dtype=torch.int64)
        pasts = [torch.zeros(batch, self.kv_heads, past_len, self.head_dim) for _ in range(2 * self.num_layers)]
        positions = torch.arange(past_len, total, dtype=torch.int64).expand(batch, seq_len).contiguous()
        causal = torch.ones(batch, 1, seq_len, total, dtype=torch.int64)
        causal[:, :, :, past_len:] = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.int64))
        return (ids, attn, *pasts, positions, causal)


class _Head(nn.Module):
    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, input_ids):
        return self.graph.head(input_ids)


HEAD_NAME = "head.onnx"


def export_head(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """The non-decoder part of one decode step (embedding row, final norm, lm_head) as its own graph
    `input_ids [1, 1] -> logits`, so the bench can split a step into decoder-layer time and the rest."""
    import onnx

    path = Path(path)
    fmodel = _float32_model(model)
    head = _Head(KVCacheLM(fmodel).graph).eval()
    with tempfile.TemporaryDirectory(prefix=".onnx-head-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(head, (torch.zeros(1, 1, dtype=torch.int64),), str(raw), input_names=["input_ids"],
                              output_names=["logits"], opset_version=int(opset), do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw))
        nbytes = sum(p.numel() * 4 for p in head.parameters())
        files = _save(proto, Path(tmp) / path.name, nbytes > TWO_GB * 0.9)
        for name in files:
            os.replace(Path(tmp) / name, path.parent / name)
    return path


# ------------------------------------------------------------------------------------------ export
def _float32_model(model: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _linear_digests(model: nn.Module) -> dict[tuple[tuple[int, ...], str], str]:
    """(shape, digest) of every nn.Linear weight as the exporter may store it (W for Gemm, W^T for MatMul) -> name."""
    out: dict[tuple[tuple[int, ...], str], str] = {}
    seen: set[tuple[tuple[int, ...], str]] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach().to(torch.float32).cpu()
        for arr in (w.t().contiguous(), w.contiguous()):
            key = (tuple(arr.shape), _digest(arr.numpy().tobytes()))
            if key in seen:
                out.pop(key, None)          # two linears with identical weights: ambiguous, keep exporter name
                continue
            seen.add(key)
            out[key] = name
    return out


def _weight_initializer(node, inits: dict) -> str | None:
    """Name of the constant weight feeding a MatMul/Gemm as input B (the exporter folds W^T into one)."""
    if len(node.input) < 2:
        return None
    return node.input[1] if node.input[1] in inits else None


def _rename_linear_weights(model_proto, digests: dict) -> int:
    """Give folded MatMul/Gemm weight initializers their torch names (`<linear>.weight`); returns how many."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits)
    renamed: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        wname = _weight_initializer(node, inits)
        if wname is None or wname in renamed:
            continue
        arr = numpy_helper.to_array(inits[wname])
        if arr.ndim != 2 or arr.dtype.kind != "f":
            continue
        linear = digests.get((tuple(arr.shape), _digest(arr.astype("float32").tobytes())))
        if linear is None:
            continue
        new = f"{linear}.weight"
        if new in taken and new != wname:
            new = f"{linear}.weight.matmul"
        if new in taken and new != wname:
            continue
        renamed[wname] = new
        taken.add(new)
    linears = len(renamed)
    # The remaining parameters carry the wrapper's prefix: drop it so names read like the torch model's.
    prefix = "graph.model."
    for name in list(inits):
        if name not in renamed and name.startswith(prefix) and name[len(prefix):] not in taken:
            renamed[name] = name[len(prefix):]
            taken.add(renamed[name])
    for t in graph.initializer:
        if t.name in renamed:
            t.name = renamed[t.name]
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in renamed:
                node.input[j] = renamed[name]
    return linears


def _dynamic_axes(num_layers: int) -> dict:
    past, present = cache_io_names(num_layers)
    axes = {"input_ids": {0: "batch", 1: "input_len"}, "positions": {0: "batch", 1: "input_len"},
            "attention_mask": {0: "batch", 1: "total_len"}, "causal_mask": {0: "batch", 2: "input_len", 3: "total_len"},
            "logits": {0: "batch", 1: "input_len"}}
    axes.update({n: {0: "batch", 2: "past_len"} for n in past})
    axes.update({n: {0: "batch", 2: "total_len"} for n in present})
    return axes


def _save(model_proto, path: Path, external: bool) -> list[str]:
    """Save to `path` (+ `<stem>.data` when external). Returns the file names written."""
    import onnx

    data_name = f"{path.stem}.data"
    (path.parent / data_name).unlink(missing_ok=True)    # onnx appends to an existing data file
    if external:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path.name, data_name]
    onnx.save_model(model_proto, str(path))
    return [path.name]


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None) -> dict:
    """Export `model` (Llama family or OPT) as a KV-cache ONNX graph at `path`.

    opset: 13-18, 14 by default. Measured with DeepSparse 1.8: from 17 on, LayerNorm is exported as
        LayerNormalization, which DeepSparse does not run natively (OPT: 90% of ops supported instead of
        100%); at 19, ops that fall outside its engine fail to load in its bundled ONNX Runtime 1.15.
    external_data: None = only when the weights exceed 2 GB (protobuf's limit); True/False forces it.
        External weights go to one file `<stem>.data` next to `path`.
    Returns metadata: arch, num_layers, num_kv_heads, num_heads, head_dim, vocab_size, hidden_size,
    input_names, output_names, opset, files (names written next to `path`), renamed_weights.
    """
    import onnx

    if int(opset) not in OPSETS:
        raise UserError(f"opset {opset} is not supported", f"use an opset from {OPSETS[0]} to {OPSETS[-1]} (default {DEFAULT_OPSET})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    fmodel = _float32_model(model)
    wrapper = KVCacheLM(fmodel).eval()
    nbytes = sum(p.numel() * 4 for p in fmodel.parameters())
    external = nbytes > TWO_GB * 0.9 if external_data is None else bool(external_data)
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, wrapper.example_inputs(), str(raw), input_names=wrapper.input_names,
                              output_names=wrapper.output_names, dynamic_axes=_dynamic_axes(wrapper.num_layers),
                              opset_version=int(opset), do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw))              # pulls in any external tensors the exporter scattered
        renamed = _rename_linear_weights(proto, _linear_digests(fmodel))
        max_pos = getattr(fmodel.config, "max_position_embeddings", None)
        if max_pos:     # positions index OPT's learned table and the rope table: the runtimes read this limit
            onnx.helper.set_model_props(proto, {"sparsedeploy.max_positions": str(int(max_pos)),
                                                "sparsedeploy.arch": wrapper.spec.name})
        staged = Path(tmp) / path.name
        files = _save(proto, staged, external)
        del proto
        for name in files:
            os.replace(Path(tmp) / name, path.parent / name)
        if not external:
            (path.parent / f"{path.stem}.data").unlink(missing_ok=True)
    if was_training:
        model.train()
    cfg = fmodel.config
    return {"arch": wrapper.spec.name, "num_layers": wrapper.num_layers, "num_kv_heads": wrapper.kv_heads,
            "num_heads": wrapper.graph.att.heads, "head_dim": wrapper.head_dim, "vocab_size": int(cfg.vocab_size),
            "hidden_size": int(cfg.hidden_size), "input_names": list(wrapper.input_names),
            "output_names": list(wrapper.output_names), "opset": int(opset), "files": files,
            "renamed_weights": renamed}


# ------------------------------------------------------------------------------------- deployment
def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _write_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        raise UserError("no tokenizer to deploy", "load the model's tokenizer (AutoTokenizer) and pass it")
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            raise UserError("the tokenizer has no tokenizer.json (a slow tokenizer)",
                            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        backend.save(str(out / "tokenizer.json"))
    if not (out / "special_tokens_map.json").is_file():          # transformers 5 no longer writes it
        special = {k: (str(v) if not isinstance(v, list) else [str(x) for x in v])
                   for k, v in tokenizer.special_tokens_map.items()}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    if not (out / "tokenizer_config.json").is_file():
        raise UserError("the tokenizer did not write tokenizer_config.json", "save it with a transformers tokenizer")


def write_deployment(model: nn.Module, tokenizer, out_dir: str | Path, *, seqlen: int = 512,
                     opset: int = DEFAULT_OPSET, external_data: bool | None = None, head: bool = False,
                     extra_meta: dict | None = None, check=None) -> Path:
    """Write DeepSparse's deployment folder for `model`: model.onnx (+ model.data), config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and sparsedeploy.json (export metadata; `seqlen` = the
    cache's total length S the runtimes are compiled for). Written into a temporary sibling folder and renamed
    into place, so `out_dir` is either the old folder or the complete new one. Returns `out_dir`.
    head: also write head.onnx (embedding + final norm + lm_head alone, for the bench's time split).
    extra_meta: merged into sparsedeploy.json. check(tmp_dir, meta): called on the staged folder before it is
    renamed into place; raising there (e.g. a failed verification) leaves the old folder untouched."""
    out_dir = Path(out_dir)
    if not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen {seqlen!r} is too short", "use e.g. seqlen=512 (prompt + generated tokens)")
    maxpos = _max_positions(model.config)
    if maxpos is not None and seqlen > maxpos:
        raise UserError(f"seqlen {seqlen} exceeds the model's {maxpos} positions", f"use seqlen <= {maxpos}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder", "choose another deployment folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / DEPLOY_META).is_file():
        raise UserError(f"{out_dir} is a non-empty folder that is not a deployment",
                        "choose a new folder (only earlier deployments are replaced)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        meta = export_onnx(model, tmp / ONNX_NAME, opset=opset, external_data=external_data)
        model.config.to_json_file(str(tmp / "config.json"))
        _write_tokenizer(tokenizer, tmp)
        meta.update({"seqlen": seqlen, "max_positions": maxpos, "model_type": model.config.model_type})
        if head:
            export_head(model, tmp / HEAD_NAME, opset=opset)
            meta["head"] = HEAD_NAME
        meta.update(extra_meta or {})
        (tmp / DEPLOY_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if check is not None:
            meta.update(check(tmp, meta) or {})
        (tmp / DEPLOY_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
