"""The export stage: a RUN's pruned model (or any model) -> a verified deployment folder.

Every export is checked before it is renamed into place: ONNX Runtime's greedy tokens must equal
PyTorch's for a fixed prompt, and each decoder layer's zero fraction in the ONNX initializers must equal
both the plan in ratios.json (within per-row rounding) and the count taken from the torch weights
(exactly). A deployment that fails either check is never written.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from .. import ui
from ..errors import UserError, check
from ..pipeline.rundir import is_current, read_json, stage_key

VERIFY_PROMPT = "The history of the city began when"
VERIFY_TOKENS = 16


def plan_tolerance(model) -> float:
    """Per-row pruners keep a whole number of weights per row: a layer's sparsity sits within
    1/columns of its ratio R_l (1/576 on SmolLM2)."""
    from ..pipeline.arch import prunable_linears

    return 1.0 / min(lin.weight.shape[1] for lin in prunable_linears(model).values()) + 1e-6


def default_out(source: str) -> Path:
    src = Path(source)
    if (src / "manifest.json").is_file():
        return src / "deployment"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem if src.suffix == ".gguf" else source).strip("-.") or "model"
    return Path("runs") / f"dense-{name}" / "deployment"


def sparsity_plan(source: str, model) -> tuple[dict[str, float], str]:
    """Per decoder layer prefix: the planned sparsity. A RUN with ratios.json gives R_l; a model folder gives its
    own per-layer zero fraction (the ONNX export must then hold exactly those zeros)."""
    from ..pipeline.arch import spec_for
    from ..pipeline.stages import layer_zero_counts

    spec = spec_for(model)
    ratios = Path(source) / "ratios.json"
    counts = layer_zero_counts(model)
    if ratios.is_file() and (Path(source) / "model").is_dir():
        doc = read_json(ratios)
        layers = doc.get("layers") or []
        check(len(layers) == len(counts), f"{ratios} plans {len(layers)} layers but the model has {len(counts)}",
              "rerun `sparsedeploy prune ... --force`")
        return {f"{spec.layers}.{e['index']}": float(e["sparsity"]) for e in layers}, "ratios.json"
    # a model folder (dense, or pruned and saved elsewhere) has no plan: its own zeros are what the export must keep
    return {k: (z / n if n else 0.0) for k, (z, n) in counts.items()}, "the model's own zeros (no RUN plan)"


def _verify_prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer(VERIFY_PROMPT, add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids] or [0]


def export(source: str, *, seqlen: int = 512, out: Path | None = None, force: bool = False,
           model=None, tokenizer=None, head: bool = True, verify: bool = True,
           uniform_plan: float | None = None) -> Path:
    """Export `source` (RUN dir, HF folder, .gguf or alias) to a verified deployment folder; skip when the
    folder already holds a verified export of the same weights and seqlen. `model`/`tokenizer`: export this
    in-memory model instead of loading `source`; `uniform_plan`: its planned sparsity of every layer (else
    the RUN's ratios.json, or dense)."""
    from ..export.onnx_kv import DEPLOY_META, write_deployment
    from ..export.verify import verify_sparsity, verify_tokens, weight_zero_counts
    from ..pipeline.models import load, resolve
    from ..pipeline.stages import layer_zero_counts

    check(isinstance(seqlen, int) and 8 <= seqlen <= 32768, f"--seqlen {seqlen} is out of range",
          "use e.g. --seqlen 512 (prompt + generated tokens)")
    out = Path(out) if out is not None else default_out(source)
    ref = resolve(source) if model is None else None
    where = Path(source).resolve() if Path(source).exists() else source    # the same folder by any path
    args, inputs = {"seqlen": seqlen, "head": head}, {"source": str(where), "fingerprint": ref.fingerprint() if ref else None}
    key = stage_key(args, inputs)      # the RUN's resume scheme: sparsedeploy.json holds "args" and "inputs"
    # export_key: the same facts in one flat dict, which native.py reads (export_key.source, .fingerprint) and
    # which deployments exported before stage_key hold instead of args/inputs
    export_key = {**inputs, **args}
    meta_path = out / DEPLOY_META
    if not force and ref is not None and meta_path.is_file():
        try:
            old = read_json(meta_path)
            legacy = "args" not in old and old.get("export_key") == export_key
            if old.get("verified") and (is_current(old, key) or legacy):
                ui.info(f"export: up to date in {out}")
                return out
        except UserError:
            pass
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load(ref)
    plan, plan_from = sparsity_plan(str(source), model)
    if uniform_plan is not None:
        plan, plan_from = {k: float(uniform_plan) for k in plan}, f"uniform {uniform_plan:g}"
    torch_counts = layer_zero_counts(model)
    prompt = _verify_prompt_ids(tokenizer)

    def verify_staged(tmp: Path, meta: dict) -> dict:
        onnx_path = tmp / "model.onnx"
        counts, counter = weight_zero_counts(onnx_path)
        weights = {name: [z, n] for name, (z, n) in counts.items()}
        if not verify:
            return {"verified": None, "weights": weights}
        measured = verify_sparsity(onnx_path, plan, tol=plan_tolerance(model), counts=counts)
        from .verify import VerificationError
        for prefix, (z, n) in torch_counts.items():
            oz = sum(c[0] for name, c in counts.items() if name.startswith(prefix + "."))
            on = sum(c[1] for name, c in counts.items() if name.startswith(prefix + "."))
            if (oz, on) != (z, n):
                raise VerificationError(f"{prefix}: the ONNX weights hold {oz}/{on} zeros, the torch model {z}/{n}",
                                        "re-export; if it persists, report it")
        tok = verify_tokens(tmp, model, prompt, n=min(VERIFY_TOKENS, seqlen - len(prompt)))
        zeros = sum(z for z, _ in torch_counts.values())
        size = sum(n for _, n in torch_counts.values())
        return {"verified": {"tokens": tok["tokens"], "prompt_ids": prompt, "engine": tok["engine"],
                             "sparsity_counter": counter, "plan_from": plan_from,
                             "layer_sparsity": {k: round(v, 6) for k, v in measured.items()}},
                "sparsity": zeros / size, "decoder_params": size, "weights": weights}

    with ui.progress(f"export {source} → {out}", 1) as bar:
        write_deployment(model, tokenizer, out, seqlen=seqlen, head=head,
                         extra_meta={**key, "export_key": export_key, "source": str(source)}, check=verify_staged)
        bar(1)
    meta = read_json(meta_path)
    meta["export_seconds"] = round(time.perf_counter() - t0, 2)
    from ..pipeline.rundir import write_json
    write_json(meta_path, meta)
    return out
