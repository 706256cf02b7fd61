"""The native engine: a decoder-only LM run token by token with numba kernels, no torch, no ONNX engine.

`NativeModel` loads DEPLOYMENT/native/ (pack.py) and runs the same contract as the exported graph:
input_ids [1, L], positions [1, L], causal_mask [1, 1, L, S] (1 = may attend), past_key_values.{i}.{key,value}
[1, Hkv, S-L, D] -> logits [1, L, V] and present.{i}.{key,value}. One difference, declared by
`present_rows = "new"`: `present` holds only the L new rows [1, Hkv, L, D], not all S (the decode loop
stores only those, so copying the whole cache back every token would be wasted bandwidth).

Per token the Python side makes 8 kernel calls per decoder layer (norm, q|k|v, attention, o + residual,
norm, gate|up, activation, down + residual); `bench` reports what that costs (`python_ms`).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from numba import get_num_threads

from ...errors import UserError
from . import kernels as K
from .lowbit import DEFAULT_ACT_COLUMNS
from .simd_rows import (PANEL_ROWS, TILE, csr_gemm_panels, csr_gemm_t, dense_gemm_rows, ell_gemm_t, panel_major,
                        transpose_into)
from ...arch import native_arch, rope_theta
from .pack import INDEX, SHARED, WEIGHTS, read_index

_EMPTY = np.zeros(0, dtype=np.float32)
# a batched step of up to this many rows runs a bitmask group on its own format (simd.bitmask_gemm_rows: 4.125
# bytes per kept weight, one expand per 16 columns for all rows); more rows walk its CSR twin (simd_rows). On
# SmolLM2 Wanda+DLP 70%, AMD EPYC, one thread (busy machine): B = 2 / 4 steps 23 / 27 ms against 29 / 33 with
# the twin, B = 8 47 against 43 (8 masked loads and FMAs per 16 columns cost more than the twin's bytes save)
BITMASK_ROWS = 4
# prompt chunks (more than PANEL_ROWS_MIN rows) of groups at most this wide run simd_rows.csr_gemm_panels; wider
# ones the row tiles (csr_gemm_t; their memory: a panel-major copy of the group while batched steps are open).
# benchmarks/panel_ab.py (results/panel_ab_amd_epyc.md: SmolLM2 Wanda+DLP 70%, AMD EPYC Zen 4, 2 threads, 30
# layers' matrices, interleaved rounds), 64 rows: down (576 x 1536) 18.8 ms on the panels against 23.2 on the
# tiles, all four groups 65.2 against 84.4. (An earlier limit of 1024, measured with one thread on a busy
# machine, had sent down to the tiles.) 7B-wide groups (4096, 11008 columns) keep the tiles: not measured.
PANEL_IN_MAX = 2048
# ... and only past this many rows: up to it the row tiles (8 rows per pass over a weight row) are faster. Same
# table: 8 rows tiles 17.5 ms against panels 27.1; 16 rows a tie (34.3 / 34.6); 32 rows panels 42.8 against 62.5.
# (It was 32, from one thread on a busy machine.)
PANEL_ROWS_MIN = 8
# how many of a Linear's (a, b, c, d, e, gs) its format's kernels take, in that order
_NARGS = {"dense": 1, "ell": 2, "csr": 3, "bitmask": 3, "int8": 2, "int8_ell": 3, "int8_csr": 4, "int8_bitmask": 4,
          "int8_perm": 5, "q4": 2, "int4_bitmask": 6}


class Linear:
    """One stored group (dense / ELL / CSR / bitmask, fp32 or int8; int4 bitmask): y = W x (+ bias), optionally
    added into y. The int8 dense and bitmask groups and the int4 ones quantise x to int8 (one scale per act_columns: 256, or 64) once per call (lowbit.quantize_act,
    into buffers of their own): a stacked group (q|k|v, gate|up) quantises its input once for all its rows."""

    __slots__ = ("fmt", "act_columns", "a", "b", "c", "d", "e", "gs", "bias", "rows", "cols_in", "nbytes", "gemv", "qbuf", "qrows", "twin",
                 "args", "panels")

    def __init__(self, fmt: str, arrays: dict[str, np.ndarray], bias: np.ndarray | None, shape, serial: bool = False,
                 act_columns: int = DEFAULT_ACT_COLUMNS, portable: bool = False):
        self.fmt = fmt
        self.act_columns = int(act_columns)
        self.rows, self.cols_in = int(shape[0]), int(shape[1])
        self.bias = _EMPTY if bias is None else bias
        self.d, self.e, self.gs, self.qbuf, self.qrows, self.twin, self.panels = None, None, 0, None, None, None, None
        try:
            if fmt == "dense":
                self.a, self.b, self.c = arrays["w"], None, None
            elif fmt == "ell":
                self.a, self.b, self.c = arrays["cols"], arrays["vals"], None
            elif fmt == "csr":
                self.a, self.b, self.c = arrays["rowptr"], arrays["cols"], arrays["vals"]
            elif fmt == "bitmask":
                self.a, self.b, self.c = arrays["rowptr"], arrays["masks"], arrays["vals"]
            elif fmt == "int8":
                self.a, self.b, self.c = arrays["wq"], arrays["wscale"], None
            elif fmt == "int8_ell":
                self.a, self.b, self.c = arrays["cols"], arrays["vals"], arrays["wscale"]
            elif fmt in ("int8_csr", "int8_bitmask"):
                self.a, self.b, self.c, self.d = (arrays["rowptr"], arrays["cols" if fmt == "int8_csr" else "masks"],
                                                  arrays["vals"], arrays["wscale"])
            elif fmt == "int8_perm":
                self.a, self.b, self.c, self.d, self.e = (arrays["vecptr"], arrays["base"], arrays["packed"],
                                                          arrays["window"], arrays["wscale"])
            elif fmt == "q4":                                              # a low-bit build's 4-bit lm_head
                self.a, self.b, self.c = arrays["w4"], arrays["ws"], None
            elif fmt == "int4_bitmask":
                self.a, self.b, self.c, self.d, self.e = (arrays["rowptr"], arrays["masks"], arrays["vals"],
                                                          arrays["scale"], arrays["zero"])
                self.gs = int(arrays["group_size"][0])
            else:
                raise KeyError(fmt)
        except KeyError:
            raise UserError(f"unknown stored format '{fmt}' (or its arrays are missing) in native weights",
                            "rebuild them: sparsedeploy compile --engine native --force") from None
        if fmt in ("int8", "int8_bitmask", "int8_perm", "int4_bitmask", "q4"):
            from .lowbit import act_buffers

            self.qbuf = act_buffers(self.cols_in, self.act_columns)
        self.nbytes = sum(int(x.nbytes) for x in arrays.values()) + int(self.bias.nbytes)
        self.gemv = (K.GEMV_SERIAL if serial else K.GEMV)[fmt]          # the build the tuner measured fastest
        if portable and fmt in K.GEMV_PORTABLE:                         # (the plain-numba twin: see kernels.py)
            self.gemv = K.GEMV_PORTABLE[fmt]
        self.args = (self.a, self.b, self.c, self.d, self.e, self.gs)[:_NARGS[fmt]]     # the kernel's weight arguments

    def vec(self, x: np.ndarray, out: np.ndarray, acc: bool) -> None:
        """x [in] -> out [rows]. Groups with activation buffers quantise x to int8 first (lowbit.quantize_act)."""
        if self.qbuf is None:
            self.gemv(*self.args, x, self.bias, out, acc)
        else:
            q, corr, s = self.qbuf
            K.quantize_act(x, q, corr, s)
            self.gemv(*self.args, q, corr, s, self.bias, out, acc)

    def mat(self, X: np.ndarray, Y: np.ndarray, acc: bool) -> None:
        """X [L, in] -> Y [L, rows]."""
        if X.shape[0] == 1:
            self.vec(X[0], Y[0], acc)
        elif self.fmt in ("csr", "bitmask", "ell"):
            # the row-tiled products of batched steps (a bitmask group gets its CSR twin on first use): measured
            # on SmolLM2 Wanda+DLP 70%, AMD EPYC, a 64-token prompt in 176 ms against 515 with csr/bitmask/ell_gemm
            self.mat_rows(X, Y, acc)
        elif self.fmt == "dense":
            r = X @ self.a.T
            if self.bias.shape[0]:
                r += self.bias
            if acc:
                Y += r
            else:
                Y[...] = r
        elif self.fmt in ("int8", "int8_bitmask", "q4"):
            self.mat_lowbit(X, Y, acc)
        else:                            # other low-bit groups: token by token (prefill is not what they are for, yet)
            for l in range(X.shape[0]):
                self.vec(X[l], Y[l], acc)

    def mat_lowbit(self, X: np.ndarray, Y: np.ndarray, acc: bool) -> None:
        """int8 / int8_bitmask / q4: X [L, in] -> Y [L, rows] reading each weight row once for all L rows, the
        same values as L `vec` calls (lowbit_batch). Row buffers grow to the largest L seen, then stay."""
        from .lowbit_batch import GEMM, act_buffers_rows, quantize_rows

        L = X.shape[0]
        if self.qrows is None or self.qrows[0].shape[0] < L:
            self.qrows = act_buffers_rows(max(L, 8), self.cols_in, self.act_columns)
        Q, C, S = (b[:L] for b in self.qrows)
        quantize_rows(X, Q, C, S)
        GEMM[self.fmt](*self.args, Q, C, S, self.bias, Y, acc)

    def prepare_rows(self) -> None:
        """Before batched steps: a bitmask group gets a CSR twin of its values (rowptr, cols, vals), which the
        row-tiled products of more than BITMASK_ROWS rows walk; every fp32 sparse group at most PANEL_IN_MAX wide
        gets a panel-major copy of its weights (simd_rows.panel_major, for prompt chunks: csr_gemm_panels; an ELL
        group's from the CSR of its flattened arrays): memory for prompt speed, one more copy of the group's
        stored values and indices while batched steps are open."""
        if self.fmt == "bitmask" and self.twin is None:
            W = self.dense()
            nz = W != 0
            rowptr = np.zeros(self.rows + 1, np.int64)
            np.cumsum(nz.sum(axis=1), out=rowptr[1:])
            cols = np.nonzero(nz)[1].astype(np.uint16 if self.cols_in <= 65536 else np.uint32)
            self.twin = (rowptr, cols, np.ascontiguousarray(W[nz]))
        if self.fmt in ("csr", "bitmask", "ell") and self.panels is None and self.cols_in <= PANEL_IN_MAX:
            if self.fmt == "ell":
                k = self.a.shape[1]
                rowptr, cols, vals = np.arange(self.rows + 1, dtype=np.int64) * k, self.a.reshape(-1), self.b.reshape(-1)
            else:
                rowptr, cols, vals = self.twin if self.fmt == "bitmask" else (self.a, self.b, self.c)
            self.panels = panel_major(rowptr, cols, vals, self.cols_in)

    def mat_rows(self, X: np.ndarray, Y: np.ndarray, acc: bool) -> None:
        """X [R, in] -> Y [R, rows] for a batched step's rows (NativeModel.forward_rows): fp32 sparse groups
        run the row-tiled products (up to BITMASK_ROWS rows of a bitmask group: simd.bitmask_gemm_rows on the
        format itself; up to PANEL_ROWS_MIN rows, or any count in groups wider than PANEL_IN_MAX: simd_rows'
        row tiles; more: mat_panels), dense ones simd_rows.dense_gemm_rows, the low-bit ones lowbit_batch (through
        `mat`); one row `vec`."""
        R = X.shape[0]
        f = self.fmt
        if f == "dense" and R > 1:
            dense_gemm_rows(self.a, X, self.bias, Y, acc)
            return
        if R == 1 or f not in ("csr", "ell", "bitmask"):
            self.mat(X, Y, acc)
            return
        if f == "bitmask" and R <= BITMASK_ROWS:
            K.bitmask_gemm_rows(self.a, self.b, self.c, np.ascontiguousarray(X), self.bias, Y, acc)
            return
        if R > PANEL_ROWS_MIN and self.cols_in <= PANEL_IN_MAX:
            self.mat_panels(X, Y, acc)
            return
        Xt = _xt_buffer(self.cols_in, R)
        _transpose(X, Xt)
        if f == "ell":
            ell_gemm_t(self.a, self.b, Xt, self.bias, Y, acc)
            return
        if f == "bitmask" and self.twin is None:
            self.prepare_rows()
        rowptr, cols, vals = self.twin if f == "bitmask" else (self.a, self.b, self.c)
        csr_gemm_t(rowptr, cols, vals, Xt, self.bias, Y, acc)

    def mat_panels(self, X: np.ndarray, Y: np.ndarray, acc: bool) -> None:
        """X [R, in] -> Y [R, rows] for R > PANEL_ROWS_MIN rows (prompt chunks) of an fp32 sparse group at most PANEL_IN_MAX
        wide: simd_rows.csr_gemm_panels over up to PANEL_ROWS rows per call (64 at a time while more are left)."""
        if self.panels is None:
            self.prepare_rows()
        off, cols, vals = self.panels
        R = X.shape[0]
        g = 0
        while g < R:
            n = R - g if R - g <= PANEL_ROWS else 64
            Xt = _xt_buffer(self.cols_in, n, 16)
            _transpose(X[g:g + n], Xt)
            Yt = _xt_buffer(self.rows, n, 16, "y")
            csr_gemm_panels(off, cols, vals, Xt, Yt, self.bias, Y[g:g + n], acc, get_num_threads())
            g += n

    def dense(self) -> np.ndarray:
        """The matrix this group stores, dense (for tests; int8 / int4 groups: dequantised)."""
        if self.fmt == "int4_bitmask":
            from .int4 import dequantized_int4

            enc = {"rowptr": self.a, "masks": self.b, "vals": self.c, "scale": self.d, "zero": self.e,
                   "group_size": np.array([self.gs], np.int64)}
            return dequantized_int4(enc, self.cols_in)
        if self.fmt == "q4":
            from .lowbit import dequantized_q4

            return dequantized_q4({"w4": self.a, "ws": self.b}, self.cols_in)
        if self.fmt == "int8_perm":
            from .lowbit import dequantized_int8_perm

            return dequantized_int8_perm({"vecptr": self.a, "base": self.b, "packed": self.c, "window": self.d,
                                          "wscale": self.e}, (self.rows, self.cols_in))
        W = np.zeros((self.rows, self.cols_in), dtype=np.float32)
        if self.fmt == "dense":
            W[:] = self.a
        elif self.fmt == "ell":
            np.put_along_axis(W, self.a.astype(np.int64), self.b, axis=1)
        elif self.fmt == "bitmask":
            nblk = self.b.shape[0] // max(self.rows, 1)
            bits = ((self.b.reshape(self.rows, nblk, 1) >> np.arange(16, dtype=np.uint16)) & 1).astype(bool)
            W[bits.reshape(self.rows, nblk * 16)[:, :self.cols_in]] = self.c
        elif self.fmt == "csr":
            counts = np.diff(self.a)
            W[np.repeat(np.arange(self.rows), counts), self.b.astype(np.int64)] = self.c
        elif self.fmt == "int8":
            W[:] = (self.a[:, :self.cols_in].astype(np.float32) - 128) * self.b[:, None]
        elif self.fmt == "int8_ell":
            np.put_along_axis(W, self.a.astype(np.int64), self.b.astype(np.float32) * self.c[:, None], axis=1)
        elif self.fmt == "int8_csr":
            counts = np.diff(self.a)
            r = np.repeat(np.arange(self.rows), counts)
            W[r, self.b.astype(np.int64)] = self.c.astype(np.float32) * self.d[r]
        else:                                                              # int8_bitmask
            nblk = self.b.shape[0] // max(self.rows, 1)
            bits = np.unpackbits(self.b.view(np.uint8).reshape(self.rows, nblk, 8), axis=2, bitorder="little")
            keep = bits.reshape(self.rows, nblk * 64)[:, :self.cols_in].astype(bool)
            r = np.nonzero(keep)[0]
            W[keep] = (self.c.astype(np.float32) - 128) * self.d[r]
        return W


_XT: dict[tuple, np.ndarray] = {}


def _xt_buffer(width: int, rows: int, tile: int = TILE, kind: str = "x") -> np.ndarray:
    """A C-contiguous [width, Lp] buffer (Lp: rows rounded up to `tile`), shared by every group of that
    width and kind ("x": a transposed input; "y": csr_gemm_panels' partial sums) (one Python thread runs a
    model's products one after another); the padding columns are zero."""
    Lp = -(-rows // tile) * tile
    buf = _XT.get((kind, width, Lp))
    if buf is None:
        buf = _XT[(kind, width, Lp)] = np.zeros((width, Lp), np.float32)
    elif Lp > rows:
        buf[:, rows:] = 0
    return buf


TRANSPOSE_NUMPY_MAX = 1024


def _transpose(X: np.ndarray, Xt: np.ndarray) -> None:
    """Xt[:, :L] = X.T: numpy's strided copy, or simd_rows.transpose_into for inputs wider than
    TRANSPOSE_NUMPY_MAX (numpy: 206 us for 64 x 1536, the down group's prompt chunk, against 68; AMD EPYC)."""
    if X.shape[1] > TRANSPOSE_NUMPY_MAX:
        transpose_into(X, Xt)
    else:
        Xt[:, :X.shape[0]] = X.T


def _resident(a: np.ndarray) -> np.ndarray:
    """A copy in memory numpy allocates itself. numpy asks the kernel for transparent huge pages on large
    buffers (madvise); the buffer safetensors hands back is plain 4 KiB pages, and streaming gigabytes through
    4 KiB pages costs a TLB miss per page — under a hypervisor a two-level page walk. Measured on a 2-core
    Intel Xeon VM (THP 'madvise'): 7B-shape layers at 90% ran 2-3x slower from the safetensors buffers."""
    out = np.empty(a.shape, a.dtype)
    out[...] = a
    return out


LOAD_ENV = "SPARSEDEPLOY_NATIVE_LOAD"     # mmap | copy | auto (default)
COPY_RAM_SHARE = 0.5                     # auto: copy weight files up to this share of the machine's RAM, map larger


def load_mode(native_dir: str | Path, mode: str | None = None) -> str:
    """How NativeModel loads the weights: "mmap" (views of a private memory map of the files: start-up reads and
    copies nothing, pages come in on first use) or "copy" (`_resident` copies: numpy's own, huge-page backed
    memory). mode None: $SPARSEDEPLOY_NATIVE_LOAD, else auto: copy while the weight files are at most
    COPY_RAM_SHARE of the RAM, map above (what does not fit twice — page cache while reading, then the copies —
    is better paged in from the files than copied). Copies decode faster: the file map's 4 KiB pages cost a TLB
    miss every 4 KiB; measured on AMD EPYC (2 threads), an 8-layer 7B-shaped int8 deployment at 70% took 27.2 ms
    a step copied against 30.0-36.8 memory-mapped (and the Intel VM ran 2-3x slower from the file's buffers).
    The copy is made one tensor at a time, so the peak is the copies plus one tensor."""
    import os

    mode = mode or os.environ.get(LOAD_ENV) or "auto"
    if mode not in ("mmap", "copy", "auto"):
        raise UserError(f"{LOAD_ENV}={mode!r} is not a load mode of the native engine", "use mmap, copy or auto")
    if mode == "auto":
        size = sum((Path(native_dir) / n).stat().st_size for n in (WEIGHTS, SHARED))
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mode = "mmap" if size > COPY_RAM_SHARE * ram else "copy"
    return mode


class NativeModel:
    def __init__(self, native_dir: str | Path, load: str | None = None):
        from safetensors import safe_open

        from .pack import map_arrays

        native_dir = Path(native_dir)
        index = read_index(native_dir)
        if index is None:
            raise UserError(f"{native_dir} holds no native weights of this version ({INDEX}, {WEIGHTS}, {SHARED})",
                            "build them: sparsedeploy compile DEPLOYMENT --engine native")
        self.index = index
        cfg = index["config"]
        self.arch = native_arch(cfg)
        self.load_mode = load_mode(native_dir, load)
        t = {}
        for name in (WEIGHTS, SHARED):
            if self.load_mode == "mmap":
                t.update(map_arrays(native_dir / name))
            else:
                with safe_open(str(native_dir / name), framework="numpy") as f:     # one tensor at a time: no 2x peak
                    t.update({k: _resident(f.get_tensor(k)) for k in f.keys()})
        self.n_layers = int(cfg["num_hidden_layers"])
        self.hidden = int(cfg["hidden_size"])
        self.H = int(cfg["num_attention_heads"])
        self.Hkv = int(cfg.get("num_key_value_heads") or self.H)
        self.D = int(cfg.get("head_dim") or self.hidden // self.H)
        self.eps = float(cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5)))
        self.scale = np.float32(self.D ** -0.5)
        self.layers = []
        ac = int(index.get("act_columns") or DEFAULT_ACT_COLUMNS)     # columns per activation scale (low-bit groups)
        for i, groups in enumerate(index["layers"]):
            p = f"layers.{i}"
            lay = {"attn_norm": (t[f"{p}.attn_norm.w"], t.get(f"{p}.attn_norm.b")),
                   "mlp_norm": (t[f"{p}.mlp_norm.w"], t.get(f"{p}.mlp_norm.b"))}
            for g, info in groups.items():
                arrs = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(f"{p}.{g}.") and not k.endswith(".bias")}
                lay[g] = Linear(info["format"], arrs, t.get(f"{p}.{g}.bias"), info["shape"], info.get("serial", False), ac,
                               info.get("portable", False))
            self.layers.append(lay)
        self.inter = self.layers[0]["down"].cols_in if self.layers else 0
        self.embed = t["embed"]
        if index.get("head") == "int8":
            self.lm_head = Linear("int8", {"wq": t["head_int8.wq"], "wscale": t["head_int8.wscale"]}, None,
                                  (t["head_int8.wscale"].shape[0], self.embed.shape[1]), act_columns=ac)
        elif index.get("head") == "q4":
            self.lm_head = Linear("q4", {"w4": t["head_q4.w4"], "ws": t["head_q4.ws"]}, None,
                                  (t["head_q4.w4"].shape[0], self.embed.shape[1]), act_columns=ac)
        else:
            self.lm_head = Linear("dense", {"w": t["embed"] if index["tied_lm_head"] else t["lm_head"]}, None,
                                  (t["embed"] if index["tied_lm_head"] else t["lm_head"]).shape)
        self.final_norm = (t["final_norm.w"], t.get("final_norm.b")) if "final_norm.w" in t else None
        self.pos_embed = t.get("positions")
        self.project_in = Linear("dense", {"w": t["project_in"]}, None, t["project_in"].shape) if "project_in" in t else None
        self.project_out = Linear("dense", {"w": t["project_out"]}, None, t["project_out"].shape) if "project_out" in t else None
        self.vocab = self.lm_head.rows
        self.max_positions = int(cfg.get("max_position_embeddings", 2048))
        if self.arch.rope:
            theta = rope_theta(cfg)
            inv = (1.0 / (np.float32(theta) ** (np.arange(0, self.D, 2, dtype=np.int64).astype(np.float32) / np.float32(self.D)))).astype(np.float32)
            freqs = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv[None, :]
            self.cos, self.sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
        else:
            self.cos = self.sin = np.zeros((1, 1), dtype=np.float32)
        self._bufs: dict[int, dict] = {}
        self._scratch: dict[tuple, np.ndarray] = {}
        self._new_rows: dict[int, list] = {}

    # ------------------------------------------------------------------ sizes
    def weight_bytes(self) -> dict:
        lin = sum(l[g].nbytes for l in self.layers for g in ("qkv", "o", "up", "down"))
        separate_head = not self.index["tied_lm_head"] or self.index.get("head") in ("int8", "q4")
        rest = int(self.embed.nbytes) + (self.lm_head.nbytes if separate_head else 0)
        rest += sum(int(a.nbytes) for l in self.layers for k in ("attn_norm", "mlp_norm") for a in l[k] if a is not None)
        if self.pos_embed is not None:
            rest += int(self.pos_embed.nbytes)
        rest += sum(int(a.nbytes) for a in (self.final_norm or ()) if a is not None)
        return {"decoder_linears": lin, "other": rest, "total": lin + rest,
                "decoder_linears_dense": self.index["bytes"]["decoder_linears_dense"],
                "by_value_type": self.bytes_by_value_type(), "load": self.load_mode}

    def bytes_by_value_type(self) -> dict[str, int]:
        """The engine's weight bytes per value type: fp32 (norms, the embedding table, fp32 groups), int8 (int8
        groups and an int8 lm_head, with their indices, masks and scales), int4 (int4 groups), q4 (a 4-bit lm_head)."""
        from .pack import value_type

        out: dict[str, int] = {}

        def add(kind, n):
            out[kind] = out.get(kind, 0) + int(n)

        for lay in self.layers:
            for g in ("qkv", "o", "up", "down"):
                add(value_type(lay[g].fmt), lay[g].nbytes)
            for k in ("attn_norm", "mlp_norm"):
                add("fp32", sum(int(a.nbytes) for a in lay[k] if a is not None))
        add("fp32", self.embed.nbytes)
        if self.index.get("head") in ("int8", "q4"):
            add(self.index["head"], self.lm_head.nbytes)
        elif not self.index["tied_lm_head"]:
            add("fp32", self.lm_head.nbytes)
        for extra in (self.pos_embed, *(self.final_norm or ())):
            if extra is not None:
                add("fp32", extra.nbytes)
        return out

    # ------------------------------------------------------------------ forward
    def _buffers(self, L: int) -> dict:
        b = self._bufs.get(L)
        if b is None:
            qkv_rows = self.layers[0]["qkv"].rows if self.layers else 0
            up_rows = self.layers[0]["up"].rows if self.layers else 0
            b = {"x": np.zeros((L, self.hidden), np.float32), "h": np.zeros((L, self.hidden), np.float32),
                 "qkv": np.zeros((L, qkv_rows), np.float32), "attn": np.zeros((L, self.H * self.D), np.float32),
                 "up": np.zeros((L, up_rows), np.float32), "act": np.zeros((L, self.inter), np.float32)}
            self._bufs[L] = b
        return b

    def _norm(self, X, wb, out):
        if self.arch.norm == "rms":
            K.rms_norm(X, wb[0], self.eps, out)
        else:
            K.layer_norm(X, wb[0], wb[1], self.eps, out)

    def embed_tokens(self, ids: np.ndarray, positions: np.ndarray, x: np.ndarray) -> None:
        e = self.embed[ids]
        if self.project_in is not None:
            self.project_in.mat(e, x, False)
        else:
            x[...] = e
        if self.pos_embed is not None:
            x += self.pos_embed[positions + self.arch.position_offset]

    def logits(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        if self.final_norm is not None:
            self._norm(x, self.final_norm, h)
        else:
            h[...] = x
        if self.project_out is not None:
            h2 = np.zeros((h.shape[0], self.project_out.rows), np.float32)
            self.project_out.mat(h, h2, False)
            h = h2
        out = np.empty((1, h.shape[0], self.vocab), np.float32)
        self.lm_head.mat(h, out[0], False)
        return out

    def forward(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """ids/positions [L] int64, mask [L, P+L], past[i] = (key, value) each [Hkv, P, D] -> logits, new rows."""
        L = ids.shape[0]
        b = self._buffers(L)
        x, h, qkv, attn, up, act = b["x"], b["h"], b["qkv"], b["attn"], b["up"], b["act"]
        self.embed_tokens(ids, positions, x)
        new = []
        H, Hkv, D = self.H, self.Hkv, self.D
        width = 2 * D + mask.shape[1]
        scratch = self._scratch.get((L, width))
        if scratch is None:
            scratch = self._scratch[(L, width)] = np.zeros((H * L, width), np.float32)
        kv_new = self._new_rows.get(L)
        if kv_new is None:     # the `present` rows; the decode loop copies them into its cache before the next call
            kv_new = self._new_rows[L] = [(np.zeros((Hkv, L, D), np.float32), np.zeros((Hkv, L, D), np.float32))
                                          for _ in self.layers]
        silu = self.arch.act == "silu_mul"
        for i, lay in enumerate(self.layers):
            self._norm(x, lay["attn_norm"], h)
            lay["qkv"].mat(h, qkv, False)
            nk, nv = kv_new[i]
            pk, pv = past[i]
            K.attention(qkv, H, Hkv, D, positions, self.cos, self.sin, self.arch.rope, self.scale, pk, pv, mask,
                        attn, nk, nv, scratch)
            lay["o"].mat(attn, x, True)
            self._norm(x, lay["mlp_norm"], h)
            if silu:
                lay["up"].mat(h, up, False)
                K.silu_mul(up, self.inter, act)
                lay["down"].mat(act, x, True)
            else:
                lay["up"].mat(h, act, False)
                K.relu_(act)
                lay["down"].mat(act, x, True)
            new.append((nk, nv))
        return self.logits(x, h), new

    # ------------------------------------------------------------------ batched steps
    def open_batch(self, max_batch: int, cache_len: int, max_rows: int) -> "BatchState":
        """The preallocated state of batched steps: a KV cache of `max_batch` sequence slots of `cache_len`
        positions each, and work buffers for up to `max_rows` rows per step (nothing is allocated per step
        but numpy views and the rows' embedding gather)."""
        for lay in self.layers:
            for g in ("qkv", "o", "up", "down"):
                lay[g].prepare_rows()
        return BatchState(self, max_batch, cache_len, max_rows)

    def forward_rows(self, st: "BatchState", ids: np.ndarray, slots: np.ndarray, positions: np.ndarray,
                     want: np.ndarray, prof: dict | None = None) -> np.ndarray:
        """One batched step: row r is token ids[r] of the sequence in cache slot slots[r] at positions[r]
        (decode rows: one per sequence; a prefill chunk: consecutive positions of one sequence). Every linear
        group runs once over all R rows ([R, in] products: each weight read once per step); attention runs
        per row over its own slot (causal within a chunk). Returns logits [len(want), V] of the rows `want`
        (a view into a buffer the next step overwrites). prof: a dict that receives seconds per part
        (norms, qkv, attention, o, up, act, down, head: where a step's time goes)."""
        R = ids.shape[0]
        if R > st.max_rows:
            raise UserError(f"{R} rows in one step exceed the batch's {st.max_rows}", "feed fewer prompt tokens per step")
        if R and int(positions.max()) >= st.S:
            raise UserError(f"position {int(positions.max())} is beyond the batch cache's {st.S}", "generate fewer tokens")
        x, h, qkv, attn = st.x[:R], st.h[:R], st.qkv[:R], st.attn[:R]
        up, act = st.up[:R], st.act[:R]
        clock = time.perf_counter
        t = clock() if prof is not None else 0.0

        def tick(part):
            nonlocal t
            now = clock()
            prof[part] = prof.get(part, 0.0) + now - t
            t = now

        self.embed_tokens(ids, positions, x)
        prof is not None and tick("embed")
        silu = self.arch.act == "silu_mul"
        for i, lay in enumerate(self.layers):
            self._norm(x, lay["attn_norm"], h)
            prof is not None and tick("norms")
            lay["qkv"].mat_rows(h, qkv, False)
            prof is not None and tick("qkv")
            K.attention_rows(qkv, self.H, self.Hkv, self.D, slots, positions, self.cos, self.sin, self.arch.rope,
                             self.scale, st.k[i], st.v[i], attn, st.qbuf, st.scores, st.obuf)
            prof is not None and tick("attention")
            lay["o"].mat_rows(attn, x, True)
            prof is not None and tick("o")
            self._norm(x, lay["mlp_norm"], h)
            prof is not None and tick("norms")
            if silu:
                lay["up"].mat_rows(h, up, False)
                prof is not None and tick("up")
                K.silu_mul(up, self.inter, act)
            else:
                lay["up"].mat_rows(h, act, False)
                prof is not None and tick("up")
                K.relu_(act)
            prof is not None and tick("act")
            lay["down"].mat_rows(act, x, True)
            prof is not None and tick("down")
        n = want.shape[0]
        xs, hs = st.xs[:n], st.hs[:n]
        np.take(x, want, axis=0, out=xs)
        if self.final_norm is not None:
            self._norm(xs, self.final_norm, hs)
        else:
            hs[...] = xs
        if self.project_out is not None:
            h2 = np.zeros((n, self.project_out.rows), np.float32)
            self.project_out.mat(hs, h2, False)
            hs = h2
        out = st.logits[:n]
        self.lm_head.mat_rows(hs, out, False)
        prof is not None and tick("head")
        return out


class BatchState:
    """What NativeModel.forward_rows works in: per layer a key and a value cache [max_batch, Hkv, S, D]
    (a sequence in slot b keeps position p at [b, :, p]) and the step's row buffers, allocated once."""

    def __init__(self, m: NativeModel, max_batch: int, cache_len: int, max_rows: int):
        if max_batch < 1 or cache_len < 2 or max_rows < 1:
            raise UserError(f"a batch of {max_batch} sequences x {cache_len} positions, {max_rows} rows per step",
                            "use max_batch >= 1, cache_len >= 2")
        self.B, self.S, self.max_rows = int(max_batch), min(int(cache_len), m.max_positions), int(max_rows)
        shape = (self.B, m.Hkv, self.S, m.D)
        self.k = [np.zeros(shape, np.float32) for _ in m.layers]
        self.v = [np.zeros(shape, np.float32) for _ in m.layers]
        R = self.max_rows
        qkv_rows = m.layers[0]["qkv"].rows if m.layers else 0
        up_rows = m.layers[0]["up"].rows if m.layers else 0
        self.x, self.h = np.zeros((R, m.hidden), np.float32), np.zeros((R, m.hidden), np.float32)
        self.xs, self.hs = np.zeros((R, m.hidden), np.float32), np.zeros((R, m.hidden), np.float32)
        self.qkv, self.attn = np.zeros((R, qkv_rows), np.float32), np.zeros((R, m.H * m.D), np.float32)
        self.up, self.act = np.zeros((R, up_rows), np.float32), np.zeros((R, m.inter), np.float32)
        nq = R * (m.H // max(m.Hkv, 1))                  # attention_rows' queries per kv head
        self.qbuf, self.obuf = np.zeros((m.Hkv, nq, m.D), np.float32), np.zeros((m.Hkv, nq, m.D), np.float32)
        self.scores = np.zeros((m.Hkv, nq, self.S), np.float32)
        self.logits = np.zeros((R, m.vocab), np.float32)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v) + sum(
            int(getattr(self, n).nbytes) for n in ("x", "h", "xs", "hs", "qkv", "attn", "up", "act", "qbuf", "scores",
                                                    "obuf", "logits"))
