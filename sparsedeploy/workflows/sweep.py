"""The Table 5 sweep: prune one model at each sparsity, export each, bench them all together.

Layout of OUT:  base/ (the dense model's calibration, shared by every sparsity), dense/deployment,
p10/ … p90/ (RUN directories with model/ and deployment/), bench/ (per-group results), table5.{json,csv,md,png}.
Every step is a resumable stage: rerunning after an interruption redoes only what is missing.

`--synthetic llama2-7b --layers N`: random weights with LLaMA2-7B's real layer shapes (N decoder layers,
full embeddings and lm_head), magnitude-pruned per output row; labelled synthetic in every output.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import ui
from ..errors import UserError, check
from ..pipeline.rundir import read_json
from ..bench.bench import BenchConfig, bench

SYNTHETIC = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # a smoke-test shape (GQA) for checking the synthetic path in seconds
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
}
DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SweepConfig:
    model: str = "smollm2-135m"
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    allocator: str = "dlp"
    method: str = "wanda"
    nsamples: int = 32
    calib_seqlen: int = 256
    export_seqlen: int = 256
    synthetic: str | None = None
    layers: int = 2
    prepare_only: bool = False          # prune + export only (e.g. while something else is using the cores)
    bench: BenchConfig = field(default_factory=BenchConfig)


def parse_sparsities(text: str) -> tuple[float, ...]:
    try:
        values = sorted({round(float(x), 4) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--sparsities '{text}' is not a comma-separated list of numbers", "use e.g. 0,0.5,0.7,0.9")
    check(bool(values), "--sparsities is empty", "use e.g. 0,0.5,0.7,0.9")
    check(all(0 <= v < 1 for v in values), f"--sparsities {text} has values outside [0, 1)", "use fractions, e.g. 0.7")
    return tuple(values)


def _tag(p: float) -> str:
    return "dense" if p == 0 else f"p{round(p * 100):02d}"


def _seed_calibration(base: Path, run: Path) -> None:
    """Give a sparsity's RUN the shared dense calibration (files + the manifest's calibrate record)."""
    from ..pipeline.rundir import write_json
    from ..pipeline.stages import CALIB_STATS, CALIB_TOKENS

    run.mkdir(parents=True, exist_ok=True)
    man = read_json(base / "manifest.json")
    mine = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {"stages": {}}
    if mine.get("stages", {}).get("calibrate") == man["stages"]["calibrate"] and mine.get("model") == man.get("model"):
        return
    for name in (CALIB_TOKENS, CALIB_STATS):
        shutil.copy2(base / name, run / f".{name}.tmp")
        (run / f".{name}.tmp").replace(run / name)
    mine["model"] = man.get("model")
    mine["stages"] = {"calibrate": man["stages"]["calibrate"]}
    write_json(run / "manifest.json", mine)


def _real_deployments(cfg: SweepConfig, out: Path) -> list[Path]:
    from ..export.stage import export
    from ..pipeline import stages as st

    deps = []
    calib = st.CalibConfig(cfg.model, "wikipedia-summaries", cfg.nsamples, cfg.calib_seqlen, 0)
    pruned = [p for p in cfg.sparsities if p > 0]
    needs_data = bool(st.NEEDS.get(cfg.method)) or cfg.allocator != "uniform"
    if pruned:   # validate every sparsity's arguments before any work
        for p in pruned:
            st.validate_prune(st.PruneConfig(cfg.model, p, cfg.allocator, cfg.method, calib=calib))
        if needs_data:
            st.calibrate(st.RunDir(out / "base"), calib)
    for p in cfg.sparsities:
        if p == 0:
            deps.append(export(cfg.model, seqlen=cfg.export_seqlen, out=out / "dense" / "deployment"))
            _gguf_export(cfg, cfg.model, deps[-1])
            continue
        run = out / _tag(p)
        if needs_data:
            _seed_calibration(out / "base", run)
        ui.info(f"sweep: {cfg.allocator} + {cfg.method} at {p:.0%}")
        st.prune(st.RunDir(run), st.PruneConfig(cfg.model, p, cfg.allocator, cfg.method, calib=calib))
        deps.append(export(str(run), seqlen=cfg.export_seqlen))
        _gguf_export(cfg, str(run), deps[-1])
    return deps


def _gguf_export(cfg: SweepConfig, source: str, deployment: Path, *, model_fn=None, tokenizer=None) -> None:
    """With llama.cpp among the engines (and built): the GGUF export of `cfg.bench.gguf_type` beside the
    deployment (DEPLOYMENT/../deployment-gguf/model-TYPE.gguf, where bench looks for it). Synthetic models
    (`model_fn` makes the model) are written once per deployment folder, unverified (random weights)."""
    from ..engine import unavailable

    if "llamacpp" not in cfg.bench.engines or unavailable("llamacpp") is not None:
        return
    from ..export.gguf import GGUF_DIR, export_gguf

    t = cfg.bench.gguf_type
    dest = Path(deployment).parent / GGUF_DIR / f"model-{t}.gguf"
    if model_fn is None:
        export_gguf(source, qtype=t, out=dest)
    elif not dest.is_file():
        export_gguf(source, qtype=t, out=dest, model=model_fn(), tokenizer=tokenizer, verify=False)


def synthetic_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")


def synthetic_model(name: str, layers: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    check(name in SYNTHETIC, f"unknown synthetic model '{name}'", f"use one of: {', '.join(SYNTHETIC)}")
    check(1 <= layers <= 64, f"--layers {layers} must be between 1 and 64", "use e.g. --layers 2")
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, **SYNTHETIC[name])
    cfg._name_or_path = f"synthetic-{name}-{layers}L"
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def _synthetic_pruned(cfg: SweepConfig, p: float):
    from ..pipeline.arch import prunable_linears
    from ..pipeline.prune import prune_magnitude

    model = synthetic_model(cfg.synthetic, cfg.layers)
    if p > 0:
        for lin in prunable_linears(model).values():
            lin.weight.data = prune_magnitude(lin.weight.data, None, p, None)
    return model


def _share(deps: list[Path]) -> Path | None:
    """The first deployment's native folder: its embedding/lm_head file is the same for every sparsity."""
    from ..engine.native.pack import NATIVE_DIR

    return Path(deps[0]) / NATIVE_DIR if deps else None


def _synthetic_deployments(cfg: SweepConfig, out: Path) -> list[Path]:
    from ..export.onnx_kv import DEPLOY_META
    from ..export.stage import export
    from ..export.native import build_from_model, is_current

    check(cfg.synthetic in SYNTHETIC, f"unknown synthetic model '{cfg.synthetic}'", f"use one of: {', '.join(SYNTHETIC)}")
    check(1 <= cfg.layers <= 64, f"--layers {cfg.layers} must be between 1 and 64", "use e.g. --layers 2")
    check(cfg.method == "magnitude", f"synthetic models have no data for --method {cfg.method}",
          "use --method magnitude with --synthetic (random weights: only magnitude is meaningful)")
    tok = synthetic_tokenizer(SYNTHETIC[cfg.synthetic]["vocab_size"])
    deps = []
    for p in cfg.sparsities:
        dest = out / _tag(p) / "deployment"
        key = {"synthetic": cfg.synthetic, "layers": cfg.layers, "sparsity": p, "seqlen": cfg.export_seqlen}
        want_native = "native" in cfg.bench.engines
        if (dest / DEPLOY_META).is_file():
            try:
                meta = read_json(dest / DEPLOY_META)
                if meta.get("synthetic_key") == key:
                    meta["dir"] = str(dest)
                    if want_native and not is_current(meta, cores=cfg.bench.cores):
                        ui.info(f"synthetic {cfg.synthetic}: native weights for {p:.0%}")
                        build_from_model(_synthetic_pruned(cfg, p), meta, cores=cfg.bench.cores, share_with=_share(deps))
                    _gguf_export(cfg, f"synthetic-{cfg.synthetic}-{cfg.layers}L-{_tag(p)}", dest,
                                 model_fn=lambda: _synthetic_pruned(cfg, p), tokenizer=tok)
                    ui.info(f"export: up to date in {dest}")
                    deps.append(dest)
                    continue
            except UserError:
                pass
        ui.info(f"synthetic {cfg.synthetic} ({cfg.layers} layers): magnitude-pruning to {p:.0%} and exporting")
        model = _synthetic_pruned(cfg, p)
        export(str(dest.parent), seqlen=cfg.export_seqlen, out=dest, model=model, tokenizer=tok, head=(p == 0),
               uniform_plan=p)
        meta = read_json(dest / DEPLOY_META)
        meta.update({"synthetic": cfg.synthetic, "synthetic_key": key})
        from ..pipeline.rundir import write_json
        write_json(dest / DEPLOY_META, meta)
        if want_native:
            build_from_model(model, dict(meta, dir=str(dest)), cores=cfg.bench.cores, share_with=_share(deps))
        _gguf_export(cfg, f"synthetic-{cfg.synthetic}-{cfg.layers}L-{_tag(p)}", dest, model_fn=lambda: model, tokenizer=tok)
        del model
        deps.append(dest)
    return deps


def sweep(cfg: SweepConfig, out: Path) -> dict:
    from ..bench import report

    cfg.bench.validate()
    out = Path(out)
    if cfg.synthetic:
        deps = _synthetic_deployments(cfg, out)
        title = (f"SYNTHETIC {cfg.synthetic} shapes, {cfg.layers} decoder layers, random weights, magnitude pruning "
                 f"— decode ms/token")
    else:
        deps = _real_deployments(cfg, out)
        title = f"{cfg.model}: {cfg.allocator.upper()} + {cfg.method} — decode ms/token"
    if cfg.prepare_only:
        return {"deployments": [str(d) for d in deps]}
    doc = bench(deps, cfg.bench, cache_dir=out / "bench", title=title)
    doc["sweep"] = {"model": cfg.synthetic or cfg.model, "allocator": cfg.allocator, "method": cfg.method,
                    "sparsities": list(cfg.sparsities), "layers": cfg.layers if cfg.synthetic else None,
                    "export_seqlen": cfg.export_seqlen}
    report.write_reports(doc, out / "table5")
    return doc
