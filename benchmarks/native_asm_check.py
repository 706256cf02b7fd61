"""Did numba vectorise the sparse products? Compile the native kernels afresh (no disk cache) and count the
SIMD instructions in their machine code: packed gathers and packed FMAs/adds on ymm/zmm registers mean the
inner gather-multiply-add loop runs in vector lanes; scalar-only code would show neither.

    .venv/bin/python benchmarks/native_asm_check.py   (prints a small table; also written to results/native_asm_check.md)
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-asm-")   # force a fresh compile: cached code can't be inspected
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def main() -> None:
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native.pack import compress

    rng = np.random.default_rng(0)
    e = np.zeros(0, np.float32)
    rows = []
    for name, W in (("csr_gemv", None), ("ell_gemv", None), ("dense_gemv", None)):
        W = rng.standard_normal((64, 300)).astype(np.float32)
        if name == "csr_gemv":
            W[rng.random(W.shape) < 0.9] = 0
            W[0, :] = 1                                     # uneven rows -> CSR
            fmt, a = compress(W, 0.0)
            args = (a["rowptr"], a["cols"], a["vals"])
        elif name == "ell_gemv":
            W[:, 30:] = 0
            fmt, a = compress(W, 0.0)
            args = (a["cols"], a["vals"])
        else:
            args = (W,)
        fn = getattr(K, name)
        fn(*args, np.ones(300, np.float32), e, np.zeros(64, np.float32), False)
        asm = "\n".join(fn.inspect_asm().values())
        ins = Counter(m.group(1) for m in re.finditer(r"^\s*(v[a-z0-9]+)\s+[^\n]*%(?:zmm|ymm)", asm, re.M))
        gathers = sum(v for k, v in ins.items() if "gather" in k)
        fma = sum(v for k, v in ins.items() if "fmadd" in k or k.startswith("vaddps") or k.startswith("vmulps"))
        width = "zmm (512-bit)" if "%zmm" in asm else ("ymm (256-bit)" if "%ymm" in asm else "none")
        rows.append((name, gathers, fma, width))
    lines = ["# Native kernels: is the inner loop vectorised?", "",
             "Fresh numba compile on this CPU; counts of packed instructions on ymm/zmm registers in each kernel.", "",
             "| kernel | packed gathers | packed FMA/add/mul | widest vector registers |", "|---|---:|---:|---|"]
    lines += [f"| {n} | {g} | {f} | {w} |" for n, g, f, w in rows]
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "native_asm_check.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
