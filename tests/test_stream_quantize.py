"""Streamed quantize (decoder layers of the pruned model read one at a time from its safetensors, GPTQ in fp32, the
packed checkpoint and the fake-quant model written shard by shard) against the in-memory quantize: same codes,
scales, zero points and masks, same tensors, bit for bit; a bf16 input stays bf16; skip/resume; bad input; the
native engine reads a streamed (sharded) checkpoint; and a CUDA agreement check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparsedeploy.engine.native import gptq_codes as gc
from sparsedeploy.pipeline import quantize as qz
from sparsedeploy.pipeline import stages
from sparsedeploy.pipeline.rundir import RunDir
from sparsedeploy.pipeline.stream import INDEX


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _prune(model_dir: Path, corpus_file: Path, run: Path, stream: bool | None = False, **kw) -> Path:
    calib = stages.CalibConfig(str(model_dir), f"file:{corpus_file}", nsamples=4, seqlen=32, device="cpu")
    cfg = dict(model=str(model_dir), sparsity=0.5, allocator="dlp", method="wanda", calib=calib, device="cpu",
               stream=stream)
    cfg.update(kw)
    stages.prune(RunDir(run), stages.PruneConfig(**cfg))
    return run


def _copy(run: Path, to: Path) -> RunDir:
    shutil.copytree(run, to)
    return RunDir(to)


def _quantize(run: RunDir, stream, device="cpu", **kw) -> dict:
    stages.quantize(run, stages.QuantConfig(bits=kw.pop("bits", 4), group_size=kw.pop("group_size", 32), device=device,
                                            stream=stream, **kw))
    return run.stage("quantize")


def _codes(run: Path) -> dict[str, tuple]:
    meta, get = gc.read_packed(run / stages.QUANTIZED)
    return {m: get(m) for m in meta["quantized_linears"]}


DOC_SAME = ("bits", "group_size", "sym", "act_order", "format", "quantized_linears", "tied", "method", "calibration",
            "sparsity", "zeros_per_layer", "params")


def assert_same_quantize(a: Path, b: Path, dtype=None) -> int:
    """RUN b's quantize equals RUN a's: every packed tensor (the codes' bits, scales, zero points, masks, row
    pointers; the other tensors cast to `dtype` when given) and every fake-quant weight of RUN/model (cast to
    `dtype`), the codes the native engine reads, and quantize.json. Returns the number of zeros kept."""
    pa, pb = _tensors(a / stages.QUANTIZED), _tensors(b / stages.QUANTIZED)
    assert set(pa) == set(pb)
    for name, x in pa.items():
        y = pb[name]
        if dtype is not None and not name.rpartition(".")[2].startswith("weight_"):
            x = x.to(dtype)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs"
    ma, mb = _tensors(a / "model"), _tensors(b / "model")
    assert set(ma) == set(mb)
    zeros = 0
    for name, x in ma.items():
        x = x if dtype is None else x.to(dtype)
        assert x.dtype == mb[name].dtype and torch.equal(x, mb[name]), f"model {name} differs"
        assert torch.equal(x == 0, mb[name] == 0)
        zeros += int((x == 0).sum())
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys() and ca
    for m in ca:
        for u, v in zip(ca[m], cb[m]):
            assert np.array_equal(u, v), m
    da, db = (json.loads((r / stages.QUANTIZED / qz.QUANT_JSON).read_text()) for r in (a, b))
    assert {k: da[k] for k in DOC_SAME} == {k: db[k] for k in DOC_SAME}
    for k, v in da["bytes"].items():
        if k not in ("checkpoint", "other_tensors") and dtype is None:
            assert db["bytes"][k] == v, k
    # the unquantized pruned model is kept as it was
    pra, prb = _tensors(a / stages.PREQUANT), _tensors(b / stages.PREQUANT)
    assert set(pra) == set(prb) and all(torch.equal(pra[k], prb[k]) for k in pra)
    return zeros


@pytest.fixture(scope="module")
def pruned_runs(tiny_model_dir, corpus_file, tmp_path_factory) -> Path:
    """A Wanda+DLP 50% RUN of each tiny model (Llama, OPT), pruned in memory once."""
    return _prune(tiny_model_dir, corpus_file, tmp_path_factory.mktemp("pruned") / "run")


@pytest.mark.parametrize("variant", [{}, {"act_order": True, "sym": True, "true_sequential": True, "group_size": 24}],
                         ids=["g32", "actorder-sym-seq-g24"])
def test_streamed_quantize_equals_in_memory(pruned_runs, tmp_path, variant):
    mem, st = _copy(pruned_runs, tmp_path / "mem"), _copy(pruned_runs, tmp_path / "st")
    rm = _quantize(mem, False, **dict(variant))
    rs = _quantize(st, True, **dict(variant))
    assert not rm["streamed"] and rs["streamed"] and rs["peak_rss_mb"] > 0
    after = rs["peak_rss_mb_after_layer"]   # one entry a decoder layer, a running peak, never above the stage's
    assert len(after) == len(rm["peak_rss_mb_after_layer"]) >= 2 and after == sorted(after)
    assert 0 < after[-1] <= rs["peak_rss_mb"] + 1
    assert assert_same_quantize(mem.path, st.path) > 0
    # the streamed checkpoint restores the streamed RUN/model bit for bit, and the fake-quant model loads
    restored = qz.load_packed_state(st.path / stages.QUANTIZED)
    for k, v in _tensors(st.path / "model").items():
        assert torch.equal(restored[k], v), k
    model, _ = qz.load_packed(st.path / stages.QUANTIZED)
    assert model is not None


def test_streamed_quantize_skips_resumes_and_requantizes(tiny_llama_dir, corpus_file, tmp_path, monkeypatch):
    from sparsedeploy.pipeline import stream

    run = RunDir(_prune(tiny_llama_dir, corpus_file, tmp_path / "run", stream=True))
    _quantize(run, True)
    stamp = {f.name: f.stat().st_mtime_ns for f in (run.path / "model").iterdir()}
    first = _tensors(run.path / stages.QUANTIZED)
    _quantize(run, True)                                       # same arguments: skipped
    assert {f.name: f.stat().st_mtime_ns for f in (run.path / "model").iterdir()} == stamp
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1000)   # auto streams this (tiny) model now: still up to date
    _quantize(run, None)
    assert {f.name: f.stat().st_mtime_ns for f in (run.path / "model").iterdir()} == stamp
    # other bits: re-quantized from RUN/pruned (not from the fake-quant model), streamed again
    rec = _quantize(run, None, bits=8)
    assert rec["streamed"] and rec["bits"] == 8
    pruned = _tensors(run.path / stages.PREQUANT)
    fake8 = _tensors(run.path / "model")
    k = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(fake8[k] == 0, pruned[k] == 0) and not torch.equal(fake8[k], pruned[k])
    # back to 4 bits: the same checkpoint as the first time
    _quantize(run, True)
    again = _tensors(run.path / stages.QUANTIZED)
    assert set(again) == set(first) and all(torch.equal(again[n], first[n]) for n in first)
    # --no-stream after a streamed quantize: another key, recomputed in memory
    assert not _quantize(run, False)["streamed"]
    # an interrupted streamed quantize leaves the RUN as it was (no temp folders, nothing half-written)
    before = sorted(p.name for p in run.path.iterdir())

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(qz.PackedWriter, "close", boom)
    with pytest.raises(KeyboardInterrupt):
        _quantize(run, True, bits=3)
    assert sorted(p.name for p in run.path.iterdir()) == before


def test_bf16_sharded_input_stays_bf16(tiny_llama_dir, corpus_file, tmp_path, monkeypatch):
    """A bf16 model pruned streamed (bf16 shards): the streamed quantize computes the in-memory quantize's codes,
    scales and masks bit for bit (both run GPTQ in fp32 on the same bf16 values); it keeps every other tensor bf16
    and writes RUN/model in bf16 (the in-memory fp32 fake-quant weights rounded to bf16, zeros kept), where the
    in-memory path widens everything to fp32. Small shards: the packed checkpoint is sharded too, and readers take it."""
    from sparsedeploy.pipeline import stream

    from .shard_helpers import save_bf16_shards

    src = save_bf16_shards(tiny_llama_dir, tmp_path / "bf16")
    monkeypatch.setattr(stream, "MAX_SHARD_BYTES", 60_000)
    pruned = _prune(src, corpus_file, tmp_path / "pruned", stream=True, method="sparsegpt")
    assert all(t.dtype == torch.bfloat16 for t in _tensors(pruned / "model").values())
    mem, st = _copy(pruned, tmp_path / "mem"), _copy(pruned, tmp_path / "st")
    _quantize(mem, False)
    _quantize(st, True)
    assert (st.path / stages.QUANTIZED / INDEX).is_file() and (st.path / "model" / INDEX).is_file()
    assert assert_same_quantize(mem.path, st.path, dtype=torch.bfloat16) > 0
    assert all(t.dtype == torch.float32 for t in _tensors(mem.path / "model").values())
    packed = _tensors(st.path / stages.QUANTIZED)
    assert {t.dtype for n, t in packed.items() if not n.rpartition(".")[2].startswith("weight_")} == {torch.bfloat16}
    assert all(t.dtype == torch.bfloat16 for t in _tensors(st.path / "model").values())
    # the exact fake-quant values are the codes': the sharded checkpoint restores the in-memory RUN/model's linears
    restored = qz.load_packed_state(st.path / stages.QUANTIZED)
    fp32 = _tensors(mem.path / "model")
    doc = json.loads((st.path / stages.QUANTIZED / qz.QUANT_JSON).read_text())
    for m in doc["quantized_linears"]:
        assert torch.equal(restored[f"{m}.weight"], fp32[f"{m}.weight"]), m
    assert doc["bytes"]["checkpoint"] < json.loads((mem.path / stages.QUANTIZED / qz.QUANT_JSON).read_text())["bytes"]["checkpoint"]


def test_streamed_quantize_of_a_dense_calibrated_run(tiny_llama_dir, corpus_file, tmp_path):
    """No prune: the dense model itself is the input (streamed from the model folder, RUN/pruned never written)."""
    runs = []
    for name, stream_ in (("mem", False), ("st", True)):
        run = RunDir(tmp_path / name)
        stages.calibrate(run, stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 4, 32, device="cpu"))
        assert _quantize(run, stream_)["streamed"] == stream_
        runs.append(run.path)
    a, b = runs
    assert not (b / stages.PREQUANT).exists()
    pa, pb = _tensors(a / stages.QUANTIZED), _tensors(b / stages.QUANTIZED)
    assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
    ma, mb = _tensors(a / "model"), _tensors(b / "model")
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


BAD = [
    ("corrupt shard", "corrupt"),
    ("missing shard", "lacks weight file"),
    ("missing layer tensor", "lacks"),
]


@pytest.mark.parametrize("name,needle", BAD, ids=[b[0] for b in BAD])
def test_streamed_quantize_bad_input_is_one_line_exit_2(name, needle, tiny_llama_dir, corpus_file, tmp_path,
                                                       monkeypatch, capsys):
    from safetensors.torch import save_file

    from sparsedeploy.pipeline import stream

    from .cli_helpers import run_cli

    monkeypatch.setattr(stream, "MAX_SHARD_BYTES", 60_000)
    run = _prune(tiny_llama_dir, corpus_file, tmp_path / "run", stream=True, allocator="uniform")
    model = run / "model"
    shards = sorted(model.glob("*.safetensors"))
    assert len(shards) > 1
    if name == "corrupt shard":
        shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    elif name == "missing shard":
        shards[-1].unlink()
    else:   # a complete-looking folder whose last layer lacks a tensor
        index = json.loads((model / INDEX).read_text())
        victim = "model.layers.2.mlp.down_proj.weight"
        f = model / index["weight_map"][victim]
        t = load_file(str(f))
        del t[victim]
        save_file(t, str(f), metadata={"format": "pt"})
        del index["weight_map"][victim]
        (model / INDEX).write_text(json.dumps(index))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    capsys.readouterr()
    code, out, err = run_cli(["quantize", str(run), "--stream", "--device", "cpu", "--group-size", "32"],
                             monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before      # nothing written, nothing moved
    assert not RunDir(run).stage("quantize")


def test_native_int4_takes_a_streamed_sharded_checkpoint(tiny_llama_dir, corpus_file, tmp_path, monkeypatch):
    """export + compile --weights int4 of a streamed-quantized RUN (packed checkpoint in shards) decodes the same
    tokens as of the in-memory-quantized RUN, from the same GPTQ codes."""
    from sparsedeploy.bench.bench import compile_deployment
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stream

    pruned = _prune(tiny_llama_dir, corpus_file, tmp_path / "pruned", allocator="uniform", sparsity=0.6)
    mem, st = _copy(pruned, tmp_path / "mem"), _copy(pruned, tmp_path / "st")
    _quantize(mem, False, group_size=64)
    monkeypatch.setattr(stream, "MAX_SHARD_BYTES", 60_000)
    _quantize(st, True, group_size=64)
    assert (st.path / stages.QUANTIZED / INDEX).is_file()
    recs = {}
    for r in (mem, st):
        dep = export(str(r.path), seqlen=64)
        recs[r.path.name] = (read_deployment(dep)["verified"]["tokens"],
                             compile_deployment(dep, "native", cores=2, crossover=0.55, force=True, weights="int4"))
    (tm, rm), (ts, rs) = recs["mem"], recs["st"]
    assert tm == ts                                                    # ONNX greedy tokens of the fake-quant models
    assert "GPTQ checkpoint's codes" in rs["native"]["quantization"] and rs["tokens_match_pytorch"] is True
    assert rm["tokens"] == rs["tokens"] and rs["tokens"]              # the native int4 engine's tokens


def _agree(cpu: Path, gpu: Path, max_flips: float = 0.05) -> dict:
    """GPU and CPU quantizations agree: the same zeros exactly; codes equal but for a small fraction (GPTQ's rounding
    flips a few across devices, and each flip changes the error compensation of the row's later columns and the
    inputs of every later layer, so differences spread a little); the dequantized weights equal within float
    tolerance in aggregate: per linear, the difference is at most a tenth of the weights' norm, and the
    weights whose codes agree differ by under half a step (99th percentile; a group whose extreme weight moved
    shifts its whole grid). Returns what it measured."""
    a, b = _codes(cpu), _codes(gpu)
    assert a.keys() == b.keys() and a
    flips = total = 0
    worst_norm = worst_p99 = 0.0
    for m in a:
        qa, sa, za, ka, gs = a[m]
        qb, sb, zb, kb, _ = b[m]
        assert np.array_equal(ka, kb), m                                   # the pruned zeros, exactly
        wa, wb = gc.dequantize(qa, sa, za, ka, gs), gc.dequantize(qb, sb, zb, kb, gs)
        assert np.array_equal(wa == 0, ~ka) and np.array_equal(wb == 0, ~kb), m
        step = sa[:, gc.group_index(qa.shape[1], gs)]
        same = (qa == qb) & ka
        flips += int(((qa != qb) & ka).sum())
        total += int(ka.sum())
        worst_norm = max(worst_norm, float(np.linalg.norm(wb - wa) / np.linalg.norm(wa)))
        worst_p99 = max(worst_p99, float(np.percentile(np.abs(wb - wa)[same] / step[same], 99)))
    got = {"flips": flips / total, "worst_rel_norm": worst_norm, "worst_p99_steps_where_codes_equal": worst_p99}
    assert got["flips"] <= max_flips and worst_norm <= 0.1 and worst_p99 <= 0.5, got
    mc, mg = _tensors(cpu / "model"), _tensors(gpu / "model")
    for k in mc:
        assert torch.equal(mc[k] == 0, mg[k] == 0), k
    return got


def test_the_agreement_check_takes_rounding_noise_and_rejects_another_quantization(tiny_llama_dir, corpus_file,
                                                                                    tmp_path):
    """The CUDA test's check, on the CPU: a 1% change of the damping (H moves by ~1e-4 of its diagonal, far more than
    a device's float rounding) passes it; another quantization of the same weights (act-order) does not."""
    run = _prune(tiny_llama_dir, corpus_file, tmp_path / "run", allocator="uniform")
    a, b, c = (_copy(run, tmp_path / n) for n in "abc")
    _quantize(a, True)
    _quantize(b, True, percdamp=0.0101)
    _quantize(c, True, act_order=True)
    assert _agree(a.path, b.path)["flips"] > 0          # some codes flipped, within the tolerance
    with pytest.raises(AssertionError):
        _agree(a.path, c.path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_cuda_quantize_agrees_with_cpu(pruned_runs, tmp_path, stream):
    cpu, gpu = _copy(pruned_runs, tmp_path / "cpu"), _copy(pruned_runs, tmp_path / "gpu")
    _quantize(cpu, stream)
    rec = _quantize(gpu, stream, device="cuda")
    assert rec["device"].startswith("cuda") and rec["streamed"] == stream
    _agree(cpu.path, gpu.path)
