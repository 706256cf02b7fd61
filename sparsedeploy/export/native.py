"""Build (or reuse) a deployment's native weights: DEPLOYMENT/native/ from the pruned model's safetensors.

The deployment's sparsedeploy.json says where its weights came from (export_key.source: a RUN, a model
folder or an alias) and how many zeros each linear holds in the verified ONNX export. The native build
reads the same safetensors (the source's fingerprint must still match the export's), compresses them
(pack.py) and checks every linear's zero count against the export's before it is used.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import ui
from ..errors import UserError, check
from ..engine.native.kernels import default_threads
from ..engine.native.pack import FORMAT_VERSION, NATIVE_DIR, build, load_tensors, read_index
from ..engine.native.tune import cpu_name


def native_key(meta: dict, crossover: float | None, threads: int | None = None,
               formats: tuple[str, ...] | None = None) -> dict:
    """What the native weights depend on. With measured formats (crossover None) that includes the CPU and the
    thread count they were timed with: the same deployment on another machine is re-tuned there."""
    return {"format_version": FORMAT_VERSION, "export_key": meta.get("export_key"),
            "synthetic_key": meta.get("synthetic_key"),
            "crossover": None if crossover is None else float(crossover),
            "tuned_on": {"cpu": cpu_name(), "threads": default_threads(threads)} if crossover is None else None,
            **({"formats": sorted(formats)} if formats else {})}


def wanted_crossover(old: dict | None, crossover: float | None, keep_fixed: bool):
    """An explicit --crossover wins; without one the formats are measured, except that `keep_fixed` (bench,
    run, sweep) keeps a build that `compile --crossover` made on purpose."""
    if crossover is not None:
        return float(crossover)
    return old.get("crossover") if keep_fixed and old is not None else None


def is_current(meta: dict, *, cores: int | None = None) -> bool:
    index = read_index(Path(meta["dir"]) / NATIVE_DIR)
    return index is not None and index.get("key") == native_key(meta, index.get("crossover"), cores)


def check_zeros(index: dict, meta: dict) -> None:
    """Every linear's zero count in the native weights equals the export's (which equals PyTorch's)."""
    weights = meta.get("weights") or {}
    for name, (z, n) in index["zeros"].items():
        if name in weights:
            check([int(x) for x in weights[name]] == [z, n],
                  f"native weights of {name} hold {z}/{n} zeros, the exported model {weights[name][0]}/{weights[name][1]}",
                  "rebuild with sparsedeploy compile DEPLOYMENT --engine native --force")


def build_from_model(model, meta: dict, *, crossover: float | None = None, cores: int | None = None,
                     share_with: Path | None = None) -> dict:
    """Native weights straight from an in-memory torch model (synthetic sweeps have no weights on disk).
    share_with: another deployment's native folder whose embedding/lm_head file may be hard-linked."""
    tensors = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    config = json.loads((Path(meta["dir"]) / "config.json").read_text())
    index = build(tensors, config, Path(meta["dir"]) / NATIVE_DIR, key=native_key(meta, crossover, cores),
                  crossover=crossover, threads=cores, share_with=share_with)
    check_zeros(index, meta)
    return index


def ensure_native(meta: dict, *, crossover: float | None = None, force: bool = False, cores: int | None = None,
                  formats: tuple[str, ...] | None = None, keep_fixed: bool = False) -> dict:
    """The deployment's native index, building it when missing, stale or asked for (`force`)."""
    from ..pipeline.models import resolve

    ndir = Path(meta["dir"]) / NATIVE_DIR
    old = read_index(ndir)
    c = wanted_crossover(old, crossover, keep_fixed)
    want = native_key(meta, c, cores, formats)
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
    how = "each group's format measured on this CPU" if c is None else f"crossover {c:g}"
    with ui.progress(f"native weights for {meta['dir']} ({how})", 1) as bar:
        config = json.loads((Path(meta["dir"]) / "config.json").read_text())
        index = build(load_tensors(ref.path), config, ndir, key=want, crossover=c, threads=cores, formats=formats)
        bar(1)
    check_zeros(index, meta)
    return index
