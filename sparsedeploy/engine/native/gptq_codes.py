"""Reads the GPTQ codes of a packed checkpoint (RUN/quantized/) without torch, for the native engine.

Both on-disk formats (the quantize stage's module doc describes its writer; nothing of that layer is imported
here, so the engine layer stays free of it and of its dependencies):
    "sparsedeploy-packed/2": per linear `<m>.weight_qcodes` uint8 [ceil(nnz·bits/8)] = the kept weights' codes
        only, one bit stream in row order (columns ascending), LSB first; `<m>.weight_rowptr` int64 [out+1] =
        row r's codes are stream codes rowptr[r] … rowptr[r+1]-1 (offsets in codes);
    "sparsedeploy-packed/1": `<m>.weight_qcodes` uint8 [out, ceil(in·bits/8)] = every position's code,
        densely packed per row (pruned positions hold code 0);
and in both `<m>.weight_mask` uint8 [out, ceil(in/8)] (keep bitmask, LSB first), `<m>.weight_scales` float32
[out, groups], `<m>.weight_zeros` float32 [out, groups] (asymmetric only; symmetric: zero = maxq/2 with
maxq = 2**bits - 1) and `<m>.weight_shape` int64 [2]. The tensors are in model.safetensors or, for a large
(streamed) checkpoint, in the shards that model.safetensors.index.json names.

The fake-quant weight is w = scale·(q - zero) at kept positions and exactly 0 at pruned ones, in float32, with
the group's scale/zero: group of column c = c // group_size (group_size -1: one group per row).
`dequantize` computes it in the pipeline's order (q - zero first, then × scale), so it equals the pipeline's
fake-quant weights bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import UserError

FORMAT_V1 = "sparsedeploy-packed/1"
FORMAT_V2 = "sparsedeploy-packed/2"
FORMATS = (FORMAT_V1, FORMAT_V2)
PACKED_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"      # a sharded checkpoint (Hugging Face's layout): tensor name -> shard
QUANT_JSON = "quantize.json"


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8 [..., bytes] bit-packed codes (code i at bits i·bits … i·bits+bits-1, LSB first) -> uint8 [..., n]."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    lead = packed.shape[:-1]
    if n == 0:
        return np.zeros(lead + (0,), np.uint8)
    if packed.shape[-1] * 8 < n * bits:
        raise ValueError(f"{packed.shape[-1]} bytes hold fewer than {n} codes of {bits} bits")
    maxq = (1 << bits) - 1
    if 8 % bits == 0:   # 1, 2, 4, 8 bits: whole codes per byte
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        out = ((packed[..., :, None] >> shifts) & maxq).reshape(lead + (-1,))
        return np.ascontiguousarray(out[..., :n])
    planes = np.unpackbits(packed, axis=-1, count=n * bits, bitorder="little").reshape(lead + (n, bits))
    out = np.zeros(lead + (n,), np.uint8)
    for b in range(bits):
        out |= planes[..., b] << np.uint8(b)
    return out


def group_index(cols: int, group_size: int) -> np.ndarray:
    """Group of each input column: c // group_size (all 0 for group_size -1)."""
    return np.arange(cols) // (cols if group_size == -1 else group_size)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, keep: np.ndarray, group_size: int) -> np.ndarray:
    """float32 [out, in] fake-quant weight: scale·(q - zero) where kept, +0.0 where pruned (the pipeline's
    float order, so bit-exact with it)."""
    g = group_index(codes.shape[1], group_size)
    w = scale[:, g].astype(np.float32) * (codes.astype(np.float32) - zero[:, g].astype(np.float32))
    return np.where(keep, w, np.float32(0))


def _corrupt(folder: Path, what: str) -> UserError:
    return UserError(f"{folder} holds a corrupt packed checkpoint ({what})", "rerun `sparsedeploy quantize RUN --force`")


def _tensor_files(folder: Path) -> list[str]:
    """model.safetensors, or the shards model.safetensors.index.json names (a large checkpoint)."""
    if (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise _corrupt(folder, f"{INDEX} is not a shard index") from None
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise _corrupt(folder, f"shard {missing[0]} is missing")
        return [str(folder / f) for f in shards]
    if not (folder / PACKED_FILE).is_file():
        raise UserError(f"{folder} is not a packed checkpoint ({PACKED_FILE} is missing)",
                        "run `sparsedeploy quantize RUN` to write RUN/quantized/")
    return [str(folder / PACKED_FILE)]


def read_packed(quantized_dir) -> tuple[dict, Callable[[str], tuple]]:
    """(meta, get) for a packed checkpoint folder. meta is quantize.json (format, bits, group_size, sym,
    quantized_linears, tied, sizes, …). get(module_name) -> (codes uint8 [out, in] with 0 at pruned positions,
    scale float32 [out, groups], zero float32 [out, groups], keep bool [out, in], group_size int)."""
    from safetensors import safe_open

    folder = Path(quantized_dir)
    try:
        meta = json.loads((folder / QUANT_JSON).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a packed checkpoint ({QUANT_JSON} is missing)",
                        "run `sparsedeploy quantize RUN` to write RUN/quantized/") from None
    except ValueError:
        raise _corrupt(folder, f"{QUANT_JSON} is not JSON") from None
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise UserError(f"{folder}: unknown packed checkpoint format {fmt!r} (this version reads {', '.join(FORMATS)})",
                        "quantize again with this version: `sparsedeploy quantize RUN --force`")
    files = _tensor_files(folder)
    bits, gs, sym = int(meta["bits"]), int(meta["group_size"]), bool(meta["sym"])
    maxq = (1 << bits) - 1
    where: dict[str, str] = {}
    try:
        for path in files:
            with safe_open(path, framework="numpy") as f:
                where.update(dict.fromkeys(f.keys(), path))
    except Exception as e:  # noqa: BLE001
        raise _corrupt(folder, type(e).__name__) from None

    def get(module: str):
        if f"{module}.weight_shape" not in where:
            raise KeyError(f"{module} is not a quantized linear of {folder}")

        def t(leaf):
            name = f"{module}.{leaf}"
            if name not in where:
                raise _corrupt(folder, f"{name} is missing")
            with safe_open(where[name], framework="numpy") as f:
                return f.get_tensor(name)
        rows, cols = (int(v) for v in t("weight_shape"))
        keep = unpack_bits(t("weight_mask"), 1, cols).astype(bool)
        packed = t("weight_qcodes")
        if fmt == FORMAT_V1:
            if packed.ndim != 2 or packed.shape[0] != rows:
                raise _corrupt(folder, f"{module}.weight_qcodes has shape {packed.shape}")
            codes = unpack_bits(packed, bits, cols)
            codes = np.where(keep, codes, np.uint8(0))
        else:
            rowptr = t("weight_rowptr").astype(np.int64)
            counts = keep.sum(axis=1, dtype=np.int64)
            nnz = int(counts.sum())
            if (packed.ndim != 1 or packed.size != -(-nnz * bits // 8) or rowptr.shape != (rows + 1,)
                    or rowptr[0] != 0 or not np.array_equal(np.diff(rowptr), counts)):
                raise _corrupt(folder, f"{module}: the kept codes do not match the mask and row pointer")
            codes = np.zeros((rows, cols), np.uint8)
            codes[keep] = unpack_bits(packed, bits, nnz)   # boolean assignment is row-major: row order
        scale = t("weight_scales").astype(np.float32, copy=False)
        zero = (np.full(scale.shape, maxq / 2, np.float32) if sym
                else t("weight_zeros").astype(np.float32, copy=False))
        if keep.shape != (rows, cols) or codes.shape != (rows, cols) or scale.shape != zero.shape \
                or scale.shape[0] != rows or scale.shape[1] != -(-cols // (cols if gs == -1 else gs)):
            raise _corrupt(folder, f"{module}: the tensors do not match its shape ({rows}, {cols})")
        return codes, scale, zero, keep, gs

    return meta, get
