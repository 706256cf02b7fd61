"""The native engine (`--engine native`): numba kernels against dense products, stored formats, and greedy
tokens against PyTorch's on tiny Llama (GQA) and OPT models, dense and pruned (ELL and CSR layouts).

References: numpy's dense product of the same matrix; the tokens PyTorch generated at export time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .cli_helpers import run_cli as _cli

from sparsedeploy.engine.native import kernels as K
from sparsedeploy.engine.native.pack import compress, encode

EMPTY = np.zeros(0, np.float32)


def _sparse(rng, rows, cols, sparsity, uneven=True):
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    if uneven:   # per-row sparsity varies from 0 to 100%: uneven rows, some empty, some full
        per_row = np.clip(sparsity + rng.uniform(-0.5, 0.5, size=(rows, 1)), 0, 1)
        per_row[::7] = 1.0
        per_row[1::11] = 0.0
        W[rng.random((rows, cols)) < per_row] = 0
    else:        # every row keeps the same count (as Wanda's per-output pruning gives)
        k = int(round(cols * (1 - sparsity)))
        for r in range(rows):
            W[r, rng.permutation(cols)[k:]] = 0
    return W


def _apply(fmt, arrs, x, bias, out, acc):
    if fmt == "csr":
        (K.csr_gemv if x.ndim == 1 else K.csr_gemm)(arrs["rowptr"], arrs["cols"], arrs["vals"], x, bias, out, acc)
    elif fmt == "ell":
        (K.ell_gemv if x.ndim == 1 else K.ell_gemm)(arrs["cols"], arrs["vals"], x, bias, out, acc)
    elif fmt == "bitmask":
        (K.bitmask_gemv if x.ndim == 1 else K.bitmask_gemm)(arrs["rowptr"], arrs["masks"], arrs["vals"], x, bias, out, acc)
    else:
        K.dense_gemv(arrs["w"], x, bias, out, acc)


@pytest.mark.parametrize("rows,cols", [(37, 300), (5, 70_000), (9, 16), (6, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("uneven", [True, False])
@pytest.mark.parametrize("kind", ["index", "bitmask"])
def test_sparse_kernels_equal_the_dense_product(rows, cols, sparsity, uneven, kind):
    rng = np.random.default_rng(int(sparsity * 100) + rows)
    W = _sparse(rng, rows, cols, sparsity, uneven)
    if kind == "bitmask":                  # widths that are not a multiple of 16 end in a partial block
        fmt, arrs = "bitmask", encode(W, "bitmask")
        assert arrs["masks"].shape == (rows * -(-cols // 16),) and arrs["vals"].size == np.count_nonzero(W)
    else:
        fmt, arrs = compress(W, crossover=0.0)
        assert fmt == ("csr" if uneven else "ell")
        assert arrs["cols"].dtype == (np.uint16 if cols <= 65536 else np.uint32)
    x = rng.standard_normal(cols).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    ref = W.astype(np.float64) @ x
    out = np.full(rows, np.nan, np.float32)
    _apply(fmt, arrs, x, EMPTY, out, False)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    out2 = np.ones(rows, np.float32)
    _apply(fmt, arrs, x, bias, out2, True)                     # accumulate into out, with bias
    np.testing.assert_allclose(out2, 1 + bias + ref, rtol=1e-4, atol=1e-3)
    X = rng.standard_normal((3, cols)).astype(np.float32)       # L = 3 tokens (prefill)
    Y = np.full((3, rows), np.nan, np.float32)
    _apply(fmt, arrs, X, bias, Y, False)
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W.T.astype(np.float64) + bias, rtol=1e-4, atol=1e-3)
    if uneven and "rowptr" in arrs and rows > 7:
        assert (np.diff(arrs["rowptr"]) == 0).any()               # empty rows were exercised
    if fmt in ("csr", "ell"):           # the plain-numba twin (CPUs without AVX-512F run it) gives the same sums
        twin = np.ones(rows, np.float32)
        if fmt == "csr":
            K.csr_gemv_portable(arrs["rowptr"], arrs["cols"], arrs["vals"], x, bias, twin, True)
        else:
            K.ell_gemv_portable(arrs["cols"], arrs["vals"], x, bias, twin, True)
        np.testing.assert_allclose(twin, 1 + bias + ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows", [64, 63, 1])
def test_dense_kernel_and_format_choice(rows):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((rows, 96)).astype(np.float32)      # odd counts: dense_gemv's last row goes alone
    x = rng.standard_normal(96).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    for gemv in (K.dense_gemv, K.GEMV_SERIAL["dense"]):
        out = np.zeros(rows, np.float32)
        gemv(W, x, EMPTY, out, False)
        np.testing.assert_allclose(out, W @ x, rtol=1e-5, atol=1e-4)
        gemv(W, x, bias, out, True)
        np.testing.assert_allclose(out, 2 * (W @ x) + bias, rtol=1e-5, atol=1e-4)
    if rows != 64:
        return
    W[:, :40] = 0                                                 # 42% sparse: below the crossover -> dense
    assert compress(W, 0.55)[0] == "dense"
    W[:, :60] = 0                                                 # 62.5%, equal rows -> ELL
    assert compress(W, 0.55)[0] == "ell"
    W[0, 70] = 0                                                  # one row differs -> CSR
    assert compress(W, 0.55)[0] == "csr"


def test_attention_kernel_matches_numpy_reference_with_gqa_and_masked_slots():
    rng = np.random.default_rng(2)
    H, Hkv, D, P, L = 4, 2, 8, 6, 3
    QKV = rng.standard_normal((L, (H + 2 * Hkv) * D)).astype(np.float32)
    pk = rng.standard_normal((Hkv, P, D)).astype(np.float32)
    pv = rng.standard_normal((Hkv, P, D)).astype(np.float32)
    mask = np.ones((L, P + L), np.int64)
    mask[:, [1, 4]] = 0                                           # empty cache slots
    mask[:, P:] = np.tril(np.ones((L, L), np.int64))              # causal among the new tokens
    pos = np.array([5, 6, 7], np.int64)
    out = np.zeros((L, H * D), np.float32)
    nk, nv = np.zeros((Hkv, L, D), np.float32), np.zeros((Hkv, L, D), np.float32)
    cos = sin = np.zeros((1, 1), np.float32)
    K.attention(QKV, H, Hkv, D, pos, cos, sin, False, np.float32(D ** -0.5), pk, pv, mask, out, nk, nv,
                np.full((H * L, 2 * D + P + L), np.nan, np.float32))
    q = QKV[:, :H * D].reshape(L, H, D)
    k_new = QKV[:, H * D:(H + Hkv) * D].reshape(L, Hkv, D).transpose(1, 0, 2)
    v_new = QKV[:, (H + Hkv) * D:].reshape(L, Hkv, D).transpose(1, 0, 2)
    keys, vals = np.concatenate([pk, k_new], 1), np.concatenate([pv, v_new], 1)
    for h in range(H):
        g = h // (H // Hkv)
        s = q[:, h] @ keys[g].T * D ** -0.5
        s = np.where(mask > 0, s, -np.inf)
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        np.testing.assert_allclose(out[:, h * D:(h + 1) * D], w @ vals[g], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(nk, k_new)
    np.testing.assert_array_equal(nv, v_new)


# --------------------------------------------------------------------------- tiny models end to end
@pytest.fixture(scope="module")
def deployments(tmp_path_factory, tiny_model_dir, corpus_file):
    """Dense, Wanda+DLP 70% (equal rows: ELL) and magnitude 80% (uneven rows: CSR) deployments."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("native")
    calib = stages.CalibConfig(str(tiny_model_dir), f"file:{corpus_file}", 8, 48, 0, None, "cpu")
    out = {"dense": export(str(tiny_model_dir), seqlen=64, out=root / "dense")}
    for name, p, alloc, method in (("wanda", 0.7, "dlp", "wanda"), ("magnitude", 0.8, "uniform", "magnitude")):
        run = root / name
        stages.prune(stages.RunDir(run), stages.PruneConfig(str(tiny_model_dir), p, alloc, method, calib=calib, device="cpu"))
        out[name] = export(str(run), seqlen=64)
    return out


@pytest.mark.parametrize("which,crossover,formats", [("dense", 0.9, {"dense"}), ("dense", 0.0, {"ell"}),
                                                     ("wanda", 0.0, {"ell"}), ("magnitude", 0.55, {"csr"}),
                                                     ("wanda", None, None), ("magnitude", None, None)])
def test_native_greedy_tokens_equal_pytorch(deployments, which, crossover, formats):
    """Fixed rule (--crossover) or formats measured on this CPU: PyTorch's tokens either way."""
    from sparsedeploy.bench.bench import compile_deployment

    rec = compile_deployment(deployments[which], "native", cores=2, crossover=crossover, force=True)
    assert rec["engine"] == "native" and rec["tokens_equal_pytorch"] is True
    if formats is not None:
        assert set(rec["native"]["formats"]) == formats and rec["native"]["tuning"] is None
    else:                                    # measured: every group holds the fastest format (or a smaller tie)
        tuning = rec["native"]["tuning"]
        assert tuning["threads"] == 2 and tuning["cpu"]
        index = json.loads((Path(deployments[which]) / "native" / "native.json").read_text())
        for layer in index["layers"]:
            for g in layer.values():
                ms = g["measured_ms"]
                fmts = {"dense", "ell" if which == "wanda" else "csr", "bitmask"}
                twins = {f + "/portable" for f in fmts if f in K.GEMV_PORTABLE}  # the index kernels' plain loops
                assert set(ms) == fmts | {f + "/serial" for f in fmts} | twins   # parallel and serial builds
                chosen = g["format"] + ("/serial" if g["serial"] else "/portable" if g.get("portable") else "")
                if tuning.get("fallback"):           # the machine stayed busy: fewest bytes, parallel (test_tune)
                    assert not g["serial"]
                else:
                    assert ms[chosen] <= min(ms.values()) * (1 + tuning["tie"]) + 2e-6
        formats = set(rec["native"]["formats"])
    assert rec["native"]["deepsparse_loaded"] is False and rec["onnx_unchanged"]
    wb = rec["native"]["weight_bytes"]
    if formats != {"dense"} and which != "dense":
        assert wb["decoder_linears"] < wb["decoder_linears_dense"]          # compressed is smaller


@pytest.mark.parametrize("which,rule", [("magnitude", "crossover"), ("dense", "crossover"), ("magnitude", "bitmask"),
                                        ("wanda", "bitmask")])
def test_native_prefill_in_chunks_and_stored_weights_equal_torch(deployments, which, rule):
    """In process: the L > 1 path (prompt in one call) gives PyTorch's tokens; every stored group equals
    the torch weights it came from, stacked."""
    from safetensors.numpy import load_file

    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native

    dep = deployments[which]
    meta = read_deployment(dep)
    if rule == "crossover":
        ensure_native(meta, crossover=0.55, force=True)
    else:
        index = ensure_native(meta, force=True, formats=("bitmask",))
        assert {g["format"] for layer in index["layers"] for g in layer.values()} == {"bitmask"}
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    v = meta["verified"]
    res = greedy_decode(rt, v["prompt_ids"], len(v["tokens"]), prefill=rt)
    assert res.tokens == v["tokens"] and res.prefill.startswith("1 chunk")
    src_dir = Path(meta["export_key"]["source"])
    src = load_file(str(next((src_dir / "model").glob("*.safetensors")) if (src_dir / "model").is_dir()
                        else next(src_dir.glob("*.safetensors"))))
    arch = rt.model.arch
    for i, layer in enumerate(rt.model.layers):
        for g, names in arch.stacks().items():
            ref = np.concatenate([src[f"{arch.layers}.{i}.{n}.weight"] for n in names], 0)
            np.testing.assert_array_equal(layer[g].dense(), ref)


def test_a_recorded_portable_build_loads_the_plain_loop_and_decodes_pytorchs_tokens(deployments, monkeypatch):
    """Where the CPU has AVX-512F the tuner times fp32 CSR / ELL twice (the gather intrinsic and the plain-numba
    loop, "csr/portable"); a build that records the plain loop must load it and decode the same tokens."""
    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.engine.native import tune
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native
    from sparsedeploy.export.onnx_kv import read_deployment

    if not K.GEMV_PORTABLE:
        pytest.skip("this CPU has one build of the fp32 index kernels (no AVX-512F)")
    real = tune.choose_formats

    def portable(layers, **kw):          # time as usual, then record the plain loop wherever CSR / ELL won
        choice, rec = real(layers, **kw)
        return [{g: (f.split("/")[0] + "/portable" if f.split("/")[0] in K.GEMV_PORTABLE else f)
                 for g, f in c.items()} for c in choice], rec

    monkeypatch.setattr(tune, "choose_formats", portable)
    meta = read_deployment(deployments["magnitude"])
    index = ensure_native(meta, force=True, formats=("csr", "ell"))
    assert all(g["format"] in ("csr", "ell") and g.get("portable") for layer in index["layers"] for g in layer.values())
    rt = NativeRuntime(meta["onnx"], cache_len=int(meta["seqlen"]))
    assert all(lin.gemv is K.GEMV_PORTABLE[lin.fmt] for layer in rt.model.layers for lin in
               (layer[g] for g in ("qkv", "o", "up", "down")))
    v = meta["verified"]
    assert greedy_decode(rt, v["prompt_ids"], len(v["tokens"])).tokens == v["tokens"]
    ensure_native(meta, force=True)                                 # leave the shared fixture as it was


def test_fp32_index_formats_are_timed_in_both_builds_where_both_exist(monkeypatch):
    from sparsedeploy.engine.native import tune

    class Idle:
        fraction = 0.0

        def __init__(self, pids):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(tune, "OtherLoad", Idle)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((48, 80)).astype(np.float32)
    W[rng.random(W.shape) < 0.8] = 0
    W[0, :] = 1                                                   # uneven rows: CSR
    _, rec = tune.choose_formats([{"qkv": W}], threads=2, rounds=1, serial=False)
    assert ("csr/portable" in rec["ms"][0]["qkv"]) == ("csr" in K.GEMV_PORTABLE)
    assert "bitmask/portable" not in rec["ms"][0]["qkv"] and "dense/portable" not in rec["ms"][0]["qkv"]


def test_a_native_worker_process_starts_and_decodes_without_torch(deployments):
    """The worker refuses torch outright (an import hook): a native engine that needed it would fail here."""
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.engine.worker import WorkerRuntime
    from sparsedeploy.export.native import ensure_native

    meta = read_deployment(deployments["wanda"])
    ensure_native(meta)
    with WorkerRuntime("native", meta["onnx"], cores=1, seq_len=1, cache_len=int(meta["seqlen"])) as w:
        v = meta["verified"]
        assert w.decode(v["prompt_ids"], len(v["tokens"])).tokens == v["tokens"]
        assert w.torch_loaded is False and w.engine_info["threads"] >= 1


def test_native_refuses_stale_or_mismatched_weights(deployments, tmp_path):
    from sparsedeploy.errors import UserError
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.native import check_zeros, ensure_native

    meta = read_deployment(deployments["wanda"])
    index = ensure_native(meta)
    name = next(iter(index["zeros"]))
    bad = dict(meta, weights={**meta["weights"], name: [meta["weights"][name][0] + 1, meta["weights"][name][1]]})
    with pytest.raises(UserError, match="zeros"):
        check_zeros(index, bad)
    with pytest.raises(UserError, match="synthetic"):
        ensure_native(dict(meta, synthetic="llama2-7b", synthetic_key={"x": 1}, dir=str(tmp_path)))


def test_bench_native_runs_where_deepsparse_cannot_be_imported(deployments, tmp_path):
    """A machine without deepsparse (simulated: its import raises in every process): `bench --engine native`."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('deepsparse', 'sparseml', 'sparsezoo'):\n"
        "            raise ImportError('deepsparse is not installed on this machine')\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(Path(__file__).resolve().parents[1])]))
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-c", "from sparsedeploy.cli import main; main()", "bench", str(deployments["dense"]),
           str(deployments["wanda"]), "--engine", "native", "--new-tokens", "8", "--prompt-tokens", "4",
           "--rounds", "1", "--no-ort-baseline", "--json", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc["engines"]) == ["native"]
    rows = doc["engines"]["native"]
    assert len(rows) == 2 and all(r["engine"] == "native" for r in rows)
    # formats are chosen by timing on this CPU: on a busy machine a tiny pruned model may measure fastest dense
    assert rows[1]["weight_mb"] <= rows[0]["weight_mb"]
    check = subprocess.run([sys.executable, "-c", "import deepsparse"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "not installed" in check.stderr




@pytest.mark.parametrize("argv,needle", [
    (["compile", "{dep}", "--engine", "native", "--crossover", "2"], "crossover"),
    (["bench", "{dep}", "--engine", "native,warp"], "unknown engine 'warp'"),
    (["bench", "{dep}", "--engine", "native,native"], "listed twice"),
])
def test_native_cli_bad_input_is_one_line(deployments, monkeypatch, capsys, argv, needle):
    argv = [a.replace("{dep}", str(deployments["wanda"])) for a in argv]
    code, out, err = _cli(argv, monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1


def test_pick_engine_probes_every_available_engine(deployments):
    from sparsedeploy.bench.bench import available_engines, pick_engine

    engine, why = pick_engine(deployments["wanda"], cores=1, prompt_tokens=4, new_tokens=4, rounds=1)
    avail = available_engines()
    assert engine in avail and "native" in avail
    for e in avail:
        assert f"{e} " in why           # every engine's probe time is named


def test_synthetic_sweep_with_native_and_ort_in_one_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "syn"
    code, stdout, err = _cli(["sweep", "--synthetic", "llama-tiny", "--layers", 2, "--method", "magnitude", "--out", out,
                              "--sparsities", "0,0.9", "--seqlen", 32, "--engine", "native,onnxruntime", "--cores", 1,
                              "--prompt-tokens", 4, "--new-tokens", 8, "--rounds", 1], monkeypatch, capsys)
    assert code == 0, err
    doc = json.loads((out / "table5.json").read_text())
    assert set(doc["engines"]) == {"native", "onnxruntime"}
    nat, ort = doc["engines"]["native"], doc["engines"]["onnxruntime"]
    assert [r["label"] for r in nat] == ["Dense", "90%"] == [r["label"] for r in ort]
    for a, b in zip(nat, ort):          # same greedy tokens from both engines on both models
        assert a["tokens"] == b["tokens"]
    assert nat[1]["layer_bound_ms"] > 0
    idx = json.loads((out / "p90" / "deployment" / "native" / "native.json").read_text())
    chosen = {g["format"] for layer in idx["layers"] for g in layer.values()}
    assert chosen <= {"dense", "csr", "bitmask"}
    if chosen != {"dense"}:            # tiny matrices: dense may measure fastest, then nothing is smaller
        nb = nat[1]["native_bytes"]
        assert nb["decoder_linears"] < nb["decoder_linears_dense"]
    assert idx["tuning"]["threads"] == 1 and idx["crossover"] is None          # measured with the bench's cores
    assert "side by side" in (out / "table5.md").read_text()
    # the embedding/lm_head file is the same at every sparsity: stored once, hard-linked
    a, b = (out / d / "deployment" / "native" / "shared.safetensors" for d in ("dense", "p90"))
    assert a.stat().st_ino == b.stat().st_ino and idx["shared_linked_from"]


@pytest.mark.parametrize("engine", ["native", "onnxruntime"])
def test_long_prompt_prefill_in_one_call_keeps_every_prompt_token(deployments, engine):
    """A prompt longer than half the cache: prefilling it in chunks must give the same tokens as feeding it
    token by token (a chunk larger than the prefill cache's free slots used to drop the oldest prompt tokens)."""
    from sparsedeploy.engine.decode import greedy_decode
    from sparsedeploy.engine import make_runtime
    from sparsedeploy.export.onnx_kv import read_deployment
    from sparsedeploy.export.native import ensure_native

    meta = read_deployment(deployments["wanda"])
    ensure_native(meta)
    S = int(meta["seqlen"])
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, int(meta["vocab_size"]), size=S // 2 + 10)]
    rt = make_runtime(engine, meta["onnx"], cores=1, seq_len=None, cache_len=S)
    chunked = greedy_decode(rt, prompt, 8, prefill=rt)
    single = greedy_decode(rt, prompt, 8)
    assert "chunk" in chunked.prefill and single.prefill == "token by token"
    assert chunked.tokens == single.tokens
