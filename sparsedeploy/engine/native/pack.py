"""Build the native engine's weights: DEPLOYMENT/native/{weights.safetensors, shared.safetensors, native.json}.

One packer, two kinds of input (`write_native`): a source with has(name) / get(name) -> float32 array, read one
decoder layer at a time — the pruned model's tensors in memory (`build`, DictSource) or a model folder's
safetensors streamed from disk by a caller's reader with the same two methods (a full-depth 7B model never sits
in memory) —
and its config. Arrays are written as they are made (ArrayWriter: a safetensors file built from spools, every
array at a multiple of its item size), so a build holds the shared tensors while they are written, then about
one decoder layer; NativeModel can memory-map the files (`map_arrays`) instead of copying them. Each
decoder layer's linears are grouped (q|k|v stacked, gate|up stacked, o, down) and each group is stored as
    dense    [out, in] float32,
    ELL      cols/vals [out, k]                        when every row keeps the same count k (Wanda, N:M),
    CSR      rowptr [out+1] int64, cols [nnz], vals [nnz],
    bitmask  rowptr [out+1] int64, masks uint16 [out * ceil(in/16)], vals [nnz]  (one bit per weight),
with uint16 column indices when the input width fits in 16 bits, else uint32. Bytes per weight at kept
fraction d: dense 4, ELL/CSR 6d, bitmask 4d + 1/8.
With `weights="int8"` (per-row round-to-nearest int8, scale max|row| / 127; lowbit.py) the groups are stored
as int8 (dense, 1 byte), int8_bitmask (d + 1/8), int8_ell / int8_csr (3d), int8_perm (about 2.6-2.9d for very
sparse groups, tried from PERM_MIN_SPARSITY on: byte indices within 64-column blocks), plus 4 bytes of scale
per row;
the int8 dense, bitmask and perm products quantise their input vector to int8, one scale per 256 columns (VNNI dot
products).
With `weights="int4"` every group is int4_bitmask (int4.py): 4-bit codes of the kept weights on the GPTQ stage's
grid (per row and group of INT4_GROUP columns, or `--int4-group`, a float32 scale and zero point, or with
`--int4-scales fp16` float16 ones) over a keep bitmask, about d/2 + 1/8 + 8/group (fp16: 4/group) bytes a weight; the codes are the GPTQ checkpoint's own when the deployment comes from a
4-bit quantised RUN (`codes`, bit-exact with its fake-quant weights), else round-to-nearest at build time.
Which one is fastest depends on the CPU (its bandwidth,
gathers, AVX-512), the shape and the sparsity, so by default each group's format is *measured*: tune.py
times every candidate on the group's real matrix in decode order on this CPU with the engine's thread
count, and the index records the times and the choice. `--crossover C` replaces that with a fixed rule
(dense below sparsity C, ELL/CSR above), as before.
Norms, embeddings, positions and lm_head stay dense, in shared.safetensors: a sweep's deployments hold the
same ones, so a build given `share_with` (another native folder) hard-links that file when its content key
matches instead of writing another copy (1 GB per deployment at LLaMA-7B shapes). native.json records the
format of every group and each linear's zero count, which the caller checks against the export's counts.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from ...errors import UserError, check
from ...arch import native_arch

FORMAT_VERSION = 4
NATIVE_DIR = "native"
WEIGHTS = "weights.safetensors"          # the decoder layers
SHARED = "shared.safetensors"            # embedding, lm_head, final norm, positions: dense, the same at every sparsity
INDEX = "native.json"
DEFAULT_CROSSOVER = 0.55


def index_dtype(in_features: int):
    return np.uint16 if in_features <= 65536 else np.uint32


def sparse_format(W: np.ndarray) -> str:
    """ELL when every row keeps the same count (per-row pruners: Wanda, N:M), else CSR."""
    counts = (W != 0).sum(axis=1)
    return "ell" if W.shape[0] and (counts == counts[0]).all() else "csr"


VALUE_TYPES = ("fp32", "int8", "int4")
INT8_FORMATS = ("int8", "int8_ell", "int8_csr", "int8_bitmask", "int8_perm")
INT4_FORMATS = ("int4_bitmask",)
INT4_GROUP = 128                          # columns per scale/zero of a round-to-nearest int4 build (default)
INT4_SCALES = ("fp32", "fp16")            # storage of an int4 build's scales and zero points (int4.SCALE_TYPES)
DEFAULT_INT4 = (INT4_GROUP, "fp32")
HEADS = ("int8", "q4")
PERM_MIN_SPARSITY = 0.75                  # int8_perm is a tuner candidate for groups at least this sparse
PERM_MAX_WIDTH = 65536 * 64               # (a vector stores its first block in 16 bits)                    # a low-bit build's lm_head: int8 per row (default) or Q4_0-like


def value_type(fmt: str) -> str:
    return "int8" if fmt in INT8_FORMATS else "int4" if fmt in INT4_FORMATS else "fp32"


def check_weights(weights: str) -> str:
    check(weights in VALUE_TYPES, f"--weights {weights!r} is not a value type of the native engine",
          f"use one of: {', '.join(VALUE_TYPES)}")
    return weights


def check_head(head: str | None, weights: str) -> str:
    """The lm_head's storage: fp32 for an fp32 build; int8 (default) or q4 for a low-bit one."""
    if head is None or (head == "fp32" and weights == "fp32"):
        return "fp32" if weights == "fp32" else "int8"
    check(head in HEADS, f"--head {head!r} is not an lm_head type of the native engine", f"use one of: {', '.join(HEADS)}")
    check(weights != "fp32", f"--head {head} is for low-bit builds", "add --weights int8 or --weights int4")
    return head


def check_act_columns(act_columns: int | None, weights: str) -> int:
    """Columns per activation scale of a low-bit build's int8 products: 256 (default) or 64 (lowbit.py)."""
    from .lowbit import ACT_COLUMNS, DEFAULT_ACT_COLUMNS

    if act_columns is None:
        return DEFAULT_ACT_COLUMNS
    check(int(act_columns) in ACT_COLUMNS, f"--act-columns {act_columns} is not an activation scale width of the "
          "native engine", f"use one of: {', '.join(map(str, ACT_COLUMNS))}")
    check(weights != "fp32" or int(act_columns) == DEFAULT_ACT_COLUMNS, f"--act-columns {act_columns} is for low-bit builds",
          "add --weights int8 or --weights int4")
    return int(act_columns)


def check_int4(group: int | None, scales: str | None, weights: str) -> tuple[int, str]:
    """An int4 build's storage: (columns per scale / zero point of its round-to-nearest groups, 128 by default,
    a multiple of 64 or -1 = one per row; "fp32" (default) or "fp16" scales and zero points). The default storage
    is what every build has (a value type without int4 groups ignores it); any other needs --weights int4."""
    g = INT4_GROUP if group is None else int(group)
    sc = "fp32" if scales is None else str(scales)
    if (g, sc) == DEFAULT_INT4:
        return DEFAULT_INT4
    check(weights == "int4", "--int4-group / --int4-scales are for int4 builds", "add --weights int4")
    check(g == -1 or (g > 0 and g % 64 == 0), f"--int4-group {group} is not a positive multiple of 64 (or -1)",
          "use 64, 128, 256 (or -1: one scale per row): an int4 group is whole 64-column blocks")
    check(sc in INT4_SCALES, f"--int4-scales {scales!r} is not a storage of the int4 scales",
          f"use one of: {', '.join(INT4_SCALES)}")
    return g, sc


def encode(W: np.ndarray, fmt: str, int4: tuple[int, str] = DEFAULT_INT4) -> dict[str, np.ndarray]:
    """One matrix in one stored format (see the module doc); int4 groups round-to-nearest with the storage
    `int4` (group, scales)."""
    if fmt in INT4_FORMATS:
        from .int4 import encode_int4_bitmask_from_weights

        return encode_int4_bitmask_from_weights(W, int4[0], scales=int4[1])
    if fmt in INT8_FORMATS:
        from . import lowbit as LB

        return {"int8": LB.encode_int8, "int8_ell": LB.encode_int8_ell, "int8_csr": LB.encode_int8_csr,
                "int8_bitmask": LB.encode_int8_bitmask, "int8_perm": LB.encode_int8_perm}[fmt](W)
    W = np.ascontiguousarray(W, dtype=np.float32)
    out_f, in_f = W.shape
    if fmt == "dense":
        return {"w": W}
    nz = W != 0
    counts = nz.sum(axis=1)
    rowptr = np.zeros(out_f + 1, dtype=np.int64)
    np.cumsum(counts, out=rowptr[1:])
    vals = W[nz]                                       # row-major order: each row's columns ascending
    if fmt == "bitmask":
        nblk = -(-in_f // 16)
        bits = np.zeros((out_f, nblk * 16), dtype=bool)
        bits[:, :in_f] = nz
        weights = (1 << np.arange(16, dtype=np.uint32)).astype(np.uint32)
        masks = (bits.reshape(out_f, nblk, 16) * weights).sum(axis=2, dtype=np.uint32).astype(np.uint16)
        return {"rowptr": rowptr, "masks": masks.reshape(-1), "vals": vals}
    idt = index_dtype(in_f)
    cols = np.nonzero(nz)[1].astype(idt)
    if fmt == "ell":
        k = int(counts[0]) if out_f else 0
        if not (counts == k).all():
            raise ValueError("ELL needs the same count in every row")
        return {"cols": cols.reshape(out_f, k), "vals": vals.reshape(out_f, k)}
    if fmt == "csr":
        return {"rowptr": rowptr, "cols": cols, "vals": vals}
    raise ValueError(f"unknown format {fmt!r}")


def fixed_format(W: np.ndarray, crossover: float, weights: str = "fp32") -> str:
    """The fixed rule (`--crossover`): dense below the crossover sparsity, else ELL or CSR (of that value type)."""
    sparsity = 1.0 - np.count_nonzero(W) / max(W.size, 1)
    fmt = "dense" if sparsity < crossover else sparse_format(W)
    if weights == "int4":
        return "int4_bitmask"
    return fmt if weights == "fp32" else ("int8" if fmt == "dense" else f"int8_{fmt}")


def compress(W: np.ndarray, crossover: float, weights: str = "fp32") -> tuple[str, dict[str, np.ndarray]]:
    W = np.ascontiguousarray(W, dtype=np.float32)
    fmt = fixed_format(W, crossover, weights)
    return fmt, encode(W, fmt)


def candidates(W: np.ndarray, weights: str = "fp32") -> list[str]:
    """The formats the compile-time tuner times for one matrix (those of its value type)."""
    if weights == "int8":
        c = ["int8", "int8_" + sparse_format(W), "int8_bitmask"]
        if 64 < W.shape[1] <= PERM_MAX_WIDTH and 1.0 - np.count_nonzero(W) / max(W.size, 1) >= PERM_MIN_SPARSITY:
            c.append("int8_perm")
        return c
    if weights == "int4":
        return list(INT4_FORMATS)
    return ["dense", sparse_format(W), "bitmask"]


class DictSource:
    """A model's tensors held in memory (name -> array), read as the packer reads any source: one float32
    matrix at a time. A streamed source (a model folder's reader) has the same two methods and reads the files."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise UserError(f"the model's weights have no tensor '{name}'", "re-export from the pruned RUN or model folder")
        return np.asarray(self.tensors[name], dtype=np.float32)


_ST_DTYPES = {np.dtype(t): c for t, c in ((np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (np.int64, "I64"),
                                         (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"), (np.uint64, "U64"),
                                         (np.uint32, "U32"), (np.uint16, "U16"), (np.uint8, "U8"), (np.bool_, "BOOL"))}
_ST_NUMPY = {c: t for t, c in _ST_DTYPES.items()}
_ITEM_SIZES = (8, 4, 2, 1)


class ArrayWriter:
    """A safetensors file written array by array, holding none of them: each array's bytes go to a spool file of
    its item size as it is added; close() writes the header (padded so the data starts at a multiple of 64
    bytes), then the spools, 8-byte items first, so every array starts at a multiple of its item size (the
    memory-mapped loader, `map_arrays`, hands the kernels aligned views). Any safetensors reader reads it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[int, list] = {s: [] for s in _ITEM_SIZES}
        self.ends = {s: 0 for s in _ITEM_SIZES}
        self.spools: dict[int, object] = {}
        self.nbytes: dict[str, int] = {}

    def _spool(self, size: int) -> Path:
        return self.path.with_name(f".{self.path.name}.spool{size}")

    def add(self, name: str, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _ST_DTYPES.get(np.dtype(a.dtype.str.replace(">", "<")))
        if code is None or name in self.nbytes:
            raise ValueError(f"cannot store {name!r} ({a.dtype}{', twice' if code else ''})")
        size = a.dtype.itemsize
        if size not in self.spools:
            self.spools[size] = open(self._spool(size), "wb")
        if a.size:
            self.spools[size].write(memoryview(a.reshape(-1)).cast("B"))
        start = self.ends[size]
        self.ends[size] += a.nbytes
        self.entries[size].append((name, code, list(a.shape), start, self.ends[size]))
        self.nbytes[name] = int(a.nbytes)

    def close(self) -> dict[str, int]:
        header, base = {}, 0
        for s in _ITEM_SIZES:
            for name, code, shape, a, b in self.entries[s]:
                header[name] = {"dtype": code, "shape": shape, "data_offsets": [base + a, base + b]}
            base += self.ends[s]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((-(8 + len(text))) % 64)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for s in _ITEM_SIZES:
                f = self.spools.pop(s, None)
                if f is None:
                    continue
                f.close()
                with open(self._spool(s), "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
                self._spool(s).unlink()
        return self.nbytes

    def abort(self) -> None:
        for s, f in list(self.spools.items()):
            f.close()
            self._spool(s).unlink(missing_ok=True)
        self.spools.clear()


def map_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a safetensors file as a view of one private memory map of it (copy-on-write: nothing is
    read until used, nothing copied at start-up; the kernels get ordinary writable arrays). Arrays that do not
    start at a multiple of their item size (files written by other writers) are copied."""
    import mmap

    path = Path(path)
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError):
            raise UserError(f"{path} is not a safetensors file", "rebuild it: sparsedeploy compile --engine native --force") from None
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dt = np.dtype(_ST_NUMPY[e["dtype"]])
        a, b = e["data_offsets"]
        shape = tuple(e["shape"])
        if b == a:
            out[name] = np.zeros(shape, dt)
            continue
        arr = np.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize, offset=8 + n + a).reshape(shape)
        out[name] = arr if (8 + n + a) % dt.itemsize == 0 else arr.copy()
    return out


def _content_key(arrays: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _encode_rows(enc, W: np.ndarray, rows: int = 4096) -> dict[str, np.ndarray]:
    """A per-row encoder (every output's first axis is the row: encode_int8, encode_q4) over blocks of rows: the same
    arrays, with temporaries the size of a block (a 49152 x 4096 lm_head's whole-matrix temporaries: gigabytes)."""
    if W.shape[0] <= rows:
        return enc(W)
    parts = [enc(W[i:i + rows]) for i in range(0, W.shape[0], rows)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def stack_layer(source, arch, i: int) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Decoder layer i's groups: {group: (stacked float32 matrix, [its linears' matrices])}."""
    src = f"{arch.layers}.{i}."
    layer = {}
    for g, names in arch.stacks().items():
        mats = [source.get(src + n + ".weight") for n in names]
        layer[g] = (np.concatenate(mats, axis=0) if len(mats) > 1 else mats[0], mats)
    return layer


def build(tensors: dict[str, np.ndarray], config: dict, out_dir: str | Path, *, key: dict,
          crossover: float | None = None, threads: int | None = None, formats: tuple[str, ...] | None = None,
          share_with: str | Path | None = None, weights: str = "fp32", codes=None, head: str | None = None,
          act_columns: int | None = None, int4: tuple[int, str] | None = None) -> dict:
    """Compress the in-memory `tensors` into out_dir: `write_native` over them, with the formats (crossover None)
    measured over all layers together in decode order (tune.choose_formats), as a decode step meets them.
    See write_native for the arguments."""
    check(crossover is None or 0.0 <= crossover <= 1.0, f"--crossover {crossover} is outside [0, 1]",
          "use e.g. 0.55, or omit it to choose each group's format by measurement")
    check_weights(weights)
    int4 = check_int4(*(int4 or (None, None)), weights)
    source = DictSource(tensors)
    plan = None
    if crossover is None:
        from .tune import choose_formats

        arch = native_arch(config)
        stacked = [{g: W for g, (W, _) in stack_layer(source, arch, i).items()}
                   for i in range(int(config["num_hidden_layers"]))]
        plan = choose_formats(stacked, threads=threads, formats=formats, weights=weights, int4=int4)
        del stacked
    return write_native(source, config, out_dir, key=key, crossover=crossover, threads=threads, formats=formats,
                        share_with=share_with, weights=weights, codes=codes, head=head, plan=plan,
                        act_columns=act_columns, int4=int4)


def write_native(source, config: dict, out_dir: str | Path, *, key: dict, crossover: float | None = None,
                 threads: int | None = None, formats: tuple[str, ...] | None = None,
                 share_with: str | Path | None = None, weights: str = "fp32", codes=None, head: str | None = None,
                 plan: tuple[list, dict] | None = None, on_layer=None, act_columns: int | None = None,
                 int4: tuple[int, str] | None = None) -> dict:
    """Compress a model into out_dir, reading it from `source` (has(name), get(name) -> float32 array: DictSource,
    or a streamed reader of a model folder) one decoder layer at a time and writing each layer's arrays as they
    are made (ArrayWriter): residents are the shared tensors while they are written, then one layer. Written to a
    temp folder, then renamed into place. Returns the index.
    crossover None: each group's format is the fastest on this CPU, measured on its real shape (tune.py): `plan`
    (choice, tuning record) measured beforehand over all layers (build), else measured layer by layer as the
    layers come; a number: the fixed rule of `compress`. threads: the thread count the tuner times with;
    formats: restrict the tuner's candidates (tune.choose_formats). Layer by layer, a layer whose groups have
    the shapes and (to 0.01) the sparsities of a layer already timed takes that layer's choice
    ("measured_on_layer" in the index): a uniformly pruned 32-layer model is timed once, not 32 times.
    share_with: a native folder whose shared.safetensors is hard-linked when its content is the same.
    weights: the decoder groups' value type, "fp32" or "int8" (per-row round-to-nearest at build time); with
    int8 (or int4) the lm_head is int8 per row (index["head"]); norms and the embedding stay fp32.
    codes: for int4, a GPTQ checkpoint's reader, codes(linear name) -> (codes, scale, zero, keep, group_size)
    or None (that linear: round-to-nearest); its groups are then built from those codes (no re-quantisation).
    head: a low-bit build's lm_head, "int8" (per row, the default) or "q4" (Q4_0-like: 4-bit, a float16 scale
    per 32 columns, 0.5625 bytes a weight; lowbit.q4_gemv). act_columns: a low-bit build's activation scale width,
    256 (default) or 64 (index["act_columns"]; the formats are timed with 256). on_layer(i): called after layer
    i is written. int4: an int4 build's (group, scales) storage (check_int4; default (128, "fp32")): the group of
    its round-to-nearest groups (a GPTQ checkpoint's codes keep their own) and its scales' and zeros' storage."""
    check(crossover is None or 0.0 <= crossover <= 1.0, f"--crossover {crossover} is outside [0, 1]",
          "use e.g. 0.55, or omit it to choose each group's format by measurement")
    check_weights(weights)
    head = check_head(head, weights)
    act_columns = check_act_columns(act_columns, weights)
    int4 = check_int4(*(int4 or (None, None)), weights)
    check(codes is None or int4[1] == "fp32", "--int4-scales fp16 would round a GPTQ checkpoint's float32 scales "
          "(its codes would no longer give its weights)", "drop --int4-scales for a quantized RUN")
    arch = native_arch(config)
    n_layers = int(config["num_hidden_layers"])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    writer = None
    try:
        # the shared tensors (embedding, lm_head, final norm, positions): dense, the same at every sparsity
        shared: dict[str, np.ndarray] = {}

        def norm_into(d, prefix, name):
            d[f"{prefix}.w"] = source.get(f"{name}.weight")
            if arch.norm == "layer":
                d[f"{prefix}.b"] = source.get(f"{name}.bias")

        shared["embed"] = source.get(f"{arch.embed}.weight")
        tied = not source.has(f"{arch.lm_head}.weight") or bool(config.get("tie_word_embeddings", False))
        if head in HEADS:   # a low-bit deployment's lm_head: int8 per row or 4-bit (the embedding lookup stays fp32)
            from .lowbit import encode_int8, encode_q4

            enc = encode_int8 if head == "int8" else encode_q4
            W = shared["embed"] if tied else source.get(f"{arch.lm_head}.weight")
            for k, a in _encode_rows(enc, W).items():
                shared[f"head_{head}.{k}"] = a
            del W
        elif not tied:
            shared["lm_head"] = source.get(f"{arch.lm_head}.weight")
        if source.has(f"{arch.final_norm}.weight"):
            norm_into(shared, "final_norm", arch.final_norm)
        if arch.positions:
            shared["positions"] = source.get(f"{arch.positions}.weight")
        for opt_name, dst in ((arch.project_in, "project_in"), (arch.project_out, "project_out")):
            if opt_name and source.has(f"{opt_name}.weight"):
                shared[dst] = source.get(f"{opt_name}.weight")
        shared = {k: np.ascontiguousarray(a) for k, a in shared.items()}
        shared_key = _content_key(shared)
        nbytes = {k: int(a.nbytes) for k, a in shared.items()}
        other = read_index(share_with) if share_with is not None else None
        linked = False
        if other is not None and other.get("shared_key") == shared_key and (Path(share_with) / SHARED).is_file():
            try:
                os.link(Path(share_with) / SHARED, tmp / SHARED)
                linked = True
            except OSError:               # another file system, or links not allowed: write a copy
                pass
        if not linked:
            sw = ArrayWriter(tmp / SHARED)
            for k in list(shared):
                sw.add(k, shared.pop(k))
            sw.close()
        del shared

        # the decoder layers, one at a time
        writer = ArrayWriter(tmp / WEIGHTS)
        groups_index, zeros, int4_sources = [], {}, set()
        measured: dict[tuple, tuple] = {}     # streamed tuning: (group, shape, sparsity to 0.01) of each layer -> choice
        tuning = plan[1] if plan is not None else None
        for i in range(n_layers):
            src = f"{arch.layers}.{i}."
            dst = f"layers.{i}"
            norms: dict[str, np.ndarray] = {}
            norm_into(norms, f"{dst}.attn_norm", src + arch.attn_norm)
            norm_into(norms, f"{dst}.mlp_norm", src + arch.mlp_norm)
            for k, a in norms.items():
                writer.add(k, a)
            stacked = stack_layer(source, arch, i)
            for g, names in arch.stacks().items():
                for n, m in zip(names, stacked[g][1]):
                    zeros[src + n] = [int(m.size - np.count_nonzero(m)), int(m.size)]
            ms, measured_on = None, i
            kind = tuple((g, W.shape, round(1 - np.count_nonzero(W) / max(W.size, 1), 2)) for g, (W, _) in stacked.items())
            if plan is not None:
                choice, ms = plan[0][i], plan[1]["ms"][i]
            elif crossover is None and kind in measured:      # a layer like one already timed: its choice
                choice, ms, measured_on = measured[kind]
            elif crossover is None:
                from .tune import choose_formats

                c, rec = choose_formats([{g: W for g, (W, _) in stacked.items()}], threads=threads, formats=formats,
                                        weights=weights, int4=int4)
                choice, ms = c[0], rec["ms"][0]
                measured[kind] = (choice, ms, i)
                if tuning is None:
                    tuning = dict(rec, per_layer=True)
                else:
                    tuning["formats"] = sorted(set(tuning["formats"]) | set(rec["formats"]))
                    if rec.get("other_load") is not None:
                        tuning["other_load"] = max(tuning.get("other_load") or 0.0, rec["other_load"])
                    if rec.get("fallback"):              # one layer kind chosen by bytes: say so for the whole build
                        tuning["fallback"] = rec["fallback"]
            else:
                choice = {g: fixed_format(W, crossover, weights) for g, (W, _) in stacked.items()}
            layer_groups = {}
            for g, names in arch.stacks().items():
                W, mats = stacked[g]
                fmt, _, build = choice[g].partition("/")
                parts = [codes(src + n) for n in names] if fmt in INT4_FORMATS and codes is not None else []
                from_codes = bool(parts) and all(x is not None for x in parts)      # read once per linear
                arrs = _int4_from_codes(parts) if from_codes else encode(W, fmt, int4)
                if from_codes:
                    int4_sources.add("gptq")
                elif fmt in INT4_FORMATS:
                    int4_sources.add("rtn")
                for k, a in arrs.items():
                    writer.add(f"{dst}.{g}.{k}", a)
                del arrs
                bnames = [src + n + ".bias" for n in names]
                if any(source.has(b) for b in bnames):
                    writer.add(f"{dst}.{g}.bias", np.concatenate([
                        source.get(b) if source.has(b) else np.zeros(m.shape[0], np.float32)
                        for b, m in zip(bnames, mats)]))
                nnz = int(np.count_nonzero(W))
                layer_groups[g] = {"format": fmt, "serial": build == "serial", "shape": list(W.shape), "nnz": nnz,
                                   "sparsity": round(1 - nnz / W.size, 6), "linears": list(names),
                                   "rows": [int(m.shape[0]) for m in mats]}
                if build == "portable":
                    layer_groups[g]["portable"] = True
                if fmt in INT4_FORMATS:
                    layer_groups[g]["codes"] = "gptq" if from_codes else "rtn"
                if ms is not None:
                    layer_groups[g]["measured_ms"] = ms[g]
                    if measured_on != i:
                        layer_groups[g]["measured_on_layer"] = measured_on
            groups_index.append(layer_groups)
            del stacked
            if on_layer is not None:
                on_layer(i)
        nbytes.update(writer.close())
        writer = None

        dense_bytes = sum(4 * int(np.prod(v["shape"])) for lg in groups_index for v in lg.values())
        stored_linear = sum(b for k, b in nbytes.items() if k.startswith("layers.") and k.split(".")[2] in ("qkv", "o", "up", "down"))
        index = {"format_version": FORMAT_VERSION, "key": key, "arch": arch.name, "crossover": crossover,
                 "weights": weights, "quantization": _quantization(weights, int4_sources, head, act_columns, int4),
                 "act_columns": act_columns,
                 **({"int4": {"group_size": int4[0], "scales": int4[1]}} if weights == "int4" else {}),
                 "tuning": None if tuning is None else {k: v for k, v in tuning.items() if k != "ms"},
                 "config": config, "layers": groups_index, "tied_lm_head": tied, "head": head, "zeros": zeros,
                 "bytes": {"total": sum(nbytes.values()), "decoder_linears": stored_linear,
                           "decoder_linears_dense": dense_bytes}, "shared_key": shared_key,
                 "shared_linked_from": str(share_with) if linked else None}
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _int4_from_codes(parts: list[tuple]) -> dict[str, np.ndarray]:
    """One stacked int4_bitmask group from the GPTQ codes of its linears (rows concatenated), scales and zeros
    float32 as the checkpoint holds them (write_native refuses float16 storage for them)."""
    from .int4 import encode_int4_bitmask

    gs = {int(p[4]) for p in parts}
    check(len(gs) == 1, "the stacked linears of one group were quantised with different group sizes",
          "re-quantize the RUN with one --group-size")
    return encode_int4_bitmask(*(np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in range(4)), gs.pop())


def _quantization(weights: str, int4_sources: set[str], head: str = "int8", act_columns: int = 256,
                  int4: tuple[int, str] = DEFAULT_INT4) -> str | None:
    if weights == "fp32":
        return None
    act = f"activations int8 per {act_columns} columns in the int8 dense/bitmask/perm and int4 products"
    if weights == "int8":
        return f"int8 per output row, round-to-nearest at compile time (scale max|row| / 127); {act}; {_HEAD[head]}"
    group = "one group per row" if int4[0] == -1 else f"groups of {int4[0]}"
    fp16 = int4[1] == "fp16"
    how = {"gptq": "the GPTQ checkpoint's codes (no re-quantisation)",
           "rtn": f"round-to-nearest at compile time (asymmetric, {group}" + (", scale and zero rounded to float16 "
                                                                               "before the codes)" if fp16 else ")")}
    return (f"int4 codes on the GPTQ grid over a keep bitmask: {' and '.join(how[s] for s in sorted(int4_sources))}; "
            f"scales and zero points stored as {'float16' if fp16 else 'float32'}; {act}; {_HEAD[head]}")


_HEAD = {"int8": "lm_head int8 per row", "q4": "lm_head 4-bit (Q4_0-like: float16 scale per 32 columns)"}


def read_index(native_dir: str | Path) -> dict | None:
    p = Path(native_dir) / INDEX
    if not p.is_file() or not (Path(native_dir) / WEIGHTS).is_file() or not (Path(native_dir) / SHARED).is_file():
        return None
    try:
        index = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return index if index.get("format_version") == FORMAT_VERSION else None


def load_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face safetensors folder, as numpy (no torch)."""
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    check(bool(files), f"no safetensors weights in {folder}", "point at a pruned RUN or a model folder saved with safetensors")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
