"""Torch -> GGUF: a (pruned or dense) Llama-family model, tokenizer included, for llama.cpp / ollama / LM Studio.

    path = export_gguf("runs/default", qtype="q4_0")      # -> runs/default/deployment-gguf/model-q4_0.gguf

What is written (the keys and names llama.cpp's `llama` architecture reads):
- general.*: architecture "llama", name, file_type; llama.*: context/embedding/feed-forward lengths, block
  and head counts, rope base and dimension, RMS epsilon, vocabulary size;
- tensors token_embd, output_norm, output (absent when the embeddings are tied: llama.cpp then reuses
  token_embd), and per block attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
  ffn_down. Transformers' Llama rotates the two halves of each head (rotate_half); ggml's rope rotates
  adjacent pairs, so the rows of q and k are reordered per head (`permute_qk`; `unpermute_qk` undoes it);
- tokenizer.ggml.*: a byte-level BPE ("gpt2") vocabulary with its pre-tokenizer name, tokens, token types
  (normal / control for special added tokens / user-defined), merges, and bos/eos/unk/pad ids.

Types: f32 and f16 store every matrix so; q8_0 / q4_0 / q4_1 (ggml's 32-weight blocks, gguf.quants) store the
decoder linears in that type and the embedding/output matrices in q8_0 (as llama.cpp's own quantizer keeps
them above 4 bits); norms stay f32; a matrix whose rows are not a multiple of 32 falls back to f16.

Verification before the file is renamed into place: the file is read back with the gguf reader (every tensor
there, dequantized and un-permuted equal to the torch weight: exactly for f32, within the type's rounding
otherwise); where llama.cpp is built (scripts/build-llamacpp.sh), its greedy tokens for a fixed prompt are
compared with PyTorch's (f32: must be equal; other types: the agreement is reported), and for quantized
types llama.cpp's perplexity (llama-perplexity) is reported next to PyTorch's on the same text and windows.
The results go to model-<type>.json beside the file.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from .. import ui
from ..arch import arch_for, rope_kind, rope_theta
from ..errors import UserError, check

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
GGUF_DIR = "deployment-gguf"
BLOCK = 32


def default_out(source: str, qtype: str) -> Path:
    from .stage import default_out as onnx_out

    return onnx_out(source).parent / GGUF_DIR / f"model-{qtype}.gguf"


def check_type(qtype: str) -> str:
    t = str(qtype).lower()
    check(t in TYPES, f"unknown GGUF type '{qtype}'", f"use one of: {', '.join(TYPES)}")
    return t


# ------------------------------------------------------------------------------------------- tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate_half row order -> ggml's interleaved pairs, per head (rows = n_head * head_dim)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _ggml_types():
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
            "q4_1": F.MOSTLY_Q4_1}[qtype]


def _encode(w: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """(data for the writer, the type actually stored)."""
    if w.ndim == 1 or kind == "f32":
        return np.ascontiguousarray(w, dtype=np.float32), "f32"
    if kind != "f16" and w.shape[-1] % BLOCK:
        kind = "f16"
    if kind == "f16":
        return np.ascontiguousarray(w, dtype=np.float16), "f16"
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _ggml_types()[kind]), kind


def _tensor_plan(model_or_config) -> list[tuple[str, str, str]]:
    """(gguf name, state-dict name, role) in file order; role: 'embed' | 'output' | 'norm' | 'linear' | 'q' | 'k'."""
    cfg = getattr(model_or_config, "config", model_or_config)
    spec = arch_for(cfg)
    plan = [("token_embd.weight", f"{spec.embed}.weight", "embed"),
            ("output_norm.weight", f"{spec.final_norm}.weight", "norm")]
    if not getattr(cfg, "tie_word_embeddings", False):
        plan.append(("output.weight", f"{spec.lm_head}.weight", "output"))
    names = {"attn_norm": (spec.attn_norm, "norm"), "attn_q": (spec.q, "q"), "attn_k": (spec.k, "k"),
             "attn_v": (spec.v, "linear"), "attn_output": (spec.o, "linear"), "ffn_norm": (spec.mlp_norm, "norm"),
             "ffn_gate": (spec.mlp_in[0], "linear"), "ffn_up": (spec.mlp_in[1], "linear"),
             "ffn_down": (spec.down, "linear")}
    for i in range(cfg.num_hidden_layers):
        for g, (hf, role) in names.items():
            plan.append((f"blk.{i}.{g}.weight", f"{spec.layers}.{i}.{hf}.weight", role))
    return plan


def check_supported(model, names=None) -> None:
    """One-line UserError unless llama.cpp's `llama` architecture runs this model as it is. model: a model, or a
    config with `names` (its tensor names, e.g. a model folder's)."""
    cfg = getattr(model, "config", model)
    spec = arch_for(cfg)
    if spec.name != "llama":
        raise UserError(f"GGUF export supports the Llama family (llama, mistral), not '{cfg.model_type}'",
                        "export ONNX instead (--format onnx)")
    if rope_kind(cfg) != "default":
        raise UserError(f"GGUF export supports plain rotary positions, not rope_type '{rope_kind(cfg)}'",
                        "export ONNX instead (--format onnx)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export supports the silu activation, not '{cfg.hidden_act}'", "export ONNX instead")
    if any(k.endswith(".bias") for k in (names if names is not None else model.state_dict())):
        raise UserError("the model's linears carry biases, which llama.cpp's llama architecture lacks",
                        "export ONNX instead (--format onnx)")


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("the tokenizer is not a fast (tokenizer.json) tokenizer", "save the model with a fast tokenizer")
    return json.loads(backend.to_str())


def pre_tokenizer_name(doc: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (byte-level BPE only), or UserError."""
    pre = doc.get("pre_tokenizer") or {}

    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if byte_level(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"                      # digits split one by one, then GPT-2's byte-level regex
    raise UserError(f"unsupported pre-tokenizer {json.dumps(pre)[:80]} for GGUF export",
                    "GGUF export handles byte-level BPE tokenizers (GPT-2 style, SmolLM); export ONNX instead")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.* values for a byte-level BPE tokenizer."""
    from gguf import TokenType

    doc = _tokenizer_json(tokenizer)
    model = doc.get("model") or {}
    if model.get("type") == "WordLevel":
        # a whole-word vocabulary (the synthetic models' "t0 t1 …" tokens): written as a BPE vocabulary without
        # merges, so llama.cpp maps ids to the same strings; the ids are what a benchmark feeds it
        pre = "default"
    elif model.get("type") == "BPE":
        pre = pre_tokenizer_name(doc)
    else:
        raise UserError(f"GGUF export handles BPE tokenizers, not {model.get('type')}", "export ONNX instead")
    vocab = dict(model.get("vocab") or {})
    added = {int(a["id"]): a for a in doc.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    check(max(by_id) < vocab_size, f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} rows",
          "save the model with its own tokenizer")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(TokenType.NORMAL if a is None else TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:      # llama.cpp requires the key and the writer drops an empty array: one inert merge
        first = by_id[min(by_id)]
        merges = [f"{first[:1]} {first[1:] or first}"]

    def tid(tok):
        return None if tok is None else vocab.get(str(tok))

    ids = [int(t) for t in tokenizer("a", add_special_tokens=True)["input_ids"]]
    plain = [int(t) for t in tokenizer("a", add_special_tokens=False)["input_ids"]]
    bos = tid(getattr(tokenizer, "bos_token", None))
    return {"pre": pre, "tokens": tokens, "types": [int(t) for t in types], "merges": merges,
            "bos": bos, "eos": tid(getattr(tokenizer, "eos_token", None)),
            "unk": tid(getattr(tokenizer, "unk_token", None)), "pad": tid(getattr(tokenizer, "pad_token", None)),
            "add_bos": bos is not None and len(ids) > len(plain) and ids[0] == bos,
            "chat_template": getattr(tokenizer, "chat_template", None)}


# ------------------------------------------------------------------------------------------- writing
def write_gguf(model, tokenizer, path: str | Path, qtype: str = "f32", *, name: str | None = None) -> dict:
    """Write the GGUF file at `path` (as given: callers rename a temp name into place). Returns what was
    stored: {"types": {stored type: tensor count}, "tensors": n}."""
    import torch

    sd = model.state_dict()
    check_supported(model)
    return write_gguf_streamed(model.config, lambda hf: sd[hf].detach().to(torch.float32).cpu().numpy(),
                               {k: tuple(v.shape) for k, v in sd.items()}, tokenizer, path, qtype, name=name)


def _stored_kind(shape: tuple[int, ...], kind: str) -> str:
    """The type _encode stores a tensor of this shape as, asked for `kind`."""
    if len(shape) == 1 or kind == "f32":
        return "f32"
    return "f16" if kind != "f16" and shape[-1] % BLOCK else kind


def write_gguf_streamed(cfg, get, shapes: dict, tokenizer, path: str | Path, qtype: str = "f32", *,
                        name: str | None = None) -> dict:
    """The GGUF writer: header and tensor table from the shapes alone, then each tensor read (`get(hf name)` ->
    float32 array), encoded and written in turn, so only one tensor is ever in memory (a 7B model folder streams
    through). cfg: the model's config; shapes: {hf name: shape}. Returns {"types": {stored type: count}, "tensors": n}."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    qtype = check_type(qtype)
    check_supported(cfg, list(shapes))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    spec = arch_for(cfg)
    vocab_size = int(shapes[f"{spec.embed}.weight"][0])
    tok = tokenizer_fields(tokenizer, vocab_size)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    w.add_name(name or str(getattr(cfg, "_name_or_path", "") or "model"))
    w.add_file_type(int(_file_type(qtype)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab_size)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            fn(int(tok[key]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(False)
    if isinstance(tok["chat_template"], str) and tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    big = "q8_0" if qtype in ("q4_0", "q4_1") else qtype
    plan = []
    types = _ggml_types()
    for gname, hf, role in _tensor_plan(cfg):
        if hf not in shapes:
            raise UserError(f"the model has no tensor {hf}", "pass a complete model")
        shape = tuple(int(d) for d in shapes[hf])
        kind = _stored_kind(shape, "f32" if role == "norm" else big if role in ("embed", "output") else qtype)
        if kind in ("f32", "f16"):
            dt, stored_shape = np.dtype(np.float32 if kind == "f32" else np.float16), shape
        else:                                     # quantised blocks: bytes per row, as quants.quantize returns them
            dt, stored_shape = np.dtype(np.uint8), quant_shape_to_byte_shape(shape, types[kind])
        w.add_tensor_info(gname, stored_shape, dt, dt.itemsize * int(np.prod(stored_shape)), raw_dtype=types[kind])
        plan.append((gname, hf, role, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    stored: dict[str, int] = {}
    for gname, hf, role, kind in plan:
        t = get(hf)
        if role == "q":
            t = permute_qk(t, n_head)
        elif role == "k":
            t = permute_qk(t, n_kv)
        data, got = _encode(t, kind)
        del t
        assert got == kind, (gname, got, kind)
        stored[kind] = stored.get(kind, 0) + 1
        w.write_tensor_data(data)
        del data
    w.close()
    return {"types": stored, "tensors": sum(stored.values())}


def write_gguf_from_folder(model_dir: str | Path, path: str | Path, qtype: str = "q4_0", *,
                           magnitude: float | None = None) -> dict:
    """A GGUF of a Hugging Face folder's weights, streamed tensor by tensor from its (sharded) safetensors (the
    llama.cpp peer of a full-depth model that does not fit in memory in float32), optionally magnitude-pruned as
    export.native.FolderSource reads it (the same weights as the native-only deployment's). Written to a temp
    name, renamed into place; unverified (llama.cpp's own check needs the model in PyTorch)."""
    import os

    from ..pipeline.models import _transformers
    from .native import FolderSource

    path = Path(path)
    src = FolderSource(model_dir, magnitude)
    t = _transformers()
    cfg = t.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    tokenizer = t.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    shapes = {k: v[1] for k, v in src.src.meta().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        doc = write_gguf_streamed(cfg, src.get, shapes, tokenizer, tmp, qtype,
                                  name=str(getattr(cfg, "_name_or_path", "") or Path(model_dir).name))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return doc


# ------------------------------------------------------------------------------------------- reading back
def read_weights(path: str | Path, model) -> dict[str, np.ndarray]:
    """The GGUF file's tensors as the torch state-dict names, dequantized to fp32 and un-permuted."""
    from gguf import GGUFReader, quants

    cfg = model.config
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for gname, hf, role in _tensor_plan(model):
        if gname not in tensors:
            raise UserError(f"{path} lacks the tensor {gname}", "re-export it")
        t = tensors[gname]
        a = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if role == "q":
            a = unpermute_qk(a, n_head)
        elif role == "k":
            a = unpermute_qk(a, n_kv)
        out[hf] = a
    return out


def gguf_perplexity(path: str | Path, source: str, ecfg) -> dict:
    """The eval stage's perplexity of `source` (the model the GGUF was exported from) with the GGUF's
    dequantised weights in place: its own tokenizer and the same windows as every other model's evaluation.
    Cached beside the file (model-TYPE.eval.json) while file, source and settings are unchanged."""
    import torch

    from ..pipeline.stages import evaluate

    path = Path(path)
    st = path.stat()

    def weights(model):
        return {k: torch.from_numpy(v) for k, v in read_weights(path, model).items()}

    return evaluate(source, ecfg, out=path.with_suffix(".eval.json"), weights=weights,
                    weights_key={"gguf": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})


def read_fields(path: str | Path) -> dict:
    """Scalar and string metadata of a GGUF file (arrays given by their length)."""
    from gguf import GGUFReader

    out = {}
    for k, f in GGUFReader(str(path)).fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out[k] = len(v) if isinstance(v, list) else v
    return out


_TOL = {"f32": 0.0, "f16": 1e-3, "q8_0": 1.5e-2, "q4_0": 0.2, "q4_1": 0.2}   # max |error| / max |w| per tensor


def verify_readback(path: Path, model, qtype: str) -> dict:
    """Every tensor read back equals the torch weight (f32: exactly; else within the type's rounding)."""
    from .verify import VerificationError

    sd = model.state_dict()
    worst = 0.0
    back = read_weights(path, model)
    for hf, a in back.items():
        ref = sd[hf].detach().float().cpu().numpy()
        if a.shape != ref.shape:
            raise VerificationError(f"{path}: {hf} has shape {a.shape}, the model {ref.shape}", "re-export it")
        scale = float(np.abs(ref).max()) or 1.0
        err = float(np.abs(a - ref).max()) / scale
        worst = max(worst, err)
        # stored types differ per tensor (norms f32, embeddings q8_0 under q4_*): the loosest bound applies
        if err > _TOL[qtype] + (1e-6 if qtype != "f32" else 0.0):
            raise VerificationError(f"{path}: {hf} read back differs from the model (relative error {err:.3g})",
                                    "re-export it; if it persists, report it")
    return {"tensors": len(back), "max_rel_error": worst}


# ------------------------------------------------------------------------------------------- llama.cpp checks
def llamacpp_tokens(path: Path, prompt: list[int], n: int, cores: int | None = None) -> list[int]:
    """llama.cpp's greedy tokens (its own worker process, as every engine runs)."""
    from ..engine.worker import WorkerRuntime

    with WorkerRuntime("llamacpp", path, cores=cores, seq_len=1, cache_len=len(prompt) + n + 1) as w:
        return w.decode(prompt, n).tokens


def _perplexity_text(tokenizer, n_ctx: int, chunks: int) -> tuple[str, list[int]]:
    from ..pipeline.data import default_eval_source, load_text

    text = load_text(default_eval_source()).joined
    ids = tokenizer(text[: n_ctx * chunks * 8], add_special_tokens=False)["input_ids"]
    return text, ids


def llamacpp_perplexity(path: Path, text_file: Path, n_ctx: int, chunks: int, cores: int | None) -> float | None:
    exe = __import__("sparsedeploy.engine.llamacpp", fromlist=["tool"]).tool("llama-perplexity")
    if exe is None:
        return None
    cmd = [str(exe), "-m", str(path), "-f", str(text_file), "-c", str(n_ctx), "--chunks", str(chunks),
           "-t", str(cores or os.cpu_count() or 1), "-b", str(n_ctx)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    return float(m.group(1)) if m else None


def torch_perplexity_like_llamacpp(model, ids: list[int], n_ctx: int, chunks: int) -> float:
    """PyTorch's perplexity scored as llama-perplexity scores it: non-overlapping windows of n_ctx tokens,
    each scoring only the predictions of its second half (every scored token sees >= n_ctx/2 of context)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for c in range(min(chunks, len(ids) // n_ctx)):
            x = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
            logp = torch.log_softmax(model(x, use_cache=False).logits[0].float(), -1)
            first = n_ctx // 2
            tgt = x[0, first + 1:]
            total -= float(logp[first:n_ctx - 1].gather(1, tgt[:, None]).sum())
            count += int(tgt.numel())
    return float(np.exp(total / max(count, 1)))


# ------------------------------------------------------------------------------------------- the stage
def export_gguf(source: str, *, qtype: str = "f32", out: Path | None = None, force: bool = False,
                model=None, tokenizer=None, verify: bool = True, cores: int | None = None,
                ppl_ctx: int = 256, ppl_chunks: int = 4) -> Path:
    """Export `source` (RUN dir, HF folder, .gguf or alias) to a verified GGUF file (see module doc); skip when
    the file's record (model-<type>.json) holds the same source fingerprint and type."""
    from ..engine.llamacpp import LlamaCppRuntime
    from ..pipeline.models import load, resolve
    from ..pipeline.rundir import atomic_path, is_current, read_json, stage_key, write_json
    from .stage import VERIFY_TOKENS, _verify_prompt_ids
    from .verify import VerificationError, greedy_torch

    qtype = check_type(qtype)
    out = Path(out) if out is not None else default_out(source, qtype)
    check(out.suffix == ".gguf", f"--out {out} does not end in .gguf", "name the file, e.g. --out model-q4_0.gguf")
    record = out.with_suffix(".json")
    ref = resolve(source) if model is None else None
    where = Path(source).resolve() if Path(source).exists() else source
    key = stage_key({"type": qtype}, {"source": str(where), "fingerprint": ref.fingerprint() if ref else None})
    if not force and ref is not None and out.is_file() and record.is_file():
        try:
            if is_current(read_json(record), key):
                ui.info(f"export: up to date in {out}")
                return out
        except UserError:
            pass
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load(ref)
    check_supported(model)
    rec = {**key, "source": str(source), "type": qtype, "file": out.name}
    with atomic_path(out) as tmp:
        rec["stored"] = write_gguf(model, tokenizer, tmp, qtype, name=Path(str(source)).name)
        if verify:
            rec["readback"] = verify_readback(tmp, model, qtype)
            why = LlamaCppRuntime.unavailable()
            if why is None:
                prompt = _verify_prompt_ids(tokenizer)
                want = greedy_torch(model, prompt, VERIFY_TOKENS)
                got = llamacpp_tokens(tmp, prompt, VERIFY_TOKENS, cores)
                same = sum(1 for a, b in zip(got, want) if a == b)
                rec["llamacpp"] = {"prompt_ids": prompt, "tokens": got, "pytorch_tokens": want,
                                   "tokens_equal": got == want, "agree": f"{same}/{len(want)}"}
                if qtype == "f32" and got != want:
                    raise VerificationError(f"llama.cpp's greedy tokens {got} differ from PyTorch's {want} on the f32 GGUF",
                                            "report it with the model; the GGUF was not written")
                if qtype not in ("f32", "f16"):
                    rec["perplexity"] = _perplexity_pair(tmp, model, tokenizer, ppl_ctx, ppl_chunks, cores)
            else:
                rec["llamacpp"] = {"skipped": why}
        rec["export_seconds"] = round(time.perf_counter() - t0, 2)
        rec["bytes"] = tmp.stat().st_size
        write_json(record, rec)
    return out


def _perplexity_pair(path: Path, model, tokenizer, n_ctx: int, chunks: int, cores: int | None) -> dict | None:
    """llama.cpp's perplexity of the quantized file and PyTorch's of the model, on the same windows."""
    import tempfile

    try:
        text, ids = _perplexity_text(tokenizer, n_ctx, chunks)
    except Exception as e:  # noqa: BLE001 - no evaluation text here: say so instead of failing the export
        return {"skipped": f"no evaluation text ({type(e).__name__})"}
    chunks = min(chunks, len(ids) // n_ctx)
    if chunks < 1:
        return {"skipped": "the evaluation text is shorter than one window"}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text[: n_ctx * chunks * 8])
    try:
        ours = torch_perplexity_like_llamacpp(model, ids, n_ctx, chunks)
        theirs = llamacpp_perplexity(path, Path(f.name), n_ctx, chunks, cores)
    finally:
        os.unlink(f.name)
    return {"llamacpp": theirs, "pytorch_fp32": round(ours, 4), "n_ctx": n_ctx, "chunks": chunks,
            "scored": "second half of each window (llama-perplexity's protocol) for both"}
