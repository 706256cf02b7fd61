"""Continuous batching in the native engine (sparsedeploy.engine.decode.BatchSession): every request's
tokens in a batch equal its batch-1 tokens, whatever joins or leaves around it."""
from __future__ import annotations

import numpy as np
import pytest

from sparsedeploy.engine.decode import BatchRequest, BatchSession, greedy_decode, sample_decode

PROMPT_LENS = (3, 11, 1, 20, 7, 14)
MAX_NEW = (9, 5, 12, 6, 10, 4)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir):
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.export.stage import export

    dep = export(str(tiny_model_dir), seqlen=48, out=tmp_path_factory.mktemp("batch") / "deployment")
    return read_deployment(dep)


def _prompts(vocab: int):
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in PROMPT_LENS]


def _run_schedule(sess: BatchSession, reqs: list[BatchRequest], join_at: dict[int, int], cancel_at: dict[int, int]):
    """Step until every request is done; request i joins at step join_at[i] (or later, when a slot is free)."""
    toks = {r.id: [] for r in reqs}
    results, waiting, step = {}, list(reqs), 0
    while waiting or sess.running():
        admit = []
        for r in list(waiting):
            if join_at[r.id] <= step and sess.running() + len(admit) < sess.max_batch:
                admit.append(r)
                waiting.remove(r)
        cancel = [i for i, s in cancel_at.items() if s == step and i not in results]
        out = sess.step(admit, cancel)
        assert not out["errors"], out["errors"]
        assert out["running"] <= sess.max_batch
        for rid, tok in out["tokens"]:
            toks[rid].append(tok)
        for rid, res in out["finished"]:
            results[rid] = res
        step += 1
        assert step < 500
    for rid, res in results.items():
        assert res.tokens == toks[rid]
    return results


@pytest.mark.parametrize("build", [{"crossover": 0.9}, {"formats": ("csr",)}, {"formats": ("bitmask",)},
                                   {"weights": "int8"}])
def test_batched_greedy_tokens_equal_batch1_with_joins_leaves_and_cancels(deployment, build):
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native

    ensure_native(deployment, force=True, **build)
    S = int(deployment["seqlen"])
    rt = NativeRuntime(deployment["onnx"], cache_len=S)
    prompts = _prompts(rt.model.vocab)
    ref = [greedy_decode(rt, p, n).tokens for p, n in zip(prompts, MAX_NEW)]
    stop = ref[4][3]                                          # request 4 ends at a stop token
    reqs = [BatchRequest(i, p, n, stop_ids=(stop,) if i == 4 else ()) for i, (p, n) in enumerate(zip(prompts, MAX_NEW))]
    sess = BatchSession(rt, max_batch=3, cache_len=S, prefill_budget=8)
    assert sess.batched
    res = _run_schedule(sess, reqs, join_at={0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 3}, cancel_at={2: 6})
    for i, r in res.items():
        if i == 2:                                                          # cancelled at step 6: a prefix
            assert r.finish_reason == "cancelled" and 0 < len(r.tokens) < MAX_NEW[2]
            assert r.tokens == ref[2][:len(r.tokens)]
        elif i == 4:
            cut = ref[4].index(stop) + 1
            assert r.tokens == ref[4][:cut] and r.finish_reason == "stop"
        else:
            assert r.tokens == ref[i] and r.finish_reason == "length", i
    assert sorted(sess.free) == [0, 1, 2] and sess.running() == 0


def test_seeded_sampling_in_a_batch_equals_batch1_and_the_emulated_session(deployment):
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.engine.onnxruntime import OrtRuntime
    from sparsedeploy.export.native import ensure_native

    ensure_native(deployment, crossover=0.9)
    S = int(deployment["seqlen"])
    rt = NativeRuntime(deployment["onnx"], cache_len=S)
    prompts = _prompts(rt.model.vocab)[:4]
    params = [dict(temperature=0.8, top_p=0.9, seed=11 + i) for i in range(4)]
    ref = [sample_decode(rt, p, 8, **kw).tokens for p, kw in zip(prompts, params)]
    reqs = [BatchRequest(i, p, 8, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
    res = _run_schedule(BatchSession(rt, 4, S, prefill_budget=6), reqs, {0: 0, 1: 1, 2: 1, 3: 4}, {})
    assert [res[i].tokens for i in range(4)] == ref
    again = _run_schedule(BatchSession(rt, 2, S, prefill_budget=64), reqs, {0: 0, 1: 0, 2: 0, 3: 0}, {})
    assert [again[i].tokens for i in range(4)] == ref
    # an engine without a batched forward: the same API, sequential batch-1 steps
    ort = OrtRuntime(deployment["onnx"], seq_len=1, cache_len=S)
    emu = BatchSession(ort, 3, S)
    assert not emu.batched
    res = _run_schedule(emu, reqs, {0: 0, 1: 0, 2: 2, 3: 2}, {})
    assert [res[i].tokens for i in range(4)] == [sample_decode(ort, p, 8, **kw).tokens for p, kw in zip(prompts, params)]


def test_bad_requests_in_a_batch_are_errors_of_their_own(deployment):
    from sparsedeploy.engine.native.runtime import NativeRuntime
    from sparsedeploy.export.native import ensure_native

    ensure_native(deployment, crossover=0.9)
    S = int(deployment["seqlen"])
    rt = NativeRuntime(deployment["onnx"], cache_len=S)
    sess = BatchSession(rt, 2, S)
    out = sess.step([BatchRequest(0, [5, 6], 4), BatchRequest(1, [], 4), BatchRequest(2, [5] * 40, 20),
                     BatchRequest(3, [7], 3), BatchRequest(4, [8], 3)])
    errs = dict(out["errors"])
    assert set(errs) == {1, 2, 4} and "empty" in str(errs[1]) and "exceed" in str(errs[2]) and "full" in str(errs[4])
    assert [rid for rid, _ in out["tokens"]] == [0, 3] and sess.running() == 2


@pytest.mark.parametrize("fmt", ["int8", "int8_bitmask", "q4"])
@pytest.mark.parametrize("L", [5, 15])
def test_batched_lowbit_products_equal_token_by_token(fmt, L):
    """The batched low-bit kernels (each weight row read once for all rows; on VNNI CPUs token tiles of 8 / 4 /
    2 with one transposed lane tree) give what one `vec` per row gives: the same integers and scales, the float
    sums to rounding (fastmath lets LLVM order a tile's sums its own way), and exactly on the portable build
    against the portable gemv. L = 15: every tile size and a lone token."""
    from sparsedeploy.engine.native import lowbit as LB
    from sparsedeploy.engine.native import lowbit_batch as LBB
    from sparsedeploy.engine.native.model import Linear

    rng = np.random.default_rng(3 + L)
    rows, cols = 70, 200 + 4 * L
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random(W.shape) < 0.7] = 0
    enc = {"int8": LB.encode_int8, "int8_bitmask": LB.encode_int8_bitmask, "q4": LB.encode_q4}[fmt](W)
    bias = None if fmt == "q4" else rng.standard_normal(rows).astype(np.float32)
    lin = Linear(fmt, enc, bias, (rows, cols))
    X = rng.standard_normal((L, cols)).astype(np.float32)
    for acc in (False, True):
        Y0 = rng.standard_normal((L, rows)).astype(np.float32)
        Y1, Y2, Y3, Y4 = Y0.copy(), Y0.copy(), Y0.copy(), Y0.copy()
        for l in range(L):
            lin.vec(X[l], Y1[l], acc)
        lin.mat(X, Y2, acc)
        np.testing.assert_allclose(Y2, Y1, rtol=1e-5, atol=1e-5 * np.abs(Y1).max())
        if LBB.GEMM[fmt] is LBB.PORTABLE[fmt]:
            np.testing.assert_array_equal(Y1, Y2)
        Q, C, S = LBB.act_buffers_rows(L, cols)
        LBB.quantize_rows(X, Q, C, S)
        gemv = {"int8": LB.int8_gemv_portable, "int8_bitmask": LB.int8_bitmask_gemv_portable, "q4": LB.q4_gemv_portable}[fmt]
        arrs = (lin.a, lin.b, lin.c, lin.d) if fmt == "int8_bitmask" else (lin.a, lin.b)
        LBB.PORTABLE[fmt](*arrs, Q, C, S, lin.bias, Y3, acc)
        for l in range(L):
            gemv(*arrs, Q[l], C[l], S[l], lin.bias, Y4[l], acc)
        np.testing.assert_array_equal(Y3, Y4)
        assert np.abs(Y3 - Y1).max() < 1e-4 * max(1.0, np.abs(Y1).max())


@pytest.mark.parametrize("fmt", ["csr", "ell", "bitmask", "dense"])
@pytest.mark.parametrize("L,cols", [(L, 300) for L in (2, 3, 6, 8, 13, 16, 21, 40, 64, 83, 130)]
                         + [(L, 2100) for L in (13, 21, 64, 83)])
def test_row_tiled_products_equal_the_dense_product(fmt, L, cols):
    """Linear.mat_rows (a batched step's [R, in] products: up to model.PANEL_ROWS_MIN rows simd_rows' 8/16/64-row
    tiles (up to 4 rows of the bitmask format simd.bitmask_gemm_rows' 4/2-row tiles), more rows
    simd_rows.csr_gemm_panels, 64 rows a call past 80; a dense group dense_gemm_rows' 2x8 / 4x4 / 8x2 / 16x1
    register tiles over 16-row blocks and the rows past the last block) against numpy's product of the same
    matrix, with bias and accumulation. 2100 columns: wider than model.PANEL_IN_MAX, so prompt chunks take the
    row tiles too."""
    from sparsedeploy.engine.native.model import PANEL_IN_MAX, Linear
    from sparsedeploy.engine.native.pack import encode

    rng = np.random.default_rng(L)
    rows = 67                                              # 300 columns: 3 column panels of the prompt-chunk product
    assert (cols > PANEL_IN_MAX) == (cols == 2100)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "ell":                                       # the same count kept in every row
        for r in range(rows):
            W[r, rng.permutation(cols)[:cols * 7 // 10]] = 0
    elif fmt != "dense":
        W[rng.random(W.shape) < 0.7] = 0
    bias = rng.standard_normal(rows).astype(np.float32)
    lin = Linear(fmt, encode(W, fmt) if fmt != "dense" else {"w": W}, bias, W.shape)
    X = rng.standard_normal((L, cols)).astype(np.float32)
    for acc in (False, True):
        Y = rng.standard_normal((L, rows)).astype(np.float32)
        ref = (Y if acc else 0) + X.astype(np.float64) @ W.T.astype(np.float64) + bias
        lin.mat_rows(X, Y, acc)
        np.testing.assert_allclose(Y, ref, rtol=1e-4, atol=1e-4)


def test_panel_major_layout_and_product():
    """simd_rows.panel_major: row r's weights of panel p lie at [off[p out + r], off[p out + r + 1]) with their
    columns inside that panel, ascending; the copy holds every stored weight once. csr_gemm_panels over it
    equals numpy's product, with empty rows, an empty panel and a last panel narrower than PANEL."""
    from numba import get_num_threads

    from sparsedeploy.engine.native import simd_rows as SR

    rng = np.random.default_rng(3)
    out, inn, L = 37, 2 * SR.PANEL + 45, 64
    W = rng.standard_normal((out, inn)).astype(np.float32)
    W[rng.random(W.shape) < 0.6] = 0
    W[[0, 5, 36]] = 0                                       # empty rows
    W[:, SR.PANEL:2 * SR.PANEL] = 0                         # an empty panel
    nz = W != 0
    rowptr = np.zeros(out + 1, np.int64)
    np.cumsum(nz.sum(axis=1), out=rowptr[1:])
    cols, vals = np.nonzero(nz)[1].astype(np.uint16), np.ascontiguousarray(W[nz])
    off, pc, pv = SR.panel_major(rowptr, cols, vals, inn)
    npan = -(-inn // SR.PANEL)
    assert off.shape == (npan * out + 1,) and off[-1] == vals.size and np.all(np.diff(off) >= 0)
    back = np.zeros_like(W)
    for p in range(npan):
        for r in range(out):
            c = pc[off[p * out + r]:off[p * out + r + 1]].astype(np.int64)
            assert np.all((c // SR.PANEL) == p) and np.all(np.diff(c) > 0)
            back[r, c] = pv[off[p * out + r]:off[p * out + r + 1]]
    np.testing.assert_array_equal(back, W)
    X = rng.standard_normal((L, inn)).astype(np.float32)
    Xt = np.ascontiguousarray(X.T)
    Yt, Y = np.zeros((out, L), np.float32), np.zeros((L, out), np.float32)
    SR.csr_gemm_panels(off, pc, pv, Xt, Yt, np.zeros(0, np.float32), Y, False, get_num_threads())
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D", [16, 24, 80])
def test_attention_rows_equal_a_numpy_reference(D):
    """kernels.attention_rows (runs of rows of one sequence x kv head, key rows shared by the heads of a group)
    against softmax attention written in numpy, for decode rows of three sequences at other positions and a
    prompt chunk of 11 rows of a fourth (causal among themselves), grouped-query heads, rotary positions; scores
    4 key rows x 4/3/2/1 queries a call (simd_rows.key_tile*) and the rest row by row."""
    from sparsedeploy.engine.native import kernels as K

    rng = np.random.default_rng(5)
    H, Hkv, S, B = 6, 2, 40, 4                          # D 16, 80: the register-tiled sums of values; 24: the loop
    rep, half = H // Hkv, D // 2
    ck = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    cv = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    ang = np.arange(S)[:, None] * (0.1 + np.arange(half))[None, :] / half
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    slots = np.array([2, 0, 3] + [1] * 11, np.int64)
    pos = np.array([17, 5, 30] + list(range(8, 19)), np.int64)
    R = len(slots)
    QKV = rng.standard_normal((R, (H + 2 * Hkv) * D)).astype(np.float32)
    k_ref, v_ref = ck.astype(np.float64), cv.astype(np.float64)

    def rot(v, p):
        a, c = v[:half], v[half:]
        return np.concatenate([a * cos[p] - c * sin[p], c * cos[p] + a * sin[p]])

    for r in range(R):
        for g in range(Hkv):
            k_ref[slots[r], g, pos[r]] = rot(QKV[r, H * D + g * D:H * D + (g + 1) * D].astype(np.float64), pos[r])
            v_ref[slots[r], g, pos[r]] = QKV[r, (H + Hkv) * D + g * D:(H + Hkv) * D + (g + 1) * D]
    ref = np.zeros((R, H * D))
    for r in range(R):
        for h in range(H):
            q = rot(QKV[r, h * D:(h + 1) * D].astype(np.float64), pos[r])
            keys, vals = k_ref[slots[r], h // rep, :pos[r] + 1], v_ref[slots[r], h // rep, :pos[r] + 1]
            s = keys @ q / np.sqrt(D)
            w = np.exp(s - s.max())
            ref[r, h * D:(h + 1) * D] = (w / w.sum()) @ vals
    out = np.zeros((R, H * D), np.float32)
    nq = R * rep
    bufs = (np.zeros((Hkv, nq, D), np.float32), np.zeros((Hkv, nq, S), np.float32), np.zeros((Hkv, nq, D), np.float32))
    K.attention_rows(QKV, H, Hkv, D, slots, pos, cos, sin, True, np.float32(D ** -0.5), ck, cv, out, *bufs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ck, k_ref, rtol=1e-5, atol=1e-6)


def test_fast_exp_is_within_a_few_ulp_of_exp():
    """kernels.fast_exp (the vectorisable exp of SiLU and softmax) against numpy's float64 exp, clamped at
    e^-87 / e^88 outside [-87, 88]."""
    from numba import njit

    from sparsedeploy.engine.native import kernels as K

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = K.fast_exp(x[i])

    x = np.concatenate([np.linspace(-87, 88, 200001), np.random.default_rng(0).standard_normal(1000) * 5]).astype(np.float32)
    out = np.empty_like(x)
    run(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out / ref - 1)) < 4e-7
    run(np.array([-200.0, 200.0, 0.0], np.float32), out[:3])
    assert out[0] == np.float32(np.exp(np.float32(-87.0))) and np.isfinite(out[1]) and out[2] == 1.0
