"""Export, runtimes, decode loop and verification on tiny random Llama (GQA) and OPT models.

References are independent of the code under test: PyTorch's own HF forward / generate-with-cache for
tokens and logits, torch's count of zeros for sparsity, a fake engine whose outputs encode exactly
which cache entries it was shown for the decode loop.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsedeploy  # noqa: F401  (NM_DISABLE_ANALYTICS before deepsparse / sparseml)
from sparsedeploy.engine import base as rtmod
from sparsedeploy.engine.decode import KVSlots, greedy_decode
from sparsedeploy.engine import make_runtime, model_io
from sparsedeploy.engine.onnxruntime import OrtRuntime
from sparsedeploy.engine.worker import WorkerRuntime
from sparsedeploy.errors import UserError
from sparsedeploy.export.onnx_kv import KVCacheLM, export_onnx, read_deployment, write_deployment
from sparsedeploy.export.verify import (
    VerificationError,
    greedy_torch,
    onnx_weight_sparsity,
    verify_sparsity,
    verify_tokens,
)
from sparsedeploy.pipeline.arch import prunable_linears
from sparsedeploy.pipeline.prune import prune_magnitude

from .conftest import _build

DS_REASON = rtmod.unavailable("deepsparse")
needs_deepsparse = pytest.mark.skipif(DS_REASON is not None, reason=f"DeepSparse unavailable: {DS_REASON}")
SEQLEN = 48
N_NEW = 16
# DeepSparse in tests runs on one core: with two, its spinning threads collapse (seconds per step) whenever
# anything else on the machine wants a core; one thread only time-shares.
DS_CORES = 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: HF generate (greedy, its own cache), never stopping at EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer("the cat sat on a mat while dogs ran far").input_ids


@pytest.fixture(scope="module", params=["llama", "opt"])
def deployed(request, tmp_path_factory, tiny_tokenizer, prompt):
    model = _build(request.param, len(tiny_tokenizer))
    out = write_deployment(model, tiny_tokenizer, tmp_path_factory.mktemp(f"dep-{request.param}") / "deploy",
                           seqlen=SEQLEN)
    return request.param, model, out, hf_greedy(model, prompt, N_NEW)


# -------------------------------------------------------------------------------------- graph (torch)
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_wrapper_matches_hf_forward_in_steps_and_any_slot_order(kind):
    """Prefill 5 tokens, then 3 single steps with the cache slots shuffled and 2 empty slots: logits equal HF's."""
    model = _build(kind, 97, seed=1)
    w = KVCacheLM(model).eval()
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits[0]
        L0 = 5
        causal = torch.tril(torch.ones(L0, L0, dtype=torch.long))[None, None]
        first = w(ids[:, :L0], torch.ones(1, L0, dtype=torch.long),
                  *[torch.zeros(1, w.kv_heads, 0, w.head_dim)] * (2 * w.num_layers),
                  torch.arange(L0)[None], causal)
        torch.testing.assert_close(first[0][0], ref[:L0], atol=2e-5, rtol=1e-4)
        cache = [p[0] for p in first[1:]]                      # [Hkv, 5, D] each, chronological
        for t in range(L0, 8):
            P = cache[0].shape[1] + 2
            perm = torch.randperm(cache[0].shape[1], generator=torch.Generator().manual_seed(t))
            pasts, valid = [], torch.zeros(1, P + 1, dtype=torch.long)
            for c in cache:                                    # slots: [empty, empty, shuffled entries]
                buf = torch.full((1, w.kv_heads, P, w.head_dim), 7.0)   # garbage in empty slots
                buf[0, :, 2:] = c[:, perm]
                pasts.append(buf)
            valid[0, 2:] = 1
            out = w(ids[:, t:t + 1], valid, *pasts, torch.tensor([[t]]), valid.view(1, 1, 1, -1))
            torch.testing.assert_close(out[0][0, 0], ref[t], atol=2e-5, rtol=1e-4)
            cache = [torch.cat([c, o[0, :, -1:]], dim=1) for c, o in zip(cache, out[1:])]


def test_export_metadata_names_and_deployment_files(deployed):
    kind, model, out, _ = deployed
    meta = read_deployment(out)
    cfg = model.config
    assert meta["arch"] == kind and meta["num_layers"] == cfg.num_hidden_layers
    assert meta["num_kv_heads"] == (2 if kind == "llama" else 4) and meta["head_dim"] == 16
    assert meta["vocab_size"] == cfg.vocab_size and meta["seqlen"] == SEQLEN
    n = cfg.num_hidden_layers
    past = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    assert meta["input_names"] == ["input_ids", "attention_mask", *past, "positions", "causal_mask"]
    assert meta["output_names"] == ["logits", *[p.replace("past_key_values.", "present.") for p in past]]
    io = model_io(out / "model.onnx")
    assert io["input_names"] == meta["input_names"] and io["kv_heads"] == meta["num_kv_heads"]
    for name in ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    assert "eos_token" in json.loads((out / "special_tokens_map.json").read_text())
    # every prunable linear's MatMul weight carries its torch name
    assert meta["renamed_weights"] == len(prunable_linears(model)) + 1          # + lm_head
    assert not list(out.parent.glob(".deploy.tmp-*"))


# ------------------------------------------------------------------------------------ ONNX Runtime
def test_ort_greedy_tokens_equal_pytorch(deployed, prompt):
    kind, model, out, ref = deployed
    assert greedy_torch(model, prompt, N_NEW) == ref
    got = verify_tokens(out, model, prompt, n=N_NEW)
    assert got["tokens"] == ref and got["engine"] == "onnxruntime"
    rt = OrtRuntime(out / "model.onnx", cores=2, seq_len=1, cache_len=SEQLEN)
    try:
        by_token = greedy_decode(rt, prompt, N_NEW)
        chunked = greedy_decode(rt, prompt, N_NEW, prefill=rt)
    finally:
        rt.close()
    assert by_token.tokens == ref and by_token.prefill == "token by token"
    assert chunked.tokens == ref and chunked.prefill.startswith("1 chunk")


def test_ort_matches_torch_wrapper_for_other_shapes(deployed):
    """Dynamic axes really are dynamic: L=3 with 6 cached slots, every output equals the torch wrapper's."""
    _, model, out, _ = deployed
    w = KVCacheLM(model).eval()
    g = torch.Generator().manual_seed(3)
    ins = list(w.example_inputs(seq_len=3, past_len=6))
    for i in range(2, len(ins) - 2):
        ins[i] = torch.randn(ins[i].shape, generator=g)
    ins[1][0, :2] = 0                                       # two empty slots on the left
    ins[-1][0, 0, :, :2] = 0
    with torch.no_grad():
        ref = w(*ins)
    rt = OrtRuntime(out / "model.onnx")
    got = rt.run({n: t.numpy() for n, t in zip(rt.input_names, ins)})
    assert list(got) == rt.output_names
    for name, r in zip(rt.output_names, ref):
        np.testing.assert_allclose(got[name], r.numpy(), atol=3e-5, rtol=1e-4, err_msg=name)


# --------------------------------------------------------------------------------------- DeepSparse
@needs_deepsparse
def test_deepsparse_greedy_tokens_equal_pytorch_in_worker(deployed, prompt):
    _, model, out, ref = deployed
    before = sha256(out / "model.onnx")
    with WorkerRuntime("deepsparse", out / "model.onnx", cores=DS_CORES, seq_len=1, cache_len=SEQLEN,
                       prefill_len=4) as w:
        assert w.name == "deepsparse" and w.fallback_reason is None
        assert w.torch_loaded is False and w.pid != os.getpid()
        res = w.decode(prompt, N_NEW)
        assert res.tokens == ref, (res.tokens, ref)
        assert res.prefill.startswith(f"{len(prompt) // 4} chunk(s) of 4")
        assert len(res.decode_ms) == N_NEW - 1
        one = w.run({"input_ids": np.array([[5]]), "attention_mask": np.ones((1, SEQLEN), np.int64),
                     **{n: np.zeros((1, w.io["kv_heads"], SEQLEN - 1, w.io["head_dim"]), np.float32)
                        for n in w.io["past_names"]},
                     "positions": np.array([[0]]), "causal_mask": np.ones((1, 1, 1, SEQLEN), np.int64)})
        assert one["logits"].shape == (1, 1, model.config.vocab_size)
    assert sha256(out / "model.onnx") == before


@needs_deepsparse
def test_deepsparse_in_process_never_touches_original_file(deployed, prompt):
    _, model, out, ref = deployed
    files = {p.name: sha256(p) for p in out.iterdir() if p.is_file()}
    rt = make_runtime("deepsparse", out / "model.onnx", cores=DS_CORES, seq_len=1, cache_len=SEQLEN)
    tmp = rt._tmp
    try:
        assert rt.name == "deepsparse" and rt.compile_seconds > 0
        shapes = dict(zip(rt.input_names, rt.input_shapes))         # static, i.e. DeepSparse's optimized path
        assert shapes["input_ids"] == (1, 1) and shapes["causal_mask"] == (1, 1, 1, SEQLEN)
        assert shapes["past_key_values.0.key"] == (1, rt.io["kv_heads"], SEQLEN - 1, rt.io["head_dim"])
        res = greedy_decode(rt, prompt, 4)
        assert res.tokens == ref[:4]
    finally:
        rt.close()
    assert not Path(tmp).exists()
    assert {p.name: sha256(p) for p in out.iterdir() if p.is_file()} == files


def test_deepsparse_text_generation_pipeline_loads_where_it_imports(deployed, tmp_path):
    if DS_REASON is not None:
        pytest.skip(f"DeepSparse unavailable: {DS_REASON}")
    try:        # `from deepsparse import TextGeneration` is lazy: import the pipeline module itself
        import deepsparse.transformers.pipelines.text_generation  # noqa: F401
        from deepsparse import TextGeneration
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"DeepSparse's TextGeneration pipeline does not import here "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    _, _, out, _ = deployed
    copy = tmp_path / "dep"
    shutil.copytree(out, copy)                          # the pipeline rewrites model.onnx in place
    pipe = TextGeneration(model_path=str(copy), internal_kv_cache=False, sequence_length=SEQLEN)
    text = pipe(prompt="the cat", max_new_tokens=4).generations[0].text
    assert isinstance(text, str)


# ------------------------------------------------------------------------------------------ sparsity
def test_magnitude_pruned_onnx_sparsity_equals_plan(tmp_path, tiny_tokenizer):
    model = _build("llama", len(tiny_tokenizer), seed=4)
    linears = prunable_linears(model)
    plan = {}
    with torch.no_grad():
        for j, (name, lin) in enumerate(linears.items()):
            target = [0.2, 0.5, 0.7, 0.35][j % 4]
            lin.weight.copy_(prune_magnitude(lin.weight, None, target))
            plan[name] = float((lin.weight == 0).float().mean())
            assert abs(plan[name] - target) < 0.01
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    measured = onnx_weight_sparsity(path)
    assert set(plan) <= set(measured) and "lm_head" in measured
    for name, want in plan.items():
        assert measured[name] == pytest.approx(want, abs=1e-9), name
    assert measured["lm_head"] < 0.01
    # SparseML's onnx_nodes_sparsities and our direct count of the initializers agree exactly
    from sparsedeploy.export.verify import weight_zero_counts
    by_sparseml, src = weight_zero_counts(path, counter="sparseml")
    by_own, src_own = weight_zero_counts(path, counter="own")
    assert (src, src_own) == ("sparseml", "own") and by_sparseml == by_own
    assert verify_sparsity(path, plan, tol=1e-6) == pytest.approx(plan)
    # layer prefixes aggregate that layer's linears by size
    layer0 = [n for n in linears if n.startswith("model.layers.0.")]
    z = sum(int((linears[n].weight == 0).sum()) for n in layer0)
    tot = sum(linears[n].weight.numel() for n in layer0)
    assert verify_sparsity(path, {"model.layers.0": z / tot}, tol=1e-6)["model.layers.0"] == pytest.approx(z / tot)
    wrong = dict(plan)
    wrong["model.layers.1.mlp.up_proj"] += 0.1
    with pytest.raises(VerificationError, match="model.layers.1.mlp.up_proj"):
        verify_sparsity(path, wrong, tol=0.01)
    with pytest.raises(VerificationError, match="not in"):
        verify_sparsity(path, {"model.layers.9.mlp.up_proj": 0.5})
    with pytest.raises(UserError, match="fraction"):
        verify_sparsity(path, {"model.layers.0": 50})


def test_dense_export_fails_a_sparse_plan(deployed):
    _, model, out, _ = deployed
    plan = {name: 0.5 for name in prunable_linears(model)}
    with pytest.raises(VerificationError, match="planned 0.5000"):
        verify_sparsity(out / "model.onnx", plan, tol=0.05)


# ------------------------------------------------------------------------------ files, atomic writes
def test_external_data_export_runs_and_missing_data_is_reported(tmp_path, tiny_tokenizer, prompt):
    model = _build("llama", len(tiny_tokenizer), seed=2)
    out = write_deployment(model, tiny_tokenizer, tmp_path / "ext", seqlen=SEQLEN, external_data=True)
    assert (out / "model.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert verify_tokens(out, model, prompt, n=8)["tokens"] == hf_greedy(model, prompt, 8)
    (out / "model.data").unlink()
    with pytest.raises(UserError, match="model.data"):
        verify_tokens(out, model, prompt, n=8)


CORRUPTIONS = {
    "missing tokenizer.json": lambda d: (d / "tokenizer.json").unlink(),
    "missing config.json": lambda d: (d / "config.json").unlink(),
    "truncated config.json": lambda d: (d / "config.json").write_text('{"model_type": "lla'),
    "garbage model.onnx": lambda d: (d / "model.onnx").write_bytes(b"\x08\x07not an onnx model" * 50),
    "empty model.onnx": lambda d: (d / "model.onnx").write_bytes(b""),
    "missing special_tokens_map.json": lambda d: (d / "special_tokens_map.json").unlink(),
    "no folder": lambda d: shutil.rmtree(d),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupt_or_missing_deployment_files_raise_one_line_user_error(what, deployed, tmp_path, prompt):
    _, model, out, _ = deployed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    CORRUPTIONS[what](bad)
    with pytest.raises(UserError) as err:
        verify_tokens(bad, model, prompt, n=4)
    assert not isinstance(err.value, VerificationError)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_write_deployment_is_atomic_and_guards_foreign_folders(tmp_path, tiny_tokenizer):
    model = _build("opt", len(tiny_tokenizer))
    out = write_deployment(model, tiny_tokenizer, tmp_path / "d", seqlen=32)
    before = sha256(out / "model.onnx")
    with pytest.raises(UserError, match="tokenizer"):
        write_deployment(model, None, out, seqlen=32)                  # fails after the export
    assert sha256(out / "model.onnx") == before and read_deployment(out)["seqlen"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]        # no temp folders left
    out2 = write_deployment(model, tiny_tokenizer, out, seqlen=40)    # replacing a deployment is fine
    assert read_deployment(out2)["seqlen"] == 40 and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a deployment"):
        write_deployment(model, tiny_tokenizer, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="positions"):
        write_deployment(model, tiny_tokenizer, tmp_path / "x", seqlen=100_000)


# ------------------------------------------------------------------------------------- decode loop
class FakeRuntime:
    """An engine whose logits say which cached positions it was shown.

    Each layer's key row for a token holds its position; the logits are one-hot at
    (sum of visible cached positions + current position) mod V, so any slip in the cache
    bookkeeping (a lost, duplicated, stale or unmasked entry) changes the next token."""

    name = "fake"
    dynamic = False
    fallback_reason = None

    def __init__(self, seq_len: int, cache_len: int, vocab: int = 1009, layers: int = 2):
        self.seq_len, self.cache_len, self.V = seq_len, cache_len, vocab
        past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        self.io = {"past_names": past, "present_names": [p.replace("past_key_values.", "present.") for p in past],
                   "kv_heads": 2, "head_dim": 3}
        self.fed_ptrs: list[tuple[int, ...]] = []
        self.visible: list[list[int]] = []

    def run(self, feed):
        self.fed_ptrs.append(tuple(feed[n].__array_interface__["data"][0] for n in sorted(feed)))
        L, S = self.seq_len, self.cache_len
        pos = feed["positions"][0]
        out = {}
        for p, q in zip(self.io["past_names"], self.io["present_names"]):
            new = np.broadcast_to(pos[None, None, :, None].astype(np.float32), (1, 2, L, 3))
            out[q] = np.concatenate([feed[p], new], axis=2)
        key = out["present.0.key"][0, 0, :, 0]
        logits = np.zeros((1, L, self.V), np.float32)
        for i in range(L):
            cols = feed["causal_mask"][0, 0, i].astype(bool) & feed["attention_mask"][0].astype(bool)
            seen = sorted(int(k) for k in key[cols])
            self.visible.append(seen)
            logits[0, i, sum(seen) % self.V] = 1
        return {"logits": logits, **out}


@pytest.mark.parametrize("prefill_len", [None, 4])
def test_decode_loop_keeps_exactly_the_newest_entries_without_reallocating(prefill_len):
    """S = 12, an 11-token prompt and 20 new tokens: the cache overflows while decoding. Every call must see
    exactly the newest min(p + 1, S) positions, each once, whatever slots they sit in."""
    S, n, prompt = 12, 20, list(range(100, 111))
    step = FakeRuntime(1, S)
    pre = FakeRuntime(prefill_len, S) if prefill_len else None
    res = greedy_decode(step, prompt, n, prefill=pre)
    calls = (pre.visible if pre else []) + step.visible       # one entry per fed token, in order
    assert [seen[-1] for seen in calls] == list(range(len(prompt) + n - 1))
    for seen in calls:
        p = seen[-1]
        assert seen == list(range(max(0, p - S + 1), p + 1)), (p, seen)
    want = [sum(range(max(0, p - S + 1), p + 1)) % step.V for p in range(len(prompt) - 1, len(prompt) + n - 1)]
    assert res.tokens == want
    assert len(set(step.fed_ptrs)) == 1                       # same input buffers every step: nothing reallocated
    assert res.prefill == ("token by token" if pre is None else "2 chunk(s) of 4 + 3 single")


def test_decode_loop_overhead_is_measured_and_small(deployed, prompt):
    _, _, out, ref = deployed
    rt = OrtRuntime(out / "model.onnx", cores=2, seq_len=1, cache_len=SEQLEN)
    try:
        res = greedy_decode(rt, prompt, N_NEW)
    finally:
        rt.close()
    assert res.tokens == ref
    assert len(res.decode_ms) == len(res.engine_ms) == len(res.overhead_ms) == N_NEW - 1
    for d, e, o in zip(res.decode_ms, res.engine_ms, res.overhead_ms):
        assert 0 < e <= d and o == pytest.approx(d - e, abs=1e-9) and o >= 0
    s = res.summary()
    assert s["overhead_ms_median"] < 1.0 and s["new_tokens"] == N_NEW and s["prefill_ms"] > 0
    rt = OrtRuntime(out / "model.onnx", seq_len=1, cache_len=SEQLEN)
    with pytest.raises(UserError, match="12 positions"):
        greedy_decode(rt, prompt, 10, max_positions=12)
    assert rt.io["max_positions"] == 512                     # recorded in the graph by the export
    with pytest.raises(UserError, match="512 positions"):
        greedy_decode(rt, prompt, 520)


def test_kvslots_rejects_a_cache_without_slots():
    with pytest.raises(UserError, match="no cache slots"):
        KVSlots(FakeRuntime(4, 4), 4, 4)


# ------------------------------------------------------------------------------------------ runtimes
def test_make_runtime_falls_back_to_ort_with_one_line_notice(deployed, monkeypatch):
    _, _, out, _ = deployed
    from sparsedeploy.engine.deepsparse import DeepSparseRuntime

    monkeypatch.setattr(DeepSparseRuntime, "unavailable", classmethod(lambda cls: "DeepSparse needs an x86-64 CPU (this is arm64)"))
    notes: list[str] = []
    rt = make_runtime("deepsparse", out / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN, notice=notes.append)
    assert isinstance(rt, OrtRuntime) and rt.fallback_reason.startswith("DeepSparse needs")
    assert len(notes) == 1 and "\n" not in notes[0] and "ONNX Runtime" in notes[0]
    with pytest.raises(UserError, match="unknown engine"):
        make_runtime("tensorrt", out / "model.onnx", cache_len=SEQLEN)


def test_worker_reports_errors_and_death_instead_of_hanging(deployed, tmp_path):
    _, _, out, _ = deployed
    with pytest.raises(UserError, match="does not exist"):
        WorkerRuntime("onnxruntime", tmp_path / "nope.onnx", seq_len=1, cache_len=SEQLEN)
    w = WorkerRuntime("onnxruntime", out / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN)
    assert w.torch_loaded is False
    os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="died"):
        w.decode([5, 6], 2)
    w.close()
