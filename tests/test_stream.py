"""Streamed calibrate/allocate/prune (decoder layers read one at a time from safetensors, written shard by shard)
against the in-memory stages: same statistics, same ratios, same masks and weights, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsedeploy.pipeline import stages
from sparsedeploy.pipeline.rundir import RunDir
from sparsedeploy.pipeline.stream import INDEX, ShardWriter


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cfg(model_dir, corpus_file, stream, **kw):
    calib = stages.CalibConfig(str(model_dir), f"file:{corpus_file}", nsamples=4, seqlen=32, device="cpu")
    base = dict(model=str(model_dir), sparsity=0.6, allocator="dlp", method="wanda", calib=calib, device="cpu",
                stream=stream)
    base.update(kw)
    return stages.PruneConfig(**base)


def assert_same_prune(a: Path, b: Path, dtype=None) -> int:
    """Every tensor of RUN b's model equals RUN a's (a's cast to `dtype` when given); returns the pruned-zero count."""
    ta, tb = _tensors(a / "model"), _tensors(b / "model")
    assert set(ta) == set(tb)
    zeros = 0
    for name, x in ta.items():
        y = tb[name]
        if dtype is not None:
            x = x.to(dtype)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs"
        assert torch.equal(x == 0, y == 0), name
        zeros += int((y == 0).sum())
    assert json.loads((a / "ratios.json").read_text())["layers"] == json.loads((b / "ratios.json").read_text())["layers"]
    na = load_file(str(a / stages.CALIB_STATS)) if (a / stages.CALIB_STATS).is_file() else {}
    nb = load_file(str(b / stages.CALIB_STATS)) if (b / stages.CALIB_STATS).is_file() else {}
    assert set(na) == set(nb) and all(torch.equal(na[k], nb[k]) for k in na)
    return zeros


@pytest.mark.parametrize("method,allocator", [("wanda", "dlp"), ("sparsegpt", "owl"), ("magnitude", "uniform")])
def test_streamed_prune_equals_in_memory(tiny_model_dir, corpus_file, tmp_path, method, allocator):
    mem, st = RunDir(tmp_path / "mem"), RunDir(tmp_path / "st")
    stages.prune(mem, _cfg(tiny_model_dir, corpus_file, False, method=method, allocator=allocator))
    stages.prune(st, _cfg(tiny_model_dir, corpus_file, True, method=method, allocator=allocator))
    assert assert_same_prune(mem.path, st.path) > 0
    man = json.loads((st.path / "manifest.json").read_text())["stages"]
    assert man["prune"]["streamed"] and man["prune"]["peak_rss_mb"] > 0
    if allocator != "uniform":
        assert man["calibrate"]["streamed"] and man["allocate"]["streamed"]
    rm, rs = (json.loads((r.path / "ratios.json").read_text()) for r in (mem, st))
    assert rm["realized_sparsity"] == rs["realized_sparsity"]
    # the streamed output is a plain HF folder
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(st.path / "model")


def test_streamed_sequential_groups_equal_in_memory(tiny_llama_dir, corpus_file, tmp_path):
    mem, st = RunDir(tmp_path / "mem"), RunDir(tmp_path / "st")
    stages.prune(mem, _cfg(tiny_llama_dir, corpus_file, False, method="sparsegpt", sequential=True))
    stages.prune(st, _cfg(tiny_llama_dir, corpus_file, True, method="sparsegpt", sequential=True))
    assert assert_same_prune(mem.path, st.path) > 0


def test_bf16_sharded_input_stays_bf16(tiny_llama_dir, corpus_file, tmp_path):
    """A bf16 model in shards: the streamed prune writes bf16 shards equal to the in-memory (fp32) prune's
    weights rounded to bf16, with the same masks."""
    from .shard_helpers import save_bf16_shards

    src = save_bf16_shards(tiny_llama_dir, tmp_path / "bf16")
    assert (src / INDEX).is_file()
    mem, st = RunDir(tmp_path / "mem"), RunDir(tmp_path / "st")
    stages.prune(mem, _cfg(src, corpus_file, False, method="sparsegpt"))
    stages.prune(st, _cfg(src, corpus_file, True, method="sparsegpt"))
    assert assert_same_prune(mem.path, st.path, dtype=torch.bfloat16) > 0
    assert all(t.dtype == torch.bfloat16 for t in _tensors(st.path / "model").values())


def test_shard_writer_splits_and_indexes(tmp_path):
    ts = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}   # 400 bytes each
    w = ShardWriter(tmp_path / "m", max_shard_bytes=900)
    for k, v in ts.items():
        w.add(k, v)
    assert w.close() == 2000
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3
    back = _tensors(tmp_path / "m")
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) for k in ts)


def test_shard_writer_holds_no_tensor_data_and_closes_a_shard_whose_header_is_full(tmp_path, monkeypatch):
    from safetensors import safe_open

    from sparsedeploy.pipeline import stream

    w = ShardWriter(tmp_path / "m", max_shard_bytes=1 << 22)
    w.add("a", torch.arange(100_000, dtype=torch.float32))
    part = tmp_path / "m" / "part-00000.safetensors"
    assert part.stat().st_size == 8 + stream.HEADER_RESERVE + 400_000   # written at once, not buffered
    monkeypatch.setattr(stream, "HEADER_RESERVE", 600)   # room for a few header entries only
    w2 = ShardWriter(tmp_path / "n", max_shard_bytes=1 << 22)
    ts = {f"layer.{i}.a_rather_long_tensor_name.weight": torch.full((3,), float(i)).to(torch.bfloat16) for i in range(12)}
    for k, v in ts.items():
        w2.add(k, v)
    w2.close()
    index = json.loads((tmp_path / "n" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1   # far under max_shard_bytes: the header closed them
    for k, f in index["weight_map"].items():
        with safe_open(str(tmp_path / "n" / f), "pt") as g:
            assert torch.equal(g.get_tensor(k), ts[k]) and g.metadata() == {"format": "pt"}


def test_streamed_walk_frees_the_embeddings_after_layer_0s_inputs(tiny_llama_dir, corpus_file, tmp_path):
    from sparsedeploy.pipeline.stream import StreamedModel
    from sparsedeploy.pipeline.walker import walk

    from .shard_helpers import save_bf16_shards

    sm = StreamedModel(save_bf16_shards(tiny_llama_dir, tmp_path / "bf16"))
    seen = []
    walk(sm.model, torch.randint(0, 100, (2, 16)), lambda i, layer, st: seen.append(i), stream=sm)
    assert sm.model.get_input_embeddings().weight.device.type == "meta"
    walk(sm.model, torch.randint(0, 100, (2, 16)), lambda i, layer, st: seen.append(i), stream=sm)   # again: reloaded
    assert seen == list(range(len(seen) // 2)) * 2 and seen


def _synth(tmp_path, tokenizer_dir, name="syn", **kw):
    from sparsedeploy.workflows.synth import SynthConfig, synth

    cfg = SynthConfig("llama-tiny", kw.pop("layers", 3), kw.pop("dtype", "bf16"), str(tokenizer_dir),
                      max_shard_bytes=kw.pop("max_shard_bytes", 100_000))
    return synth(cfg, tmp_path / name)


def test_synth_writes_a_labelled_sharded_model_with_outlier_channels(tiny_llama_dir, corpus_file, tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    doc = _synth(tmp_path, tiny_llama_dir)
    out = Path(doc["out"])
    assert doc["shards"] > 1 and (out / INDEX).is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["sparsedeploy_synthetic"]["preset"] == "llama-tiny" and conf["num_hidden_layers"] == 3
    assert conf["vocab_size"] == len(AutoTokenizer.from_pretrained(out)) == doc["synthetic"]["vocab_size"]
    assert "SYNTHETIC" in (out / "README.md").read_text()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            assert "sparsedeploy_synthetic" in h.metadata()
    model = AutoModelForCausalLM.from_pretrained(out)            # real shapes, loadable as a plain HF model
    assert model.config.hidden_size == 64 and AutoConfig.from_pretrained(out).sparsedeploy_synthetic
    assert all(t.dtype == torch.bfloat16 for t in _tensors(out).values())
    # the same arguments give the same bytes
    again = _synth(tmp_path, tiny_llama_dir, name="again")
    a, b = _tensors(out), _tensors(Path(again["out"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # calibration sees the outlier channels: a few input columns of q_proj with much larger norms
    run = RunDir(tmp_path / "cal")
    stages.calibrate(run, stages.CalibConfig(str(out), f"file:{corpus_file}", 4, 32, device="cpu", stream=True))
    norms = load_file(str(run.path / stages.CALIB_STATS))
    col = norms["2.self_attn.q_proj"]
    assert sorted(torch.topk(col, len(doc["outlier_channels"])).indices.tolist()) == doc["outlier_channels"]
    assert float(col.max() / col.median()) > 3


def test_streamed_prune_of_a_synthetic_bf16_model(tiny_llama_dir, corpus_file, tmp_path):
    out = Path(_synth(tmp_path, tiny_llama_dir)["out"])
    mem, st = RunDir(tmp_path / "mem"), RunDir(tmp_path / "st")
    stages.prune(mem, _cfg(out, corpus_file, False))
    stages.prune(st, _cfg(out, corpus_file, True))
    assert assert_same_prune(mem.path, st.path, dtype=torch.bfloat16) > 0
    conf = json.loads((st.path / "model" / "config.json").read_text())
    assert conf["sparsedeploy_synthetic"]["preset"] == "llama-tiny"     # the label travels with the model


@pytest.mark.slow
def test_streamed_prune_equals_in_memory_on_smollm2(tmp_path):
    """The real default model (30 layers, tied embeddings), Wanda + DLP 60%, a small calibration."""
    def cfg(stream):
        calib = stages.CalibConfig("smollm2-135m", "wikipedia-summaries", 2, 32, 0, None, "cpu")
        return stages.PruneConfig("smollm2-135m", 0.6, "dlp", "wanda", calib=calib, device="cpu", stream=stream)

    mem, st = RunDir(tmp_path / "mem"), RunDir(tmp_path / "st")
    stages.prune(mem, cfg(False))
    stages.prune(st, cfg(True))
    assert assert_same_prune(mem.path, st.path) > 0
    man = json.loads((st.path / "manifest.json").read_text())["stages"]
    assert man["prune"]["streamed"] and man["calibrate"]["streamed"] and man["allocate"]["streamed"]


BAD = [
    ("unknown preset", ["synth", "gpt5", "--out", "{new}"], "preset"),
    ("bad dtype", ["synth", "llama-tiny", "--out", "{new}", "--dtype", "int3"], "dtype"),
    ("bad layers", ["synth", "llama-tiny", "--out", "{new}", "--layers", "0"], "layers"),
    ("out not empty", ["synth", "llama-tiny", "--out", "{full}"], "not empty"),
    ("stream with --bits", ["prune", "{model}", "--out", "{new}", "--sparsity", "0.5", "--method", "sparsegpt",
                            "--bits", "4", "--stream"], "stream"),
    ("stream without safetensors", ["calibrate", "{pickle}", "--out", "{new}", "--stream", "--allow-pickle"], "safetensors"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(name, argv, needle, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from .cli_helpers import run_cli

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"not really")
    new = tmp_path / "new"
    subs = {"new": str(new), "full": str(full), "model": str(tiny_llama_dir), "pickle": str(pickle)}
    code, out, err = run_cli([a.format(**subs) for a in argv], monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0].lower(), err
    assert not new.exists() or not any(new.iterdir())


def test_auto_streams_above_the_size_threshold(tiny_llama_dir, corpus_file, tmp_path, monkeypatch):
    from sparsedeploy.pipeline import stream

    assert not stream.should_stream(tiny_llama_dir, None)            # small: in memory
    assert stream.should_stream(tiny_llama_dir, True) and not stream.should_stream(tiny_llama_dir, False)
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1000)
    assert stream.should_stream(tiny_llama_dir, None)
    run = RunDir(tmp_path / "auto")
    stages.prune(run, _cfg(tiny_llama_dir, corpus_file, None, method="magnitude", allocator="uniform"))
    assert json.loads((run.path / "manifest.json").read_text())["stages"]["prune"]["streamed"]


def test_cli_labels_a_synthetic_run(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    from .cli_helpers import run_cli

    out = Path(_synth(tmp_path, tiny_llama_dir)["out"])
    run = tmp_path / "run"
    code, stdout, err = run_cli(["prune", out, "--out", run, "--sparsity", "0.5", "--calib", f"file:{corpus_file}",
                                 "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--stream"], monkeypatch, capsys)
    assert code == 0, err
    assert "SYNTHETIC model (llama-tiny shapes" in stdout
    man = json.loads((run / "manifest.json").read_text())["stages"]
    assert man["prune"]["synthetic"]["preset"] == "llama-tiny" and man["calibrate"]["synthetic"]["layers"] == 3
