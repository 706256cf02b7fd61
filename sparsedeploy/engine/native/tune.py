"""Choose each group's stored format by timing it on this CPU (compile time, not a constant).

Which format is fastest for a product depends on the machine (memory bandwidth, cache sizes, whether gathers
or AVX-512 expands are cheap), the matrix's shape and its sparsity; a crossover tuned on one CPU kind was
wrong on the other. So for every decoder layer's groups (q|k|v, o, gate|up, down) every candidate format
(pack.candidates: dense, ELL or CSR, bitmask) is built and its product timed *in decode order*: round after
round, each format walks every layer's groups in the order a decode step does, so each call meets the cache
state it will meet in the model (a matrix timed alone in a loop would sit in cache and flatter the formats
that read more bytes). The formats take turns within a round, so a drift in the machine's speed hits all of
them alike. The median per (layer, group, format) decides; a format within `tie` of the fastest that stores
fewer bytes wins the tie (fewer bytes leave more bandwidth to everything else in the step).

Timings taken while other processes use the CPU are not trusted: a parallel product waits for its slowest
thread, so a busy machine makes the serial builds and the formats that read more bytes look fast. A 32-layer
7B-shaped build timed while another job ran chose serial builds everywhere and a dense int8 q|k|v at 70%
sparsity, and decoded at 213 ms a token; the parallel builds of the same groups took 0.45-0.55x the serial
ones' time on the idle machine (AMD EPYC, 2 cores: o 8.2 vs 18.0 ms, gate|up 38.9 vs 90.5, down 32.2 vs 63.6,
summed over 32 layers). So when other processes take more than BUSY_LOAD of the CPU the rounds are timed again
(up to RETRIES times, after a pause), and if the machine stays busy the choice falls back to the fewest
bytes with the parallel builds, recorded as such ("fallback"); and serial builds are candidates only for
groups of at most SERIAL_MAX_WEIGHTS weights (a fork/join costs microseconds; a 7B group reads megabytes).

Returns the choice and what was measured, which the index records next to every group.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np

from ..cpuinfo import cpu_name, cpu_tag  # noqa: F401  (re-exported: benchmarks import them from here)
from ..cpuload import OtherLoad
from . import kernels as K
from .model import Linear
from .pack import DEFAULT_INT4, candidates, encode

GROUP_ORDER = ("qkv", "o", "up", "down")
BUSY_LOAD = 0.15               # other processes' share of the CPU above which a timing is not trusted
RETRIES = 2                    # timing attempts after the first while the machine is busy
RETRY_PAUSE_S = 0.5
SERIAL_MAX_WEIGHTS = 1 << 22   # serial builds are timed only for groups of at most this many weights (4.2M)


def choose_formats(layers: list[dict[str, np.ndarray]], *, threads: int | None = None, rounds: int = 7,
                   tie: float = 0.03, formats: tuple[str, ...] | None = None,
                   serial: bool = True, weights: str = "fp32",
                   int4: tuple[int, str] | None = None) -> tuple[list[dict[str, str]], dict]:
    """layers[i][group] = the stacked fp32 matrix. Returns (choice[i][group] = format, tuning record).
    formats: only these candidates (dense where none of them applies), e.g. to compare formats.
    serial: also time each format's serial build ("csr/serial"): no parallel region, for small products.
    weights: the value type ("fp32" or "int8"): only formats of that type are candidates (pack.candidates).
    int4: an int4 build's (group, scales) storage, timed as it will be stored (pack.check_int4).
    A tie goes to fewer bytes, then to the parallel build."""
    used = K.set_threads(threads)
    rng = np.random.default_rng(0)
    cands: list[dict[str, dict[str, Linear]]] = []          # [layer][group]["csr" | "csr/serial" ...]
    for layer in layers:
        c = {}
        for g, W in layer.items():
            c[g] = {}
            allowed = ([f for f in candidates(W, weights) if formats is None or f in formats]
                       or [{"fp32": "dense", "int8": "int8", "int4": "int4_bitmask"}[weights]])
            for fmt in allowed:
                arrs = encode(W, fmt, int4 or DEFAULT_INT4)
                c[g][fmt] = Linear(fmt, arrs, None, W.shape)
                if serial and W.size <= SERIAL_MAX_WEIGHTS:
                    c[g][fmt + "/serial"] = Linear(fmt, arrs, None, W.shape, serial=True)
                if fmt in K.GEMV_PORTABLE:         # fp32 CSR / ELL: the gather intrinsic and the plain loop, both timed
                    c[g][fmt + "/portable"] = Linear(fmt, arrs, None, W.shape, portable=True)
        cands.append(c)
    order = [g for g in GROUP_ORDER if layers and g in layers[0]] + [g for g in (layers[0] if layers else {}) if g not in GROUP_ORDER]
    xs = {g: rng.standard_normal(layers[0][g].shape[1]).astype(np.float32) for g in order} if layers else {}
    outs = {g: np.zeros(layers[0][g].shape[0], np.float32) for g in order} if layers else {}
    kinds = ("dense", "ell", "csr", "bitmask", "int8", "int8_ell", "int8_csr", "int8_bitmask", "int8_perm", "int4_bitmask")
    fmts = sorted({f for c in cands for g in c for f in c[g]}, key=lambda f: (kinds.index(f.split("/")[0]), f))
    calls = {(i, g, f): partial(cands[i][g][f].vec, xs[g], outs[g], False) for i in range(len(cands)) for g in order
             for f in cands[i][g]}
    for call in calls.values():                  # compile and touch every candidate once
        call()
    clock = time.perf_counter
    for attempt in range(RETRIES + 1):
        times: dict[tuple, list[float]] = {k: [] for k in calls}
        with OtherLoad([]) as load:
            for r in range(rounds):
                for f in (fmts if r % 2 == 0 else fmts[::-1]):
                    for i in range(len(cands)):
                        for g in order:
                            call = calls.get((i, g, f))
                            if call is None:
                                continue
                            t0 = clock()
                            call()
                            times[(i, g, f)].append(clock() - t0)
        busy = load.fraction is not None and load.fraction > BUSY_LOAD
        if not busy or attempt == RETRIES:
            break
        time.sleep(RETRY_PAUSE_S)
    choice, ms = [], []
    for i in range(len(cands)):
        ci, mi = {}, {}
        for g in order:
            med = {f: float(np.median(times[(i, g, f)])) * 1e3 for f in cands[i][g]}
            if busy:                 # not trusted: the fewest bytes, parallel
                ci[g] = min((f for f in med if not f.endswith("/serial")), key=lambda f: (cands[i][g][f].nbytes, f))
            else:
                best = min(med.values())
                close = [f for f in med if med[f] <= best * (1 + tie)]
                ci[g] = min(close, key=lambda f: (cands[i][g][f].nbytes, f.endswith("/serial")))
            mi[g] = {f: round(v, 6) for f, v in med.items()}
        choice.append(ci)
        ms.append(mi)
    record = {"cpu": cpu_name(), "threads": used, "rounds": rounds, "tie": tie, "ms": ms, "weights": weights,
              **({"lowbit_kernels": K.lowbit_paths()} if weights != "fp32" else {}),
              "other_load": None if load.fraction is None else round(load.fraction, 3),
              "attempts": attempt + 1, "formats": sorted({f for c in choice for f in c.values()}),
              **({"fallback": f"fewest bytes, parallel builds: other processes took {load.fraction:.0%} of the "
                              f"CPU in all {attempt + 1} timing attempts"} if busy else {})}
    return choice, record
