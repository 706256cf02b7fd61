"""GGUF export (export/gguf.py) and the llama.cpp engine (engine/llamacpp.py).

The export tests need only the gguf package; the llama.cpp ones need scripts/build-llamacpp.sh's build
(found through SPARSEDEPLOY_LLAMACPP or the default cache folder) and are skipped with the reason otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedeploy.errors import UserError

from .cli_helpers import run_cli


def _load(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def tiny_f32(tiny_llama_dir, tmp_path_factory):
    from sparsedeploy.export.gguf import export_gguf

    return export_gguf(str(tiny_llama_dir), qtype="f32", out=tmp_path_factory.mktemp("gguf") / "model-f32.gguf")


def _llamacpp_missing() -> str | None:
    from sparsedeploy.engine.llamacpp import LlamaCppRuntime

    return LlamaCppRuntime.unavailable()


def test_qk_permutation_round_trips():
    from sparsedeploy.export.gguf import permute_qk, unpermute_qk

    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)      # 2 heads of dim 8
    p = permute_qk(w, 2)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)
    # ggml pairs row i of the first half with row i of the second half: they become neighbours
    np.testing.assert_array_equal(p[:2], w[[0, 4]])


def test_pre_tokenizer_names():
    from sparsedeploy.export.gguf import pre_tokenizer_name

    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": bl}) == "gpt-2"
    smol = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bl]}
    assert pre_tokenizer_name({"pre_tokenizer": smol}) == "smollm"
    with pytest.raises(UserError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_f32_export_reads_back_exactly_with_metadata(tiny_llama_dir, tiny_f32):
    from sparsedeploy.export.gguf import read_fields, read_weights
    from sparsedeploy.pipeline.rundir import read_json

    model, tok = _load(tiny_llama_dir)
    back = read_weights(tiny_f32, model)
    sd = model.state_dict()
    assert set(back) == {k for k in sd if "rotary" not in k}
    for k, a in back.items():
        np.testing.assert_array_equal(a, sd[k].numpy(), err_msg=k)
    f = read_fields(tiny_f32)
    cfg = model.config
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 0
    assert f["llama.block_count"] == cfg.num_hidden_layers
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 128
    assert f["llama.rope.dimension_count"] == 16 and f["llama.context_length"] == 512
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == len(tok) and f["tokenizer.ggml.merges"] > 0
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    rec = read_json(tiny_f32.with_suffix(".json"))
    assert rec["type"] == "f32" and rec["readback"]["max_rel_error"] == 0.0
    assert not list(tiny_f32.parent.glob(".*tmp*"))                   # nothing half-written left


def test_transformers_reads_our_gguf_as_the_same_model(tiny_llama_dir, tiny_f32):
    """transformers' own GGUF loader (which undoes llama.cpp's q/k order) gives the same weights and tokens."""
    from transformers import AutoModelForCausalLM

    from sparsedeploy.export.verify import greedy_torch

    model, _ = _load(tiny_llama_dir)
    g = AutoModelForCausalLM.from_pretrained(str(tiny_f32.parent), gguf_file=tiny_f32.name, dtype=torch.float32).eval()
    gsd = g.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, gsd[k]), k
    prompt = [5, 17, 33, 8, 90, 41]
    assert greedy_torch(g, prompt, 10) == greedy_torch(model, prompt, 10)


def test_a_gguf_converts_once_per_content_not_per_path(tiny_f32, tmp_path, monkeypatch):
    """Loading a GGUF converts it to a cached safetensors folder keyed by its content: a copy elsewhere with a
    new mtime (the default model's file in a fresh virtual environment) finds the same conversion; a file that
    differs does not."""
    import os
    import shutil

    from sparsedeploy.pipeline.models import gguf_key, resolve

    monkeypatch.setenv("SPARSEDEPLOY_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "elsewhere" / "model-f32.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny_f32, copy)
    os.utime(copy, ns=(1, 1))
    assert gguf_key(copy) == gguf_key(tiny_f32)
    first, second = resolve(str(tiny_f32)).path, resolve(str(copy)).path
    assert first == second and len(list((tmp_path / "cache" / "models").iterdir())) == 1
    other = tmp_path / "model-f32.gguf"
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert gguf_key(other) != gguf_key(copy)


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_1"])
def test_quantized_types_store_blocks_and_read_back_close(tiny_llama_dir, tmp_path, qtype):
    from sparsedeploy.export.gguf import export_gguf
    from sparsedeploy.pipeline.rundir import read_json

    out = export_gguf(str(tiny_llama_dir), qtype=qtype, out=tmp_path / f"model-{qtype}.gguf")
    rec = read_json(out.with_suffix(".json"))
    stored = rec["stored"]["types"]
    assert stored["f32"] == 7                       # norms: 3 layers x 2 + the final one
    assert stored[qtype] >= 21                      # the 7 linears of each of the 3 layers
    assert 0 < rec["readback"]["max_rel_error"] < {"f16": 1e-3, "q8_0": 1.5e-2}.get(qtype, 0.2)
    f32_size = 4 * sum(p.numel() for p in _load(tiny_llama_dir)[0].parameters())
    assert rec["bytes"] < f32_size


def test_bad_type_and_format_are_one_line_errors(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["export", tiny_llama_dir, "--format", "gguf", "--type", "q5_k", "--out",
                            tmp_path / "m.gguf"], monkeypatch, capsys)
    assert code == 2 and "unknown GGUF type 'q5_k'" in err and "q4_0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["export", tiny_llama_dir, "--type", "q4_0"], monkeypatch, capsys)
    assert code == 2 and "--format gguf" in err
    code, _, err = run_cli(["export", tiny_llama_dir, "--format", "tflite"], monkeypatch, capsys)
    assert code == 2 and "unknown export format" in err
    assert not list(tmp_path.iterdir())


def test_unsupported_architecture_is_refused_before_writing(tiny_tokenizer, tmp_path):
    from tests.conftest import _build

    from sparsedeploy.export.gguf import export_gguf

    opt = _build("opt", len(tiny_tokenizer))
    with pytest.raises(UserError, match="Llama family"):
        export_gguf("opt", model=opt, tokenizer=tiny_tokenizer, out=tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_exports_gguf_and_reports(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "d" / "model-q8_0.gguf"
    code, stdout, _ = run_cli(["export", tiny_llama_dir, "--format", "gguf", "--type", "q8_0", "--out", out],
                              monkeypatch, capsys)
    assert code == 0 and out.is_file() and "q8_0" in stdout and "read back" in stdout
    code, _, err = run_cli(["export", tiny_llama_dir, "--format", "gguf", "--type", "q8_0", "--out", out],
                           monkeypatch, capsys)
    assert code == 0 and "up to date" in err


# ------------------------------------------------------------------------------------------- llama.cpp
def test_llamacpp_unavailable_is_one_line_and_bench_goes_on(monkeypatch, tmp_path):
    from sparsedeploy.bench.bench import BenchConfig, _llamacpp_jobs
    from sparsedeploy.engine import make_runtime, unavailable

    monkeypatch.setenv("SPARSEDEPLOY_LLAMACPP", str(tmp_path / "nothing"))
    why = unavailable("llamacpp")
    assert why and "scripts/build-llamacpp.sh" in why and "\n" not in why
    with pytest.raises(UserError, match="cannot run here"):
        make_runtime("llamacpp", tmp_path / "m.gguf")
    assert _llamacpp_jobs([], BenchConfig(engine="onnxruntime,llamacpp")) == ["onnxruntime"]
    with pytest.raises(UserError, match="no engine left"):
        _llamacpp_jobs([], BenchConfig(engine="llamacpp"))


def test_llamacpp_greedy_tokens_equal_pytorch_on_f32(tiny_llama_dir, tiny_f32):
    why = _llamacpp_missing()
    if why:
        pytest.skip(why)
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.verify import greedy_torch
    from sparsedeploy.pipeline.rundir import read_json

    rec = read_json(tiny_f32.with_suffix(".json"))
    assert rec["llamacpp"]["tokens_equal"] is True          # the export's own check ran
    model, _ = _load(tiny_llama_dir)
    prompt = [5, 17, 33, 8, 90, 41, 7, 3]
    with WorkerRuntime("llamacpp", tiny_f32, cores=1, seq_len=1, cache_len=64) as w:
        assert w.name == "llamacpp" and not w.torch_loaded
        res = w.decode(prompt, 12)
        assert res.tokens == greedy_torch(model, prompt, 12)
        assert len(res.decode_ms) == 11 and all(ms > 0 for ms in res.decode_ms)
        again = w.decode(prompt, 12, )                       # a new sequence: the cache was emptied
        assert again.tokens == res.tokens


def test_synthetic_word_level_model_exports_and_runs_in_llamacpp(tmp_path):
    """The synthetic models' whole-word vocabulary ("t0 t1 …") is written as a merge-less BPE vocabulary: the file
    reads back exactly and, where llama.cpp is built, it loads it and its greedy tokens equal PyTorch's."""
    from sparsedeploy.export.gguf import export_gguf, read_fields, read_weights
    from sparsedeploy.export.verify import greedy_torch
    from sparsedeploy.workflows.sweep import SYNTHETIC, synthetic_model, synthetic_tokenizer

    model = synthetic_model("llama-tiny", 2)
    tok = synthetic_tokenizer(SYNTHETIC["llama-tiny"]["vocab_size"])
    path = export_gguf("tiny", qtype="f32", out=tmp_path / "m.gguf", model=model, tokenizer=tok, verify=False)
    fields = read_fields(path)
    assert fields["tokenizer.ggml.pre"] == "default" and fields["tokenizer.ggml.tokens"] == 512
    sd = model.state_dict()
    for name, a in read_weights(path, model).items():
        np.testing.assert_array_equal(a, sd[name].numpy())
    why = _llamacpp_missing()
    if why:
        pytest.skip(why)
    from sparsedeploy.export.gguf import llamacpp_tokens

    prompt = [5, 6, 7, 8, 9]
    assert llamacpp_tokens(path, prompt, 8, cores=1) == greedy_torch(model, prompt, 8)


@pytest.mark.slow
def test_llamacpp_on_smollm2_f32_and_q4_0(tmp_path):
    """SmolLM2: the f32 GGUF's greedy tokens equal PyTorch's in llama.cpp; q4_0 reports perplexity pairs."""
    why = _llamacpp_missing()
    if why:
        pytest.skip(why)
    from sparsedeploy.export.gguf import export_gguf, read_fields
    from sparsedeploy.pipeline.models import load, resolve
    from sparsedeploy.pipeline.rundir import read_json

    model, tok = load(resolve("smollm2-135m"))
    f32 = export_gguf("smollm2-135m", qtype="f32", out=tmp_path / "model-f32.gguf", model=model, tokenizer=tok)
    assert read_json(f32.with_suffix(".json"))["llamacpp"]["tokens_equal"] is True
    # the tokenizer transformers rebuilds from the shipped GGUF is plain GPT-2 byte-level (its digit split is
    # lost): the export writes the pre-tokenizer of the tokenizer it is given
    assert read_fields(f32)["tokenizer.ggml.pre"] in ("gpt-2", "smollm")
    f32.unlink()
    q4 = export_gguf("smollm2-135m", qtype="q4_0", out=tmp_path / "model-q4_0.gguf", model=model, tokenizer=tok,
                     ppl_ctx=128, ppl_chunks=2)
    ppl = read_json(q4.with_suffix(".json"))["perplexity"]
    assert ppl["pytorch_fp32"] > 1 and (ppl["llamacpp"] or 0) > 1
