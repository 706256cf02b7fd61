"""Did the sparse products' inner loops vectorise, and how wide? Compile the native kernels afresh (no disk
cache), find every loop in their machine code (a label and a backward branch to it), and report the hot loop
of each kernel — the innermost loop that multiplies (FMA) — with its instructions: packed gathers / expands /
FMAs and the register width they use. Counting registers anywhere in a function proves little (the prologue
and the remainder loops use them too); the instructions inside the loop that runs per weight are the evidence.

    .venv/bin/python benchmarks/native_asm_check.py   (prints; also writes results/native_asm_check.md)
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-asm-")   # force a fresh compile: cached code can't be inspected
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HOT = re.compile(r"^\s*(vfmadd\w+|vfmadd|vgather\w+|vpgather\w+|vexpandps|vfmadd231ss|vfmadd213ss|vfmadd132ss)\b")


def loops(asm: str) -> list[list[str]]:
    """Bodies of the loops in `asm`: from a label to the last backward conditional/unconditional jump to it."""
    lines = [l for l in asm.splitlines() if l.strip() and not l.strip().startswith((".cfi", ".p2align", "#", ".loc"))]
    where = {}
    for i, l in enumerate(lines):
        m = re.match(r"^(\.?L\w+):", l.strip())
        if m:
            where[m.group(1)] = i
    out = []
    for j, l in enumerate(lines):
        m = re.match(r"^\s*j\w+\s+(\.?L\w+)\s*$", l)
        if m and m.group(1) in where and where[m.group(1)] < j:
            out.append(lines[where[m.group(1)]:j + 1])
    return out


def _rank(body: list[str]) -> tuple:
    fma = [l for l in body if re.match(r"^\s*vfmadd", l)]
    width = max((512 if "%zmm" in l else 256 if "%ymm" in l else 128 if l.split()[0].endswith("ps") else 32)
                for l in fma)
    return (width, -len(body))


def hot_loop(asm: str) -> tuple[list[str] | None, int]:
    """The main per-weight loop: of the loops holding an FMA, the one with the widest packed FMA (the smallest
    such loop on a tie). Also returns how many other FMA loops there are (remainder / scalar epilogues)."""
    cands = [b for b in loops(asm) if any(re.match(r"^\s*vfmadd", l) for l in b)]
    if not cands:
        return None, 0
    return max(cands, key=_rank), len(cands) - 1


def describe(body: list[str]) -> dict:
    ins = [l.strip().split()[0] for l in body if not l.strip().endswith(":")]
    text = "\n".join(body)
    fma = [l for l in body if re.match(r"^\s*vfmadd", l)]
    width = ("zmm (512-bit)" if any("%zmm" in l for l in fma) else "ymm (256-bit)" if any("%ymm" in l for l in fma)
             else "xmm" if any("ps" in l.split()[0] for l in fma) else "scalar")
    return {"instructions": len(ins), "packed_fma": sum(1 for l in fma if l.split()[0].endswith("ps")),
            "scalar_fma": sum(1 for l in fma if l.split()[0].endswith("ss")),
            "gathers": sum(1 for i in ins if "gather" in i), "expands": sum(1 for i in ins if i.startswith("vexpand")),
            "fma_width": width, "zmm_in_loop": "%zmm" in text}


def main() -> None:
    from sparsedeploy.engine.native import kernels as K
    from sparsedeploy.engine.native.pack import encode
    from sparsedeploy.engine.native.simd import has_avx512
    from sparsedeploy.engine.cpuinfo import cpu_name

    rng = np.random.default_rng(0)
    e = np.zeros(0, np.float32)
    rows, bodies = [], {}
    W = rng.standard_normal((64, 320)).astype(np.float32)
    W[rng.random(W.shape) < 0.9] = 0
    W[0, :] = 1                                             # uneven rows -> CSR
    Wequal = rng.standard_normal((64, 320)).astype(np.float32)
    Wequal[:, 30:] = 0
    cases = {"csr_gemv": ("csr", W), "ell_gemv": ("ell", Wequal), "bitmask_gemv": ("bitmask", W),
             "dense_gemv": ("dense", W)}
    for name, (fmt, M) in cases.items():
        a = encode(M, fmt)
        args = {"csr": ("rowptr", "cols", "vals"), "ell": ("cols", "vals"), "bitmask": ("rowptr", "masks", "vals"),
                "dense": ("w",)}[fmt]
        fn = getattr(K, name)
        fn(*(a[k] for k in args), np.ones(320, np.float32), e, np.zeros(64, np.float32), False)
        asm = "\n".join(fn.inspect_asm().values())
        body, others = hot_loop(asm)
        if body is None:
            rows.append((name, None))
            continue
        bodies[name] = body
        rows.append((name, {**describe(body), "other_loops": others}))
    lines = ["# Native kernels: the hot loop's instructions", "",
             f"Fresh numba compile on {cpu_name()} (AVX-512F for LLVM: {has_avx512()}). For each kernel the innermost "
             "loop that holds an FMA, found from the branch structure of the machine code.", "",
             "| kernel | loop instructions | packed FMA | scalar FMA | gathers | expands | FMA width | other FMA loops |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, d in rows:
        if d is None:
            lines.append(f"| {name} | no FMA loop found | | | | | | |")
        else:
            lines.append(f"| {name} | {d['instructions']} | {d['packed_fma']} | {d['scalar_fma']} | {d['gathers']} | "
                         f"{d['expands']} | {d['fma_width']} | {d['other_loops']} |")
    for name, body in bodies.items():
        lines += ["", f"## {name}", "", "```"] + [l.rstrip() for l in body[:60]] + (["..."] if len(body) > 60 else []) + ["```"]
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "native_asm_check.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
