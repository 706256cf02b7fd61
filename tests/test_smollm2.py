"""Integration on the real default model: SmolLM2-135M, 32×256 calibration tokens, a WikiText-2 slice.

Reference (../shared/data/README.md, an independent script): dense 36.06, Wanda 60% uniform 187.98,
DLP 157.63. DLP must beat uniform, and the saved model must reload with plain from_pretrained.
"""
from __future__ import annotations

import json

import pytest
import torch

from sparsedeploy.pipeline import stages
from sparsedeploy.pipeline.rundir import RunDir

from .conftest import WIKITEXT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_cfg():
    if WIKITEXT.is_file():
        return stages.EvalConfig("wikitext2", 256, 32, str(WIKITEXT), "cpu")
    return stages.EvalConfig("wikipedia-summaries-heldout", 256, 32, None, "cpu")


def _prune(tmp_path_factory, allocator):
    run = RunDir(tmp_path_factory.mktemp(f"smol-{allocator}"))
    calib = stages.CalibConfig("smollm2-135m", "wikipedia-summaries", 32, 256, 0, None, "cpu")
    cfg = stages.PruneConfig("smollm2-135m", 0.6, allocator, "wanda", calib=calib, device="cpu")
    stages.prune(run, cfg)
    return run


def test_dlp_beats_uniform_on_smollm2(tmp_path_factory, eval_cfg):
    from transformers import AutoModelForCausalLM

    dlp = _prune(tmp_path_factory, "dlp")
    uni = _prune(tmp_path_factory, "uniform")
    ppl_dlp = stages.evaluate(str(dlp.path), eval_cfg)["perplexity"]
    ppl_uni = stages.evaluate(str(uni.path), eval_cfg)["perplexity"]
    dense = stages.evaluate("smollm2-135m", eval_cfg)["perplexity"]
    print(f"dense {dense:.2f}  uniform {ppl_uni:.2f}  dlp {ppl_dlp:.2f}")
    assert dense < ppl_dlp < ppl_uni
    ratios = json.loads((dlp.path / "ratios.json").read_text())
    sp = [layer["sparsity"] for layer in ratios["layers"]]
    assert abs(sum(sp) / len(sp) - 0.6) < 1e-3
    assert sp[-1] > sp[0], "DLP ratios rise with depth on SmolLM2 (reference: ≈0.52 → ≈0.72)"
    assert abs(ratios["realized_sparsity"] - 0.6) < 5e-3
    assert json.loads((dlp.path / "eval.json").read_text())["perplexity"] == ppl_dlp

    # the pruned model reloads with plain from_pretrained and gives the same logits as the walker's model
    model = AutoModelForCausalLM.from_pretrained(dlp.path / "model")
    again = AutoModelForCausalLM.from_pretrained(dlp.path / "model", dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    w = model.model.layers[5].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - sp[5]) < 2e-3


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_smollm2_greedy_tokens_equal_across_pytorch_onnxruntime_deepsparse(tmp_path, sparsity):
    """Dense and 50% / 70% magnitude-pruned SmolLM2: 16 greedy tokens from PyTorch (checked at export against ONNX
    Runtime), ONNX Runtime, DeepSparse and the native engine (formats measured; CSR and bitmask forced) in workers
    are the same list."""
    from sparsedeploy.engine import unavailable
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.stage import export
    from sparsedeploy.export.verify import greedy_torch
    from sparsedeploy.pipeline.models import load, resolve

    source = "smollm2-135m"
    if sparsity:
        run = RunDir(tmp_path / "run")
        stages.prune(run, stages.PruneConfig("smollm2-135m", sparsity, "uniform", "magnitude", device="cpu"))
        source = str(run.path)
    dep = export(source, seqlen=64, out=tmp_path / "deployment", head=False)
    meta = json.loads((dep / "sparsedeploy.json").read_text())
    prompt, torch_tokens = meta["verified"]["prompt_ids"], meta["verified"]["tokens"]
    assert len(torch_tokens) == 16
    model, _ = load(resolve(source))
    assert greedy_torch(model, prompt, 16) == torch_tokens
    assert abs(meta["sparsity"] - sparsity) < 1e-3
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.native import ensure_native

    index = ensure_native(read_deployment(dep), cores=1)             # formats measured on this CPU
    assert {g["format"] for layer in index["layers"] for g in layer.values()} <= {"dense", "csr", "bitmask"}
    assert index["tuning"]["threads"] == 1
    engines = ["onnxruntime", "native"] + (["deepsparse"] if unavailable("deepsparse") is None else [])
    for engine in engines:
        with WorkerRuntime(engine, dep / "model.onnx", cores=1, seq_len=1, cache_len=64) as w:
            assert w.name == engine
            assert w.decode(prompt, 16).tokens == torch_tokens, engine
    if sparsity:                 # every format on the real model, whatever the tuner picked: CSR (fixed rule), bitmask
        for kw in ({"crossover": 0.0}, {"formats": ("bitmask",)}):
            index = ensure_native(read_deployment(dep), cores=1, force=True, **kw)
            fmts = {g["format"] for layer in index["layers"] for g in layer.values()}
            assert fmts == ({"csr"} if "crossover" in kw else {"bitmask"})
            with WorkerRuntime("native", dep / "model.onnx", cores=1, seq_len=1, cache_len=64) as w:
                assert w.decode(prompt, 16).tokens == torch_tokens, fmts
