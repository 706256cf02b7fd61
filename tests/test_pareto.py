"""The Pareto report (issue 12): the frontier, pooling of groups, ratios against the peer timed in the same
group, and one real measurement of a tiny deployment beside llama.cpp on its GGUF (where llama.cpp is built)."""
from __future__ import annotations

import math

import pytest

from sparsedeploy.bench import pareto

Q4, Q8 = "Dense Q4_0 (llama.cpp)", "Dense Q8_0 (llama.cpp)"


def _row(config, engine, ms, group, sparsity=0.0, **kw):
    kind = "llama.cpp peer" if engine == "llamacpp" else "sparsedeploy"
    return dict(config=config, label=config, engine=engine, requested_engine=engine, latency_ms=ms, group=group,
                sparsity=sparsity, kind=kind, deployment=f"/d/{config}", **kw)


def test_frontier_keeps_only_undominated_points():
    pts = [dict(label="a", ms=10, ppl=40), dict(label="b", ms=12, ppl=30), dict(label="c", ms=12, ppl=35),
           dict(label="d", ms=20, ppl=30), dict(label="e", ms=25, ppl=10), dict(label="f", ms=5, ppl=None),
           dict(label="g", ms=8, ppl=math.inf)]
    assert [p["label"] for p in pareto.frontier(pts)] == ["g", "a", "b", "e"]     # inf: usable, simply worst
    assert pareto.frontier([]) == []


def test_points_pool_groups_and_ratios_are_against_the_same_group():
    rows = [_row(Q4, "llamacpp", 10.0, 0), _row(Q4, "llamacpp", 12.0, 1),
            _row("Wanda 70%", "native", 20.0, 0, 0.7), _row("Wanda 90%", "native", 6.0, 1, 0.9)]
    for r in rows:                      # as measure() computes them
        r["vs"] = {Q4: next(x for x in rows if x["group"] == r["group"] and x["label"] == Q4)["latency_ms"] / r["latency_ms"]}
    pts = {p["label"]: p for p in pareto.points({"rows": rows}, {Q4: 30.0, "Wanda 70%": 90.0})}
    assert pts[Q4]["ms"] == 11.0 and pts[Q4]["ms_per_group"] == [10.0, 12.0]
    assert pts["Wanda 70%"]["vs"][Q4] == pytest.approx(0.5)          # 10 / 20, its own group's peer
    assert pts["Wanda 90%"]["vs"][Q4] == pytest.approx(2.0)          # 12 / 6
    assert pts["Wanda 90%"]["ppl"] is None and pts[Q4]["ppl"] == 30.0
    md = pareto.markdown(list(pts.values()), title="T", machine={"cpu": "Some CPU", "cores": 2}, anchors=(Q4,),
                         notes=["n1"])
    assert "Some CPU" in md and "- n1" in md
    q4_line = next(line for line in md.splitlines() if line.startswith(f"| {Q4}"))
    assert "**yes**" in q4_line                                     # 11 ms at ppl 30 beats 20 ms at ppl 90
    w70 = next(line for line in md.splitlines() if line.startswith("| Wanda 70%"))
    assert "**yes**" not in w70 and "0.50" in w70


def test_measure_times_a_deployment_beside_llamacpp_in_the_same_rounds(tiny_llama_dir, tmp_path):
    from sparsedeploy.bench.bench import BenchConfig, _read_deployment
    from sparsedeploy.engine.llamacpp import LlamaCppRuntime
    from sparsedeploy.export.stage import export

    dep = _read_deployment(export(str(tiny_llama_dir), seqlen=64, out=tmp_path / "deployment"))
    ggufs = []
    if LlamaCppRuntime.unavailable() is None:
        from sparsedeploy.export.gguf import export_gguf

        g = export_gguf(str(tiny_llama_dir), qtype="q4_0", out=tmp_path / "model-q4_0.gguf", verify=False)
        ggufs.append(dict(dep, gguf=str(g), label=Q4, config=Q4))
    cfg = pareto.ParetoConfig(bench=BenchConfig(engine="onnxruntime", cores=1, prompt_tokens=4, new_tokens=6, rounds=2,
                                                ort_baseline=False, bandwidth_mbytes=16), anchors=(Q4,))
    doc = pareto.measure([dep], ggufs, cfg)
    rows = doc["rows"]
    assert [r["engine"] for r in rows] == ["onnxruntime"] + ["llamacpp"] * len(ggufs)
    assert all(r["latency_ms"] > 0 and r["steps_timed"] == 2 * 5 for r in rows)
    if ggufs:
        ort = rows[0]
        assert ort["vs"][Q4] == pytest.approx(rows[1]["latency_ms"] / ort["latency_ms"])
        assert rows[1]["kind"] == "llama.cpp peer" and rows[0]["kind"] == "sparsedeploy"
    else:
        pytest.skip("llama.cpp not built: only the sparsedeploy side was timed")
