"""The packed checkpoint's format /2 (kept codes only + row pointer) and the torch-free reader the native engine
uses (sparsedeploy.engine.native.gptq_codes), for /2 and the older /1.

The reader's codes are checked against the fake-quant weights the quantize stage writes to RUN/model: per group,
scale·(q - zero) where kept and 0 where pruned must equal them bit for bit (float32, the pipeline's order of
operations: q - zero, then × scale).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsedeploy.engine.native import gptq_codes as gc
from sparsedeploy.errors import UserError
from sparsedeploy.pipeline import quantize as qz
from sparsedeploy.pipeline import stages
from sparsedeploy.pipeline.prune import prune_wanda
from sparsedeploy.pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _np_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def downgrade_to_v1(folder: Path) -> None:
    """Rewrite a /2 packed folder in format /1, exactly as the /1 writer packed it: every position's code
    (0 where pruned) densely bit-packed per row with pack_bits, no row pointer."""
    from safetensors.torch import load_file, save_file
    doc = json.loads((folder / qz.QUANT_JSON).read_text())
    assert doc["format"] == qz.FORMAT
    raw = load_file(str(folder / qz.PACKED_FILE))
    mods = {n.rpartition(".")[0] for n in raw if n.endswith(".weight_rowptr")}
    for m in mods:
        t = {leaf: raw[f"{m}.{leaf}"] for leaf in ("weight_shape", "weight_mask", "weight_qcodes", "weight_rowptr")}
        q, _ = qz.unpack_codes(t, doc["bits"])
        raw[f"{m}.weight_qcodes"] = qz.pack_bits(q, doc["bits"])
        del raw[f"{m}.weight_rowptr"]
    save_file(raw, str(folder / qz.PACKED_FILE), metadata={"format": "pt"})
    doc["format"] = qz.FORMAT_V1
    (folder / qz.QUANT_JSON).write_text(json.dumps(doc))


def check_reader_matches_model(quantized: Path, model_dir: Path) -> dict:
    """Every quantized linear: the reader's codes rebuild RUN/model's weight bit for bit. Returns get()'s
    results by module."""
    meta, get = gc.read_packed(quantized)
    weights = _np_weights(model_dir)
    maxq = 2 ** meta["bits"] - 1
    got = {}
    assert meta["quantized_linears"]
    for m in meta["quantized_linears"]:
        codes, scale, zero, keep, gs = get(m)
        W = weights[f"{m}.weight"]
        assert W.dtype == np.float32
        rows, cols = W.shape
        assert codes.dtype == np.uint8 and codes.shape == (rows, cols)
        assert keep.dtype == bool and keep.shape == (rows, cols)
        assert scale.dtype == zero.dtype == np.float32 and scale.shape == zero.shape
        assert gs == meta["group_size"]
        glen = cols if gs == -1 else gs
        assert scale.shape == (rows, -(-cols // glen))
        assert int(codes.max()) <= maxq and not codes[~keep].any()
        assert np.array_equal(keep, W != 0)                       # the zeros are exactly the pruned weights
        if meta["sym"]:
            assert np.all(zero == np.float32(maxq / 2))
        # per group, written out here (not gc.dequantize): scale·(q - zero) where kept, +0.0 where pruned
        want = np.zeros_like(W)
        for g0 in range(0, cols, glen):
            g = g0 // glen
            sl = slice(g0, min(g0 + glen, cols))
            w = scale[:, g:g + 1] * (codes[:, sl].astype(np.float32) - zero[:, g:g + 1])
            want[:, sl] = np.where(keep[:, sl], w, np.float32(0))
        assert np.array_equal(want.view(np.uint32), W.view(np.uint32)), m          # bit for bit
        assert np.array_equal(gc.dequantize(codes, scale, zero, keep, gs).view(np.uint32), W.view(np.uint32))
        got[m] = (codes, scale, zero, keep, gs)
    return got


@pytest.fixture(scope="module")
def pruned_run(tiny_llama_dir, corpus_file, tmp_path_factory) -> Path:
    run = RunDir(tmp_path_factory.mktemp("gptq-codes") / "run")
    calib = stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", nsamples=8, seqlen=64, device="cpu")
    stages.prune(run, stages.PruneConfig(model=str(tiny_llama_dir), sparsity=0.5, allocator="dlp", method="wanda",
                                         calib=calib, device="cpu"))
    return run.path


def _data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the (possibly padded) header."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


# asym and sym at group sizes 64, 128 (> in_features of most linears: one group) and -1; 3-bit puts rows
# at odd bit offsets of the code stream
@pytest.mark.parametrize("sym,group_size,bits", [(False, 64, 4), (False, 128, 3), (False, -1, 4),
                                                 (True, 64, 3), (True, 128, 4), (True, -1, 4)])
def test_reader_codes_rebuild_the_fake_quant_model_bit_for_bit(pruned_run, tmp_path, sym, group_size, bits):
    run = RunDir(tmp_path / "run")
    shutil.copytree(pruned_run, run.path)
    stages.quantize(run, stages.QuantConfig(bits=bits, group_size=group_size, sym=sym, device="cpu"))
    q = run.path / "quantized"
    doc = json.loads((q / qz.QUANT_JSON).read_text())
    assert doc["format"] == "sparsedeploy-packed/2" and doc["sym"] == sym and doc["group_size"] == group_size
    assert run.manifest()["stages"]["quantize"]["format"] == "sparsedeploy-packed/2"
    v2 = check_reader_matches_model(q, run.path / "model")
    # the same checkpoint in format /1 (an old run): both readers still restore it exactly
    v1_dir = tmp_path / "v1"
    shutil.copytree(q, v1_dir)
    downgrade_to_v1(v1_dir)
    assert _data_bytes(v1_dir / qz.PACKED_FILE) > _data_bytes(q / qz.PACKED_FILE)
    v1 = check_reader_matches_model(v1_dir, run.path / "model")
    for m, a in v2.items():
        for x, y in zip(a[:4], v1[m][:4]):
            assert np.array_equal(x, y), m
    fake = _np_weights(run.path / "model")
    for folder in (q, v1_dir):
        restored = qz.load_packed_state(folder)
        for k, v in fake.items():
            assert torch.equal(restored[k], torch.from_numpy(v)), (folder.name, k)


def _rtn_checkpoint(model_dir: Path, out: Path, sparsity: float, bits: int = 4, group_size: int = 32) -> dict:
    from sparsedeploy.pipeline import models
    from sparsedeploy.pipeline.arch import prunable_linears

    model, tok = models.load(models.resolve(str(model_dir)))
    results = {}
    with torch.no_grad():
        for name, lin in prunable_linears(model).items():
            W = prune_wanda(lin.weight, SimpleNamespace(col_norm=torch.ones(lin.in_features)), sparsity)
            res = qz.quantize_rtn(W, bits, group_size)
            lin.weight.copy_(res.weight)
            results[name] = res
    return qz.write_packed(model, tok, results, out, {"sparsity": sparsity})


def test_checkpoint_size_falls_with_sparsity(tiny_llama_dir, tmp_path):
    docs = {s: _rtn_checkpoint(tiny_llama_dir, tmp_path / f"s{s}", s) for s in (0.5, 0.7)}
    b5, b7 = docs[0.5]["bytes"], docs[0.7]["bytes"]
    k5, k7 = docs[0.5]["params"]["quantized_kept"], docs[0.7]["params"]["quantized_kept"]
    n = docs[0.5]["params"]["quantized"]
    assert abs(k5 / n - 0.5) < 0.02 and abs(k7 / n - 0.3) < 0.02   # per-row rounding of the pruned count
    # the codes shrink in proportion to the kept weights (4 bits each), so does the checkpoint
    assert abs(b5["quantized_linears_codes"] - k5 / 2) < 8 and abs(b7["quantized_linears_codes"] - k7 / 2) < 8
    assert b7["quantized_linears_packed"] < b5["quantized_linears_packed"]
    assert b7["checkpoint"] < b5["checkpoint"]
    assert b5["checkpoint"] - b7["checkpoint"] >= (k5 - k7) / 2


def test_unknown_format_and_corrupt_row_pointer_are_user_errors(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    q = tmp_path / "q"
    _rtn_checkpoint(tiny_llama_dir, q, 0.5)
    doc = json.loads((q / qz.QUANT_JSON).read_text())
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    (bad / qz.QUANT_JSON).write_text(json.dumps(doc | {"format": "sparsedeploy-packed/9"}))
    for read in (qz.load_packed_state, gc.read_packed):
        with pytest.raises(UserError, match="unknown packed checkpoint format"):
            read(bad)
    raw = load_file(str(q / qz.PACKED_FILE))
    m = doc["quantized_linears"][0]
    raw[f"{m}.weight_rowptr"] = raw[f"{m}.weight_rowptr"].flip(0).contiguous()
    shutil.rmtree(bad)
    shutil.copytree(q, bad)
    save_file(raw, str(bad / qz.PACKED_FILE))
    with pytest.raises(UserError, match="corrupt"):
        qz.load_packed_state(bad)
    _, get = gc.read_packed(bad)
    with pytest.raises(UserError, match="corrupt"):
        get(m)
    with pytest.raises(KeyError):
        get("model.no_such_linear")


def test_reader_leaves_torch_out(tiny_llama_dir, tmp_path):
    q = tmp_path / "q"
    doc = _rtn_checkpoint(tiny_llama_dir, q, 0.5)
    code = ("import sys, numpy as np\n"
            "from sparsedeploy.engine.native.gptq_codes import read_packed\n"
            f"meta, get = read_packed({str(q)!r})\n"
            "codes, scale, zero, keep, gs = get(meta['quantized_linears'][0])\n"
            "print('KEPT', int(keep.sum()), 'LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "LOADED []" in out
    kept = int(out.split("KEPT ")[1].split()[0])
    assert 0 < kept < doc["params"]["quantized"]
