"""Build (or reuse) a deployment's native weights: DEPLOYMENT/native/ from the pruned model's safetensors.

The deployment's sparsedeploy.json says where its weights came from (export_key.source: a RUN, a model
folder or an alias) and how many zeros each linear holds in the verified ONNX export. The native build
reads the same safetensors (the source's fingerprint must still match the export's), compresses them
(pack.py) and checks every linear's zero count against the export's before it is used.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .. import ui
from ..errors import UserError, check
from ..engine.native.kernels import default_threads
from ..engine.native.pack import (DEFAULT_INT4, FORMAT_VERSION, NATIVE_DIR, build, check_act_columns, check_head,
                                  check_int4, check_weights, load_tensors, read_index)
from ..engine.cpuinfo import cpu_name


def native_key(meta: dict, crossover: float | None, threads: int | None = None,
               formats: tuple[str, ...] | None = None, weights: str = "fp32", head: str | None = None,
               act_columns: int | None = None, int4: tuple[int, str] | None = None) -> dict:
    """What the native weights depend on. With measured formats (crossover None) that includes the CPU and the
    thread count they were timed with: the same deployment on another machine is re-tuned there. A value type
    other than fp32 is part of the key (an fp32 build's key is what it was before value types existed)."""
    return {"format_version": FORMAT_VERSION, "export_key": meta.get("export_key"),
            "synthetic_key": meta.get("synthetic_key"),
            "crossover": None if crossover is None else float(crossover),
            "tuned_on": {"cpu": cpu_name(), "threads": default_threads(threads)} if crossover is None else None,
            **({"formats": sorted(formats)} if formats else {}),
            **({"weights": weights} if weights != "fp32" else {}),
            **({"head": head} if head == "q4" else {}),           # the default heads keep the keys they had
            **({"act_columns": int(act_columns)} if act_columns not in (None, default_act_columns()) else {}),
            **({"int4": list(int4)} if int4 is not None and tuple(int4) != DEFAULT_INT4 else {})}


def built_int4(index: dict | None) -> tuple[int, str] | None:
    """An index's int4 storage (group, scales), None where it is not an int4 build."""
    s = (index or {}).get("int4")
    return (int(s["group_size"]), str(s["scales"])) if s else None


def wanted_int4(old: dict | None, group: int | None, scales: str | None, weights: str, keep_fixed: bool) -> tuple[int, str]:
    """Explicit --int4-group / --int4-scales win; else `keep_fixed` keeps what an int4 build used; else (128, fp32)."""
    if group is None and scales is None and keep_fixed and weights == "int4" and built_int4(old) is not None:
        return built_int4(old)
    return check_int4(group, scales, weights)


def wanted_crossover(old: dict | None, crossover: float | None, keep_fixed: bool):
    """An explicit --crossover wins; without one the formats are measured, except that `keep_fixed` (bench,
    run, sweep) keeps a build that `compile --crossover` made on purpose."""
    if crossover is not None:
        return float(crossover)
    return old.get("crossover") if keep_fixed and old is not None else None


def wanted_weights(old: dict | None, weights: str | None, keep_fixed: bool) -> str:
    """An explicit --weights wins; else `keep_fixed` (bench, run, sweep) keeps the built value type; else fp32."""
    if weights is not None:
        return check_weights(weights)
    return (old.get("weights") or "fp32") if keep_fixed and old is not None else "fp32"


def wanted_head(old: dict | None, head: str | None, weights: str, keep_fixed: bool) -> str:
    """An explicit --head wins; else `keep_fixed` keeps a built q4 head of the same value type; else the default."""
    if head is None and keep_fixed and old is not None and old.get("head") == "q4" and old.get("weights") == weights:
        head = "q4"
    return check_head(head, weights)


def wanted_act_columns(old: dict | None, act_columns: int | None, weights: str, keep_fixed: bool) -> int:
    """An explicit --act-columns wins; else `keep_fixed` keeps what a low-bit build of the same value type used;
    else 256."""
    if act_columns is None and keep_fixed and old is not None and old.get("weights") == weights:
        act_columns = old.get("act_columns")
    return check_act_columns(act_columns, weights)


def is_current(meta: dict, *, cores: int | None = None) -> bool:
    index = read_index(Path(meta["dir"]) / NATIVE_DIR)
    return index is not None and index.get("key") == native_key(meta, index.get("crossover"), cores,
                                                                 weights=index.get("weights") or "fp32",
                                                                 head=index.get("head"),
                                                                 act_columns=index.get("act_columns"),
                                                                 int4=built_int4(index))


def check_zeros(index: dict, meta: dict) -> None:
    """Every linear's zero count in the native weights equals the export's (which equals PyTorch's)."""
    weights = meta.get("weights") or {}
    for name, (z, n) in index["zeros"].items():
        if name in weights:
            check([int(x) for x in weights[name]] == [z, n],
                  f"native weights of {name} hold {z}/{n} zeros, the exported model {weights[name][0]}/{weights[name][1]}",
                  "rebuild with sparsedeploy compile DEPLOYMENT --engine native --force")


def build_from_model(model, meta: dict, *, crossover: float | None = None, cores: int | None = None,
                     share_with: Path | None = None, weights: str = "fp32", head: str | None = None,
                     int4_group: int | None = None, int4_scales: str | None = None) -> dict:
    """Native weights straight from an in-memory torch model (synthetic sweeps have no weights on disk).
    share_with: another deployment's native folder whose embedding/lm_head file may be hard-linked.
    int4_group / int4_scales: an int4 build's storage (pack.check_int4)."""
    tensors = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    config = json.loads((Path(meta["dir"]) / "config.json").read_text())
    head = check_head(head, weights)
    i4 = check_int4(int4_group, int4_scales, weights)
    index = build(tensors, config, Path(meta["dir"]) / NATIVE_DIR,
                  key=native_key(meta, crossover, cores, weights=weights, head=head, int4=i4),
                  crossover=crossover, threads=cores, share_with=share_with, weights=weights, head=head, int4=i4)
    check_zeros(index, meta)
    return index


def ensure_native(meta: dict, *, crossover: float | None = None, force: bool = False, cores: int | None = None,
                  formats: tuple[str, ...] | None = None, keep_fixed: bool = False, weights: str | None = None,
                  head: str | None = None, act_columns: int | None = None, int4_group: int | None = None,
                  int4_scales: str | None = None) -> dict:
    """The deployment's native index, building it when missing, stale or asked for (`force`).
    weights: the decoder groups' value type ("fp32" | "int8"; None: fp32, or with keep_fixed what was built).
    act_columns: a low-bit build's activation scale width (256 or 64; None: 256, or with keep_fixed what was
    built). int4_group / int4_scales: an int4 build's storage (pack.check_int4; None: 128 / fp32, or with
    keep_fixed what was built)."""
    from ..pipeline.models import resolve

    ndir = Path(meta["dir"]) / NATIVE_DIR
    old = read_index(ndir)
    if meta.get("native_only"):          # its weights were built with it (export --format native): nothing to rebuild from
        check(old is not None, f"{meta['dir']} is a native-only deployment without readable native weights",
              "re-export it: sparsedeploy export MODEL --format native --out DIR")
        check(not force and weights in (None, old.get("weights")) and head in (None, old.get("head")) and crossover is None
              and act_columns in (None, old.get("act_columns"))
              and (int4_group, int4_scales) == (None, None),
              f"{meta['dir']} is a native-only deployment: its native weights ({old.get('weights')}, head "
              f"{old.get('head')}) were built at export", "re-export it with the options you want: "
              "sparsedeploy export MODEL --format native --weights ... --head ... --out DIR")
        return old
    c = wanted_crossover(old, crossover, keep_fixed)
    wt = wanted_weights(old, weights, keep_fixed)
    hd = wanted_head(old, head, wt, keep_fixed)
    ac = wanted_act_columns(old, act_columns, wt, keep_fixed)
    i4 = wanted_int4(old, int4_group, int4_scales, wt, keep_fixed)
    want = native_key(meta, c, cores, formats, wt, hd, ac, i4)
    if old is not None and old.get("key") == want and not force:
        return old
    check(not meta.get("synthetic"), f"{meta['dir']} is a synthetic deployment without native weights",
          "rerun the sweep with --engine native (it writes them while the model is in memory)")
    ekey = meta.get("export_key") or {}
    source = ekey.get("source") or meta.get("source")
    check(bool(source), f"{meta['dir']}/sparsedeploy.json does not say where its weights came from",
          "re-export it with sparsedeploy export")
    try:
        ref = resolve(str(source))
    except UserError as e:
        raise UserError(f"the weights this deployment was exported from are gone ({e})",
                        "re-export the deployment from an existing RUN or model") from None
    if ekey.get("fingerprint") is not None:
        check(ref.fingerprint() == ekey["fingerprint"], f"{source} changed since {meta['dir']} was exported",
              f"re-export it: sparsedeploy export {source}")
    check(Path(ref.path).is_dir(), f"{source} is not a local model folder", "export from a local RUN or model folder")
    how = ("each group's format measured on this CPU" if c is None else f"crossover {c:g}") + \
        ("" if wt == "fp32" else f", {wt} weights: round-to-nearest")
    codes = gptq_codes_for(ref.path) if wt == "int4" else None
    if codes is not None:
        how = how.replace("round-to-nearest", "the GPTQ checkpoint's codes")
    with ui.progress(f"native weights for {meta['dir']} ({how})", 1) as bar:
        config = json.loads((Path(meta["dir"]) / "config.json").read_text())
        index = build(load_tensors(ref.path), config, ndir, key=want, crossover=c, threads=cores, formats=formats,
                      weights=wt, codes=codes, head=hd, act_columns=ac, int4=i4)
        bar(1)
    check_zeros(index, meta)
    return index


def gptq_codes_for(model_dir: str | Path):
    """For `--weights int4`: the codes reader of the 4-bit GPTQ checkpoint beside a RUN's model folder
    (RUN/quantized/, written by `sparsedeploy quantize RUN --bits 4`), or None when the weights come from
    elsewhere (they are then quantised round-to-nearest at build time). codes(linear name) -> (codes, scale,
    zero, keep, group_size), None for a linear the checkpoint does not hold."""
    from ..engine.native.gptq_codes import read_packed

    qdir = Path(model_dir).parent / "quantized"
    if Path(model_dir).name != "model" or not (qdir / "quantize.json").is_file():
        return None
    qmeta, get = read_packed(qdir)
    bits, gs = int(qmeta["bits"]), int(qmeta["group_size"])
    check(bits == 4, f"{qdir} holds {bits}-bit GPTQ codes; --weights int4 stores 4-bit codes",
          "re-quantize the RUN with --bits 4, or use --weights int8")
    check(gs == -1 or gs % 64 == 0, f"{qdir} was quantised in groups of {gs} columns; the int4 kernels take groups "
          "of whole 64-column blocks", "re-quantize the RUN with --group-size 64 or 128, or use --weights int8")

    def codes(name: str):
        try:
            return get(name)
        except KeyError:
            return None
    return codes


def default_act_columns() -> int:
    """Columns per activation scale of the engine's int8 products unless a build chose otherwise (lowbit)."""
    from ..engine.native.lowbit import DEFAULT_ACT_COLUMNS

    return DEFAULT_ACT_COLUMNS


def _fake_quant_act(module, args, width=None):
    """PyTorch forward pre-hook: the input quantised as lowbit.quantize_act does (int8, one symmetric scale
    per `width` columns of the last axis, by default default_act_columns() = 256, rint), dequantised: what the int8
    dense / bitmask / perm and int4 products multiply with (another width: what that choice would cost)."""
    import torch

    x = args[0]
    m = x.shape[-1]
    width = int(width or default_act_columns())
    ngrp = -(-m // width)
    xp = torch.nn.functional.pad(x.float(), (0, ngrp * width - m)).reshape(*x.shape[:-1], ngrp, width)
    amax = xp.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.clamp(torch.round(xp * inv), -127, 127)
    deq = (q * (amax / torch.tensor(127.0))).reshape(*x.shape[:-1], ngrp * width)[..., :m]
    return (deq.to(x.dtype),) + tuple(args[1:])


def lowbit_reference_model(meta: dict, index: dict):
    """The PyTorch model on the weights a low-bit native build computes with, computed here independently of
    the build: every decoder linear of an int8 build per-row round-to-nearest int8 (lowbit.quantize_rows), of an
    int4 build round-to-nearest on the GPTQ grid (int4.rtn_int4) or, for groups built from a GPTQ checkpoint's
    codes, the RUN's fake-quant weights as they are; the lm_head int8 per row; all dequantised. Returns (model,
    tokenizer, quantise_activations): the last, quantise_activations(width=None), installs forward pre-hooks that
    also quantise the inputs of the groups stored as int8 / int8_bitmask / int8_perm / int4_bitmask, one scale per
    the build's act_columns (256 or 64) as those kernels do, or per `width` columns (returns the hook handles)."""
    import numpy as np
    import torch

    from ..arch import native_arch
    from ..engine.native.int4 import rtn_int4, stored_group_size
    from ..engine.native.lowbit import dequantized_q4, encode_q4, quantize_rows
    from ..pipeline.models import load, resolve

    ekey = meta.get("export_key") or {}
    model, tok = load(resolve(str(ekey.get("source") or meta.get("source"))))
    arch = native_arch(index["config"])
    mods = []
    with torch.no_grad():
        for i, groups in enumerate(index["layers"]):
            for g, info in groups.items():
                for name in info["linears"]:
                    mod = model.get_submodule(f"{arch.layers}.{i}.{name}")
                    W = mod.weight.detach().float().numpy()
                    if info["format"] == "int4_bitmask":
                        if info.get("codes") != "gptq":
                            gs, scales = built_int4(index) or DEFAULT_INT4
                            codes, sc, zr, keep = rtn_int4(W, gs, scales)
                            g = np.arange(W.shape[1]) // stored_group_size(gs, W.shape[1])
                            W = np.where(keep, sc[:, g] * (codes.astype(np.float32) - zr[:, g]), np.float32(0))
                            mod.weight.copy_(torch.from_numpy(W.astype(np.float32)).to(mod.weight.dtype))
                    else:
                        wq, s = quantize_rows(W)
                        mod.weight.copy_(torch.from_numpy(wq.astype(np.float32) * s[:, None]).to(mod.weight.dtype))
                    if info["format"] in ("int8", "int8_bitmask", "int8_perm", "int4_bitmask"):
                        mods.append(mod)
        if index.get("head") in ("int8", "q4"):    # the low-bit lm_head (a tied one gets its own, quantised copy)
            head = model.get_output_embeddings()
            W = head.weight.detach().float().numpy()
            if index["head"] == "int8":
                wq, s = quantize_rows(W)
                Wq = wq.astype(np.float32) * s[:, None]
            else:
                Wq = dequantized_q4(encode_q4(W), W.shape[1])
            head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(Wq, dtype=np.float32)).to(head.weight.dtype),
                                             requires_grad=False)
            mods.append(head)
    def quantise_activations(width=None):
        width = width or index.get("act_columns") or default_act_columns()
        return [m.register_forward_pre_hook(functools.partial(_fake_quant_act, width=width)) for m in mods]

    return model, tok, quantise_activations


TIE_SHARE = 0.01      # a low-bit engine token within this share of the logit range of PyTorch's best: a rounding tie


def lowbit_reference_tokens(meta: dict, index: dict, prompt_ids, n: int, engine_tokens=None) -> dict:
    """Greedy tokens of lowbit_reference_model: weights only ("weights") and with the activations quantised as
    the engine does ("weights_and_activations": the engine's arithmetic up to float summation order).

    With engine_tokens (the engine's greedy tokens), also "teacher_forced": PyTorch (activations quantised) run
    once over the prompt and the engine's tokens, and at each step the gap between its best logit and its logit
    of the engine's token, as a share of that step's logit range (max - min). Why: quantize_act rounds
    x * 127 / amax to integers, and an input that PyTorch and the engine compute 1 ulp apart (a different float
    summation order) can round to neighbouring integers when it lies within an ulp of a .5 tie; that moves the
    logits by a little, and where two logits are that close, greedy decoding then continues on another path. A
    token within TIE_SHARE of the best on the same prefix is such a tie, not a wrong product: returns
    {"max_gap_share", "step" (where it is), "steps_not_argmax", "within_ties": max_gap_share <= TIE_SHARE}."""
    import numpy as np
    import torch

    from .verify import greedy_torch

    model, _, quantise_activations = lowbit_reference_model(meta, index)
    out = {"weights": greedy_torch(model, prompt_ids, n)}
    hooks = quantise_activations()
    try:
        out["weights_and_activations"] = greedy_torch(model, prompt_ids, n)
        if engine_tokens is not None and len(engine_tokens):
            seq = list(prompt_ids) + list(engine_tokens[:-1])
            with torch.no_grad():
                logits = model(torch.tensor([seq], dtype=torch.long)).logits[0].float().numpy()
            rows = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(engine_tokens)]
            best = rows.max(axis=1)
            gap = best - rows[np.arange(len(engine_tokens)), np.asarray(engine_tokens)]
            share = gap / np.maximum(best - rows.min(axis=1), 1e-12)
            k = int(share.argmax())
            out["teacher_forced"] = {"max_gap_share": float(share[k]), "step": k,
                                     "steps_not_argmax": int((gap > 0).sum()),
                                     "within_ties": bool(share[k] <= TIE_SHARE)}
    finally:
        for h in hooks:
            h.remove()
    return out


# ------------------------------------------------------------------------------------ native-only, streamed
NATIVE_ONLY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


class FolderSource:
    """A Hugging Face folder's (sharded, any dtype) safetensors as the packer reads them (pack.write_native):
    one tensor at a time, as float32 numpy, read from the memory-mapped files (pipeline.stream.SafetensorsFolder).
    magnitude: each decoder linear magnitude-pruned to that sparsity as it is read (pipeline.prune.prune_magnitude,
    the pruner of the synthetic sweep: the |w| smallest of the whole matrix) — for SYNTHETIC speed tables."""

    def __init__(self, folder: str | Path, magnitude: float | None = None):
        from ..pipeline.arch import spec_for
        from ..pipeline.stream import SafetensorsFolder

        self.src = SafetensorsFolder(folder)
        self.config = self.src.config
        self.names = set(self.src.names())
        spec = spec_for(self.config)
        n = int(self.config.get("num_hidden_layers") or 0)
        self.prunable = {f"{spec.layers}.{i}.{name}.weight" for i in range(n) for name in spec.linears}
        self.magnitude = magnitude or None

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str):
        import torch

        from ..pipeline.prune import prune_magnitude

        if name not in self.names:
            raise UserError(f"{self.src.path} lacks tensor {name}", "pass a complete model folder")
        t = self.src.get(name).to(torch.float32)
        if self.magnitude and name in self.prunable:
            t = prune_magnitude(t, None, self.magnitude)
        return t.numpy()


def _peak_rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def native_only_meta(index: dict, config: dict, *, seqlen: int, source: str, magnitude: float | None) -> dict:
    """sparsedeploy.json of a native-only deployment: what bench and the decode loop read from an ONNX export's
    (cache geometry, the graph's input/output names, each linear's zero count), with no graph."""
    from ..arch import native_arch

    arch = native_arch(config)
    L = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    past = [f"past_key_values.{i}.{kv_}" for i in range(L) for kv_ in ("key", "value")]
    zeros = dict(index["zeros"])
    numel = sum(n for _, n in zeros.values())
    nz = sum(z for z, _ in zeros.values())
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    weights = {**zeros, arch.embed: [0, vocab * hidden]}
    if not index["tied_lm_head"]:
        weights[arch.lm_head] = [0, vocab * hidden]
    synthetic = config.get("sparsedeploy_synthetic")
    return {"native_only": True, "arch": arch.name, "num_layers": L, "num_kv_heads": kv, "num_heads": heads,
            "head_dim": hd, "vocab_size": vocab, "hidden_size": hidden,
            "input_names": ["input_ids", "positions", "causal_mask", *past],
            "output_names": ["logits", *[p.replace("past_key_values.", "present.") for p in past]],
            "seqlen": int(seqlen), "max_positions": config.get("max_position_embeddings"),
            "model_type": config.get("model_type"), "sparsity": round(nz / max(numel, 1), 6),
            "weights": weights, "source": source, "export_key": {"source": source, "native_only": True},
            "magnitude_pruned": magnitude, "synthetic": bool(synthetic), "synthetic_label": synthetic}


def export_native_only(model_dir: str | Path, out: str | Path, *, weights: str = "int8", head: str | None = None,
                       crossover: float | None = None, formats: tuple[str, ...] | None = None,
                       cores: int | None = None, magnitude: float | None = None, seqlen: int = 256,
                       progress: bool = True, act_columns: int | None = None, int4_group: int | None = None,
                       int4_scales: str | None = None) -> dict:
    """A native-only deployment of a model folder, streamed: config.json, the tokenizer, sparsedeploy.json and
    native/ — no ONNX graph (a full-depth 7B model's fp32 graph is 27 GB; the native engine needs only its own
    weights and the cache geometry). The decoder layers are read, optionally magnitude-pruned (`magnitude`),
    encoded and written one at a time (pack.write_native: the packer the in-memory builds use), so the
    residents are the embedding/lm_head while they are encoded, then about one decoder layer in float32.
    `--weights int4` of a 4-bit GPTQ RUN's model folder (RUN/model beside RUN/quantized) builds its groups from
    the checkpoint's codes, as `compile` does (no re-quantisation); elsewhere int4 is round-to-nearest.
    Formats: measured layer by layer on this CPU (crossover None), restricted to `formats` if given, or the
    fixed rule of `crossover`. Written into a temp sibling folder and renamed into place. Returns
    {"dir", "index", "seconds", "peak_rss_mb", "bytes"}."""
    import shutil
    import tempfile
    import time

    from ..engine.deployment import DEPLOY_META
    from ..engine.native.pack import write_native
    from ..pipeline.models import replace_dir
    from ..pipeline.stream import copy_side_files

    model_dir, out = Path(model_dir), Path(out)
    check(model_dir.is_dir(), f"model folder {model_dir} does not exist", "pass a Hugging Face folder with safetensors")
    check(magnitude is None or 0.0 <= magnitude < 1.0, f"--prune-magnitude {magnitude} is outside [0, 1)",
          "use a fraction, e.g. 0.7")
    check(isinstance(seqlen, int) and seqlen >= 2, f"--seqlen {seqlen} is too short", "use e.g. 256")
    check(not out.exists() or not any(out.iterdir()) or (out / DEPLOY_META).is_file(),
          f"{out} is a non-empty folder that is not a deployment", "choose a new folder (only deployments are replaced)")
    check_weights(weights)
    head = check_head(head, weights)
    act_columns = check_act_columns(act_columns, weights)
    int4 = check_int4(int4_group, int4_scales, weights)
    source = FolderSource(model_dir, magnitude)
    config = source.config
    codes = gptq_codes_for(model_dir) if weights == "int4" else None
    check(codes is None or magnitude is None, f"{model_dir} has GPTQ codes (beside it in quantized/); --prune-magnitude "
          "would change the weights they encode", "drop --prune-magnitude, or export the pruned model without codes")
    maxpos = config.get("max_position_embeddings")
    check(maxpos is None or seqlen <= int(maxpos), f"--seqlen {seqlen} exceeds the model's {maxpos} positions",
          f"use --seqlen <= {maxpos}")
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (model_dir / f).is_file()]
    check(not missing, f"{model_dir} has no {missing[0] if missing else ''}", "save the tokenizer into the model folder")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        copy_side_files(model_dir, tmp)
        key = {"format_version": FORMAT_VERSION, "native_only": {"source": str(model_dir.resolve()),
                                                                "magnitude": magnitude,
                                                                **({"codes": "gptq"} if codes else {})},
               "crossover": crossover, **({"formats": sorted(formats)} if formats else {}),
               "weights": weights, "head": head, **({"act_columns": act_columns} if act_columns != default_act_columns() else {}),
               **({"int4": list(int4)} if int4 != DEFAULT_INT4 else {})}
        n = int(config["num_hidden_layers"])
        with ui.progress(f"native-only deployment of {model_dir.name} ({weights}{', GPTQ codes' if codes else ''}, "
                         f"head {head}{'' if not magnitude else f', magnitude {magnitude:.0%}'})", n) as bar:
            index = write_native(source, config, tmp / NATIVE_DIR, key=key, crossover=crossover, threads=cores,
                                 formats=formats, weights=weights, codes=codes, head=head, act_columns=act_columns,
                                 int4=int4,
                                 on_layer=(lambda i: bar(i + 1)) if progress else None)
        meta = native_only_meta(index, config, seqlen=seqlen, source=str(model_dir.resolve()), magnitude=magnitude)
        meta["build"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": _peak_rss_mb()}
        (tmp / DEPLOY_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"dir": str(out), "index": index, "seconds": meta["build"]["seconds"],
            "peak_rss_mb": meta["build"]["peak_rss_mb"], "bytes": size}
