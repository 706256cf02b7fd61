"""GPTQ / round-to-nearest quantization that keeps pruned zeros, the packed checkpoint, the quantize stage,
the joint SparseGPT path and the CLI's bad-input contract.

Grids are checked against the definition (codes integral in [0, 2^bits - 1], values = scale·(q - zero)),
errors against the inputs, sparsity against the weights before quantization, and tokens against PyTorch's
own greedy decoding of the fake-quant model; nothing is compared with numbers taken from the code under test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .cli_helpers import run_cli
import torch

from sparsedeploy import cli
from sparsedeploy.errors import UserError
from sparsedeploy.pipeline import quantize as qz
from sparsedeploy.pipeline import stages
from sparsedeploy.pipeline.prune import prune_sparsegpt, prune_wanda
from sparsedeploy.pipeline.rundir import RunDir


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibration(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated columns (low-rank plus noise) and a few large-scale columns."""
    g = gen(seed)
    latent = torch.randn(n, max(cols // 8, 4), generator=g)
    X = latent @ torch.randn(latent.shape[1], cols, generator=g) + 0.2 * torch.randn(n, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[:4]] *= 6.0
    return X


def stats_from(X: torch.Tensor) -> SimpleNamespace:
    X64 = X.double()
    return SimpleNamespace(col_norm=X64.norm(dim=0).float(), hessian=(2.0 / X.shape[0] * X64.T @ X64).float())


def out_err(W, Wq, X) -> float:
    return float(((X @ W.T - X @ Wq.T) ** 2).sum())


def expand(res: qz.QuantResult, t: torch.Tensor) -> torch.Tensor:
    """A per-group tensor [out, groups] -> per weight [out, in] via g_idx."""
    return t[:, res.g_idx.long()]


# ------------------------------------------------------------------------------------- the grid (RTN)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [8, 12, -1])     # 12 does not divide 32: the last group is shorter
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_values_on_grid_and_error_within_half_a_step(bits, group_size, sym):
    g = gen(bits * 100 + group_size)
    W = torch.randn(16, 32, generator=g) * torch.linspace(0.1, 3.0, 32)
    W[torch.rand(16, 32, generator=g) < 0.3] = 0.0       # pruned weights
    res = qz.quantize_rtn(W, bits, group_size, sym)
    maxq = 2 ** bits - 1
    scale, zero = expand(res, res.scale), expand(res, res.zero)
    q = res.q.float()
    keep = W != 0
    assert res.weight.dtype == W.dtype and res.q.dtype == torch.uint8
    assert float(q.min()) >= 0 and float(q.max()) <= maxq
    assert torch.equal(res.keep, keep)
    # every kept value is a level of its group's grid; every pruned one is exactly 0
    assert torch.equal(res.weight[keep], (scale * (q - zero))[keep])
    assert bool((res.weight[~keep] == 0).all())
    ngroups = 1 if group_size == -1 else -(-32 // group_size)
    assert res.scale.shape == (16, ngroups)
    if sym:
        assert bool((res.zero == maxq / 2).all())
    # the zero set is exactly the input's: pruned stay 0, nothing else becomes 0
    assert torch.equal(res.weight == 0, ~keep)
    # nearest level: within half a step (plus float rounding), and no level is nearer
    err = (W - res.weight).abs()[keep]
    assert bool((err <= scale[keep] / 2 * (1 + 1e-4) + 1e-7).all()), float((err / scale[keep]).max())
    for dq in (-1, 1):
        other = (scale * (torch.clamp(q + dq, 0, maxq) - zero))[keep]
        assert bool((err <= (W[keep] - other).abs() + 1e-6).all())


def test_rtn_8bit_is_close_and_2bit_is_coarse():
    W = torch.randn(8, 64, generator=gen(1))
    e8 = (W - qz.quantize_rtn(W, 8, 64).weight).abs().max()
    e2 = (W - qz.quantize_rtn(W, 2, 64).weight).abs().max()
    assert e8 < 0.02 < e2


# ------------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits,group_size,act_order,sym", [(4, 32, False, False), (3, 32, False, False),
                                                           (4, -1, True, False), (3, 64, True, True)])
@pytest.mark.parametrize("pruned", [False, True])
def test_gptq_layer_output_error_below_rtn(bits, group_size, act_order, sym, pruned):
    X = calibration(512, 128, seed=bits)
    st = stats_from(X)
    W = torch.randn(48, 128, generator=gen(7))
    if pruned:
        W = prune_wanda(W, st, 0.5)
    rtn = qz.quantize_rtn(W, bits, group_size, sym)
    g = qz.gptq(W, st.hessian, bits, group_size, act_order, sym)
    e_rtn, e_gptq = out_err(W, rtn.weight, X), out_err(W, g.weight, X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # GPTQ's output is on its own grid too
    scale, zero = expand(g, g.scale), expand(g, g.zero)
    assert torch.equal(g.weight, torch.where(g.keep, scale * (g.q.float() - zero), torch.zeros(())))


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("how", ["wanda-50", "2:4", "mask-arg"])
def test_gptq_keeps_every_pruned_zero_and_adds_none(how, freeze):
    X = calibration(256, 64, seed=3)
    st = stats_from(X)
    W = torch.randn(32, 64, generator=gen(5))
    mask = None
    if how == "wanda-50":
        W = prune_wanda(W, st, 0.5)
    elif how == "2:4":
        W = prune_wanda(W, st, 0.5, (2, 4))
    else:
        mask = torch.rand(32, 64, generator=gen(6)) < 0.6
    res = qz.gptq(W, st.hessian, 3, 16, act_order=True, mask=mask, freeze_pruned=freeze)
    pruned = (W == 0) if mask is None else mask
    assert torch.equal(res.weight == 0, pruned)
    # plain GPTQ (no masking, zeros allowed) would refill the pruned positions: the masking matters
    plain = W.clone()
    H = st.hessian
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + 0.01 * H.diag().mean() * torch.eye(64))), upper=True)
    for j in range(63):
        plain[:, j + 1:] -= torch.outer((plain[:, j] - plain[:, j].round()) / U[j, j], U[j, j + 1:])
    assert int((plain[pruned] != 0).sum()) > 0


def test_gptq_with_a_hessian_it_owns_equals_the_copying_call_and_take_hessian_equals_hessian():
    from sparsedeploy.pipeline.stats import LinearStats

    X = calibration(256, 64, seed=4)
    W = prune_wanda(torch.randn(32, 64, generator=gen(8)), stats_from(X), 0.5)
    X_dead = X.clone()
    X_dead[:, 5] = 0          # a dead input: gptq writes H[j, j] = 1 into its Hessian
    for x in (X, X_dead):
        s = LinearStats(64, hessian=True)
        s.add(x[:100])
        s.add(x[100:])
        H = s.hessian
        before = H.clone()
        ref = qz.gptq(W, H, 4, 16)
        assert torch.equal(H, before)                      # not given away: left as it was
        taken = s.take_hessian()
        assert torch.equal(taken, before)                  # the same values, scaled in place
        got = qz.gptq(W, taken, 4, 16, own_h=True)
        assert torch.equal(got.weight, ref.weight) and torch.equal(got.q, ref.q) and torch.equal(got.scale, ref.scale)
        with pytest.raises(AttributeError):
            s.take_hessian()


def test_gptq_rejects_bad_input():
    W, H = torch.randn(4, 8), torch.eye(8)
    for bits in (1, 9, 4.0):
        with pytest.raises(UserError, match="bits"):
            qz.gptq(W, H, bits)
    with pytest.raises(UserError, match="group-size"):
        qz.gptq(W, H, 4, 0)
    with pytest.raises(UserError, match="Hessian"):
        qz.gptq(W, torch.eye(7), 4, 8)
    Hn = torch.eye(8)
    Hn[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        qz.gptq(W, Hn, 4, 8)


def test_joint_sparsegpt_quantizes_inside_the_loop_and_keeps_exact_sparsity():
    X = calibration(512, 128, seed=11)
    st = stats_from(X)
    W = torch.randn(40, 128, generator=gen(12))
    cq = qz.ColumnQuantizer(40, 128, 4, 32, False, "cpu")
    Wj = prune_sparsegpt(W, st, 0.5, quant=cq)
    res = cq.result(Wj, act_order=False)
    Ws = prune_sparsegpt(W, st, 0.5)
    assert int((Wj == 0).sum()) == cq.pruned == int((Ws == 0).sum()) == 40 * 128 // 2
    assert torch.equal(Wj, torch.where(res.keep, expand(res, res.scale) * (res.q.float() - expand(res, res.zero)), torch.zeros(())))
    # quantizing inside the loop (errors compensated jointly) beats rounding SparseGPT's output afterwards
    after = qz.quantize_rtn(Ws, 4, 32)
    assert out_err(W, Wj, X) < out_err(W, after.weight, X)
    # N:M joint: every group of 4 keeps exactly 2 nonzero weights
    cq = qz.ColumnQuantizer(40, 128, 3, 64, True, "cpu")
    Wnm = prune_sparsegpt(W, st, 0.5, (2, 4), quant=cq)
    assert bool(((Wnm != 0).reshape(40, -1, 4).sum(-1) == 2).all())


# ------------------------------------------------------------------------------- packed checkpoint
@pytest.mark.parametrize("bits,group_size,act_order,sym", [(4, 16, False, False), (3, 24, True, False),
                                                           (8, -1, False, True), (2, 32, True, True)])
def test_packed_checkpoint_round_trips_bit_exactly(bits, group_size, act_order, sym, tiny_llama_dir, tmp_path):
    from sparsedeploy.pipeline import models
    from sparsedeploy.pipeline.arch import prunable_linears

    model, tok = models.load(models.resolve(str(tiny_llama_dir)))
    results = {}
    with torch.no_grad():
        for i, (name, lin) in enumerate(prunable_linears(model).items()):
            W = prune_wanda(lin.weight, SimpleNamespace(col_norm=torch.ones(lin.in_features)), 0.5)
            H = stats_from(calibration(64, lin.in_features, seed=i)).hessian
            res = qz.gptq(W, H, bits, group_size, act_order, sym)
            lin.weight.copy_(res.weight)
            results[name] = res
    doc = qz.write_packed(model, tok, results, tmp_path / "q", {"sparsity": 0.5})
    back, tok2 = qz.load_packed(tmp_path / "q")
    want = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert tok2 is not None and tok2("the cat").input_ids == tok("the cat").input_ids
    # sizes (format /2): codes of the kept weights only, bits/8 bytes each (one stream, rounded up once per
    # linear), the row pointer 8 bytes per row + 8, the mask 1/8 byte per weight (rounded up per row)
    from safetensors.torch import load_file
    raw = load_file(str(tmp_path / "q" / qz.PACKED_FILE))
    for name, lin in prunable_linears(model).items():
        rows, cols = lin.weight.shape
        nnz = int((lin.weight != 0).sum())
        assert raw[f"{name}.weight_qcodes"].dtype == torch.uint8
        assert tuple(raw[f"{name}.weight_qcodes"].shape) == (-(-nnz * bits // 8),)
        rowptr = raw[f"{name}.weight_rowptr"]
        assert rowptr.dtype == torch.int64 and rowptr.tolist() == [0] + torch.cumsum((lin.weight != 0).sum(1), 0).tolist()
        assert tuple(raw[f"{name}.weight_mask"].shape) == (rows, -(-cols // 8))
        assert (f"{name}.weight_zeros" in raw) == (not sym)
        assert f"{name}.weight" not in raw
    # int4: the first two kept codes of row 0 in byte 0, the earlier in the low nibble
    if bits == 4:
        name = next(iter(results))
        b0 = int(raw[f"{name}.weight_qcodes"][0])
        kept0 = results[name].q[0][results[name].keep[0]]
        assert (b0 & 0xF, b0 >> 4) == (int(kept0[0]), int(kept0[1]))
    b = doc["bytes"]
    assert b["checkpoint"] == (tmp_path / "q" / qz.PACKED_FILE).stat().st_size
    expect = codes = kept = 0
    for lin in prunable_linears(model).values():
        rows, cols = lin.weight.shape
        nnz = int((lin.weight != 0).sum())
        ng = 1 if group_size == -1 else -(-cols // group_size)
        expect += (-(-nnz * bits // 8) + 8 * (rows + 1) + rows * -(-cols // 8)
                   + rows * ng * 4 * (1 if sym else 2) + 16)
        codes += -(-nnz * bits // 8)
        kept += nnz
    assert b["quantized_linears_packed"] == expect and b["quantized_linears_codes"] == codes
    assert doc["params"]["quantized_kept"] == kept
    assert doc["ratio_vs_fp32"] < 1 and doc["format"] == qz.FORMAT == "sparsedeploy-packed/2"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_bit_packing_round_trips_any_width(bits):
    v = torch.randint(0, 2 ** bits, (5, 37), generator=gen(bits))
    packed = qz.pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, -(-37 * bits // 8))
    assert torch.equal(qz.unpack_bits(packed, bits, 37), v)


def test_corrupt_or_missing_packed_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        qz.load_packed_state(tmp_path)
    (tmp_path / qz.QUANT_JSON).write_text("{}")
    (tmp_path / qz.PACKED_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="corrupt"):
        qz.load_packed_state(tmp_path)


# ------------------------------------------------------------------------------------ stages (tiny)
def _prune_cfg(model_dir, corpus_file, **kw):
    calib = stages.CalibConfig(str(model_dir), f"file:{corpus_file}", nsamples=8, seqlen=64, device="cpu")
    base = dict(model=str(model_dir), sparsity=0.5, allocator="dlp", method="wanda", calib=calib, device="cpu")
    base.update(kw)
    return stages.PruneConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_prune_quantize_export_tokens_equal_pytorch_fake_quant(tiny_llama_dir, corpus_file, tmp_path):
    from sparsedeploy.export.stage import export
    from sparsedeploy.export.verify import greedy_torch
    from sparsedeploy.pipeline import models
    from sparsedeploy.pipeline.arch import prunable_linears

    run = RunDir(tmp_path / "run")
    stages.prune(run, _prune_cfg(tiny_llama_dir, corpus_file))
    pruned = _weights(run.path / "model")
    qcfg = stages.QuantConfig(bits=4, group_size=32, device="cpu")
    stages.quantize(run, qcfg)
    man = run.manifest()
    assert man["stages"]["quantize"]["done"] and man["stages"]["quantize"]["bits"] == 4
    assert _weights(run.path / "pruned").keys() == pruned.keys()          # the float pruned model is kept
    fake = _weights(run.path / "model")
    model, tok = models.load(models.resolve(str(run.path)))
    lin_names = {f"{n}.weight" for n in prunable_linears(model)}
    for k in lin_names:
        assert torch.equal(fake[k] == 0, pruned[k] == 0), k                # every zero kept, none added
        assert not torch.equal(fake[k], pruned[k]), k                       # and the weights are quantized
        levels = torch.unique(fake[k][0, :32])                              # one group of one row: ≤ 16 levels
        assert levels.numel() <= 16
    doc = json.loads((run.path / "quantized" / "quantize.json").read_text())
    assert doc["bits"] == 4 and doc["group_size"] == 32 and abs(doc["sparsity"] - 0.5) < 0.01
    # the packed checkpoint restores RUN/model exactly
    restored = qz.load_packed_state(run.path / "quantized")
    for k, v in fake.items():
        assert torch.equal(restored[k], v), k
    # same arguments: skipped; other bits: re-quantized from the float pruned model, not stacked
    stamp = (run.path / "model" / "model.safetensors").stat().st_mtime_ns
    stages.quantize(run, qcfg)
    assert (run.path / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    stages.quantize(run, stages.QuantConfig(bits=8, group_size=32, device="cpu"))
    fake8 = _weights(run.path / "model")
    k = sorted(lin_names)[0]
    assert torch.equal(fake8[k] == 0, pruned[k] == 0)
    assert (fake8[k] - pruned[k]).abs().max() < (fake[k] - pruned[k]).abs().max() / 4
    stages.quantize(run, qcfg)
    # export: the ONNX greedy tokens equal PyTorch's on the fake-quant model (export verifies it; check again)
    dep = export(str(run.path), seqlen=48)
    meta = json.loads((dep / "sparsedeploy.json").read_text())
    model, tok = models.load(models.resolve(str(run.path)))
    prompt = meta["verified"]["prompt_ids"]
    ref = greedy_torch(model, prompt, len(meta["verified"]["tokens"]))
    assert meta["verified"]["tokens"] == ref and meta["verified"]["engine"] == "onnxruntime"
    packed_model, _ = qz.load_packed(run.path / "quantized")
    assert greedy_torch(packed_model, prompt, len(ref)) == ref
    # pruning again makes the quantization stale: it is removed
    stages.prune(run, _prune_cfg(tiny_llama_dir, corpus_file, sparsity=0.6))
    assert not (run.path / "quantized").exists() and not (run.path / "pruned").exists()
    assert not run.stage("quantize")["done"]


def test_joint_prune_bits_stage(tiny_llama_dir, corpus_file, tmp_path):
    run = RunDir(tmp_path / "run")
    stages.prune(run, _prune_cfg(tiny_llama_dir, corpus_file, method="sparsegpt", bits=4, group_size=32))
    rec = run.stage("prune")
    assert rec["args"]["bits"] == 4 and rec["quantized"]["bits"] == 4
    plan = json.loads((run.path / "ratios.json").read_text())
    fake = _weights(run.path / "model")
    restored = qz.load_packed_state(run.path / "quantized")
    for k, v in fake.items():
        assert torch.equal(restored[k], v), k
    for entry in plan["layers"]:
        assert abs(entry["realized"] - entry["sparsity"]) < 0.02
    with pytest.raises(UserError, match="jointly"):
        stages.quantize(run, stages.QuantConfig(device="cpu"))


# -------------------------------------------------------------------------------------- CLI contract
_cli = run_cli


@pytest.fixture(scope="module")
def allocated_run(tiny_llama_dir, corpus_file, tmp_path_factory) -> Path:
    """A RUN that planned 50% sparsity but was never pruned."""
    run = tmp_path_factory.mktemp("alloc") / "run"
    stages.calibrate(RunDir(run), stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 4, 32, device="cpu"))
    stages.allocate(RunDir(run), stages.AllocConfig(0.5, "uniform"))
    return run


def _listing(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


BAD = [
    ("bits 1", ["quantize", "{run}", "--bits", "1"], "bits"),
    ("bits 9", ["quantize", "{run}", "--bits", "9"], "bits"),
    ("group size 0", ["quantize", "{run}", "--group-size", "0"], "group-size"),
    ("quantize before prune", ["quantize", "{run}", "--device", "cpu"], "no pruned model"),
    ("not a RUN", ["quantize", "{empty}"], "not a RUN"),
    ("joint with wanda", ["prune", "{model}", "--out", "{fresh}", "--sparsity", "0.5", "--bits", "4"], "sparsegpt"),
    ("joint act-order", ["prune", "{model}", "--out", "{fresh}", "--sparsity", "0.5", "--method", "sparsegpt",
                         "--bits", "4", "--act-order"], "act-order"),
    ("joint bits 12", ["prune", "{model}", "--out", "{fresh}", "--sparsity", "0.5", "--method", "sparsegpt",
                       "--bits", "12"], "bits"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_quantize_bad_input_is_one_line_exit_2_and_writes_nothing(name, argv, needle, allocated_run, tiny_llama_dir,
                                                                  tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    fresh = tmp_path / "fresh"
    before = _listing(allocated_run)
    subs = {"run": str(allocated_run), "empty": str(empty), "fresh": str(fresh), "model": str(tiny_llama_dir)}
    code, out, err = _cli([a.format(**subs) for a in argv], monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert _listing(allocated_run) == before
    assert not any(empty.iterdir()) and not fresh.exists()


def test_cli_quantize_prints_sizes(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    stages.prune(RunDir(run), _prune_cfg(tiny_llama_dir, corpus_file, allocator="uniform"))
    code, out, err = _cli(["quantize", str(run), "--bits", "3", "--group-size", "-1", "--sym", "--act-order",
                           "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    assert "3 bits" in out and "of fp32" in out
    doc = json.loads((run / "quantized" / "quantize.json").read_text())
    assert (doc["bits"], doc["group_size"], doc["sym"], doc["act_order"]) == (3, -1, True, True)
