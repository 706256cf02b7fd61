"""`sparsedeploy synth PRESET --layers N --dtype bf16 --out DIR`: a SYNTHETIC full-depth Hugging Face folder.

Random weights with a real model's layer shapes (LLaMA2-7B, SmolLM2-135M, a tiny smoke-test shape), written decoder
layer by decoder layer into sharded safetensors (never the whole model in memory), with the default model's
tokenizer so real text can calibrate it. Labelled synthetic in config.json (`sparsedeploy_synthetic`), in every
shard's metadata and in a README.md; the label travels with the config into pruned models.

Vocabulary: the embeddings and lm_head take the tokenizer's size (SmolLM2's 49152 by default), not the original
model's (LLaMA2's 32000), so that every token id of real text exists. For llama2-7b that adds 2 × 17152 × 4096
≈ 141M parameters (≈ 0.28 GB in bf16) beside the decoder layers, which keep LLaMA2-7B's shapes exactly.

The weights are not trained, but they are not uniform either, so that Wanda, OWL and DLP have something to rank:
- per input channel, a log-normal scale spread (σ = 0.35) on every prunable linear's columns;
- a few outlier channels of the residual stream (≈ 1 per 700, at least 1): larger in the embedding and in the RMSNorm
  gains, by a factor that grows with depth (×4 in the first layer to ×16 in the last), as activation outliers
  grow with depth in trained LLMs; so the calibration activations entering q/k/v/gate/up have a few columns with
  much larger norms, and deeper layers have more outlier mass.
Each tensor is drawn from its own seeded generator: the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import check

# Shapes of real models (the decoder layers and heads); the vocabulary comes from the tokenizer (see the docstring).
PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_theta=10000.0, layers=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_theta=100000.0, layers=30, vocab_size=49152),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_theta=10000.0, layers=4, vocab_size=512),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CHANNEL_SIGMA = 0.35
OUTLIER_EVERY = 700
OUTLIER_FIRST, OUTLIER_LAST = 4.0, 16.0
STD = 0.02
MAX_SHARD_BYTES = 2_000_000_000


@dataclass
class SynthConfig:
    preset: str = "llama2-7b"
    layers: int | None = None        # None: the preset's depth
    dtype: str = "bf16"
    tokenizer: str = "smollm2-135m"  # any MODEL argument with a tokenizer
    seed: int = 0
    max_shard_bytes: int = MAX_SHARD_BYTES


def validate(cfg: SynthConfig) -> None:
    check(cfg.preset in PRESETS, f"unknown synthetic preset '{cfg.preset}'", f"use one of: {', '.join(PRESETS)}")
    check(cfg.layers is None or 1 <= cfg.layers <= 128, f"--layers {cfg.layers} must be between 1 and 128", "use e.g. --layers 32")
    check(cfg.dtype in DTYPES, f"unknown --dtype '{cfg.dtype}'", f"use one of: {', '.join(DTYPES)}")
    check(cfg.max_shard_bytes >= 1 << 16, f"shard size {cfg.max_shard_bytes} bytes is too small", "use e.g. --shard-gb 2")


def _gen(seed: int, *parts) -> "torch.Generator":
    import hashlib

    import torch

    h = int.from_bytes(hashlib.sha256(repr((seed,) + parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(h)


def outlier_channels(hidden: int, seed: int) -> list[int]:
    import torch

    n = max(1, hidden // OUTLIER_EVERY)
    return sorted(torch.randperm(hidden, generator=_gen(seed, "outliers"))[:n].tolist())


def depth_factor(i: int, layers: int) -> float:
    return OUTLIER_FIRST + (OUTLIER_LAST - OUTLIER_FIRST) * (i / max(layers - 1, 1))


def _tensor(name: str, shape: tuple[int, ...], *, seed: int, layer: int | None, layers: int, outliers: list[int],
            linears: set[str], layer_prefix: str, embed: str):
    """One tensor's fp32 values by its role: prunable linear, norm gain, embedding/lm_head, bias."""
    import torch

    g = _gen(seed, name)
    rel = name[len(layer_prefix):] if layer is not None else name
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:                       # a norm gain
        gain = torch.exp(0.1 * torch.randn(shape, generator=g))
        if shape[0] > max(outliers):
            gain[outliers] *= depth_factor(layer, layers) if layer is not None else OUTLIER_FIRST
        return gain
    w = torch.randn(shape, generator=g) * STD
    if layer is not None and rel.endswith(".weight") and rel[:-len(".weight")] in linears:
        w *= torch.exp(CHANNEL_SIGMA * torch.randn(shape[1], generator=_gen(seed, name, "cols")))
    elif name == f"{embed}.weight":
        w[:, outliers] *= OUTLIER_FIRST
    return w


def synth(cfg: SynthConfig, out: Path) -> dict:
    """Write the synthetic model folder to `out` (atomically: a temp folder renamed at the end)."""
    import torch

    from ..arch import arch_for
    from ..pipeline.models import _transformers, load_tokenizer, replace_dir, resolve
    from ..pipeline.stream import ShardWriter

    validate(cfg)
    out = Path(out)
    check(not out.exists() or not any(out.iterdir()), f"{out} exists and is not empty", "pass a new --out folder or remove it")
    shape = dict(PRESETS[cfg.preset])
    layers = cfg.layers or shape.pop("layers")
    shape.pop("layers", None)
    real_vocab = shape.pop("vocab_size")
    tok = load_tokenizer(resolve(cfg.tokenizer))
    vocab = len(tok)
    label = {"preset": cfg.preset, "layers": layers, "dtype": cfg.dtype, "seed": cfg.seed,
             "tokenizer": cfg.tokenizer, "vocab_size": vocab, "original_vocab_size": real_vocab,
             "note": "SYNTHETIC: random weights with real layer shapes, not a trained model; perplexity and "
                     "outputs are meaningless, speed and memory are real"}
    t = _transformers()
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    eos = tok.eos_token_id if tok.eos_token_id is not None else 2
    conf = t.LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, bos_token_id=bos, eos_token_id=eos,
                         dtype=DTYPES[cfg.dtype], **shape)
    conf.sparsedeploy_synthetic = label
    conf._name_or_path = f"synthetic-{cfg.preset}-{layers}L"
    with torch.device("meta"):
        skeleton = t.AutoModelForCausalLM.from_config(conf)
    spec = arch_for(conf)
    names = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    if conf.tie_word_embeddings:
        names = [(n, s) for n, s in names if n != f"{spec.lm_head}.weight"]
    del skeleton
    outliers = outlier_channels(shape["hidden_size"], cfg.seed)
    dtype = getattr(torch, DTYPES[cfg.dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = ShardWriter(tmp, cfg.max_shard_bytes, metadata={"sparsedeploy_synthetic": json.dumps(label)})
        params = 0
        for name, shp in names:   # the state dict's order: embedding, layer 0 … layer N-1, norm, lm_head
            layer = None
            prefix = f"{spec.layers}."
            if name.startswith(prefix):
                layer = int(name[len(prefix):].split(".")[0])
            lp = f"{spec.layers}.{layer}." if layer is not None else ""
            x = _tensor(name, shp, seed=cfg.seed, layer=layer, layers=layers, outliers=outliers,
                        linears=set(spec.linears), layer_prefix=lp, embed=spec.embed)
            writer.add(name, x.to(dtype))
            params += math.prod(shp)
            del x
        total = writer.close()
        conf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"# SYNTHETIC model: {cfg.preset} shapes, {layers} decoder layers, {cfg.dtype}\n\n"
            f"Made by `sparsedeploy synth {cfg.preset} --layers {layers} --dtype {cfg.dtype} --seed {cfg.seed}`. "
            f"{label['note']}.\nVocabulary {vocab} from the {cfg.tokenizer} tokenizer (the original model has {real_vocab}).\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "synthetic": label, "parameters": params, "bytes": total,
            "shards": len(list(out.glob("*.safetensors"))), "outlier_channels": outliers}
