"""Perplexity through an engine equals PyTorch's on the same weights and windows (issue 13's check)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pruned_deployment(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama magnitude-pruned to 70% (so the native engine stores sparse groups), exported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline.arch import prunable_linears
    from sparsedeploy.pipeline.prune import prune_magnitude

    root = tmp_path_factory.mktemp("quality")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    for lin in prunable_linears(model).values():
        lin.weight.data = prune_magnitude(lin.weight.data, None, 0.7, None)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(root / "model")
    return root / "model", export(str(root / "model"), seqlen=64, out=root / "deployment")


@pytest.mark.parametrize("engine", ["onnxruntime", "native"])
def test_engine_perplexity_equals_pytorch_on_the_same_windows(pruned_deployment, corpus_file, engine):
    from sparsedeploy.bench.quality import engine_perplexity, windows_for
    from sparsedeploy.pipeline.stages import EvalConfig, evaluate

    model_dir, dep = pruned_deployment
    data = f"file:{corpus_file}"
    if engine == "native":
        from sparsedeploy.export.native import ensure_native
        from sparsedeploy.export.onnx_kv import read_deployment

        ensure_native(read_deployment(dep), cores=1)
    windows = windows_for(dep, data, 32, 3)
    assert windows.shape == (3, 32)
    ours = engine_perplexity(dep / "model.onnx", engine, windows, cores=1, cache_len=64)
    ref = evaluate(str(model_dir), EvalConfig(data=data, seqlen=32, max_windows=3, device="cpu"))
    assert ours["tokens"] == 3 * 31 and ours["engine"] == engine
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    # and it is sensitive: scoring shifted windows (the wrong next tokens) gives a different number
    worse = engine_perplexity(dep / "model.onnx", engine, np.roll(windows, 1, axis=1), cores=1, cache_len=64)
    assert abs(worse["perplexity"] - ours["perplexity"]) > 1e-3 * ours["perplexity"]


def test_eval_cli_through_an_engine_and_its_bad_input(pruned_deployment, corpus_file, monkeypatch, capsys):
    from .cli_helpers import run_cli

    _, dep = pruned_deployment
    code, out, err = run_cli(["eval", dep, "--engine", "onnxruntime", "--seqlen", 32, "--max-windows", 2,
                              "--data", f"file:{corpus_file}", "--cores", 1], monkeypatch, capsys)
    assert code == 0, err
    assert "through onnxruntime" in out and "2×32 tokens" in out
    code, out, err = run_cli(["eval", dep, "--engine", "onnxruntime", "--seqlen", 500, "--data", f"file:{corpus_file}"],
                             monkeypatch, capsys)
    assert code == 2 and err.strip().startswith("error:") and "--seqlen 500" in err and "Traceback" not in err
    code, out, err = run_cli(["eval", dep, "--engine", "llamacpp", "--seqlen", 32], monkeypatch, capsys)
    assert code == 2 and "does not run a deployment folder" in err


def test_int8_deployment_perplexity_through_native_equals_pytorch_on_the_quantised_model(pruned_deployment, corpus_file):
    """Issue 13: perplexity through the native engine on an int8 build (decoder groups and lm_head int8 per row,
    int8 activations where the kernels take them) equals PyTorch's on the same quantised weights and activations
    within 0.5%; the lm_head really is int8, and fp32 PyTorch is measurably different."""
    import torch

    from sparsedeploy.bench.quality import engine_perplexity, windows_for
    from sparsedeploy.engine.native.model import NativeModel
    from sparsedeploy.export.native import ensure_native, lowbit_reference_model
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.pipeline.evaluate import perplexity

    _, dep = pruned_deployment
    meta = read_deployment(dep)
    index = ensure_native(meta, cores=1, weights="int8")
    assert index["weights"] == "int8" and index["head"] == "int8"
    assert NativeModel(dep / "native").lm_head.fmt == "int8"
    windows = windows_for(dep, f"file:{corpus_file}", 32, 3)
    ours = engine_perplexity(dep / "model.onnx", "native", windows, cores=1, cache_len=64)["perplexity"]
    model, _, quantise_activations = lowbit_reference_model(meta, index)
    plain = perplexity(model, torch.from_numpy(windows))
    hooks = quantise_activations()
    try:
        ref = perplexity(model, torch.from_numpy(windows))
    finally:
        for h in hooks:
            h.remove()
    assert ours == pytest.approx(ref, rel=5e-3)
    assert ours == pytest.approx(ref, rel=1e-3)          # in fact much closer: the same arithmetic
    assert plain != ref                                  # activation quantisation is modelled, not ignored
    ensure_native(meta, cores=1, weights="fp32")         # leave the fp32 build for the other tests
