"""`sparsedeploy search`: the Pareto frontier and the pick within a budget on a fixed synthetic set of points,
bad budgets as one-line errors, the workflow's points from a fake sweep (no pruning), and one end-to-end search
on the tiny Llama with ONNX Runtime."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sparsedeploy.bench.frontier import check_budget, dominates, frontier, pick
from sparsedeploy.errors import UserError

from .cli_helpers import run_cli


def P(engine, label, ms, ppl, sparsity=None):
    sp = 0.0 if label == "Dense" else int(label.rstrip("%")) / 100
    return {"label": label, "engine": engine, "sparsity": sp if sparsity is None else sparsity, "ms": ms, "ppl": ppl,
            "deployment": f"/sweep/{'dense' if sp == 0 else f'p{round(sp * 100):02d}'}/deployment",
            "kind": "sparsedeploy"}


DENSE_PPL = 36.0
POINTS = [
    P("onnxruntime", "Dense", 30.0, 36.0),
    P("native", "Dense", 32.0, 36.0),          # dominated by ORT dense (slower, same perplexity)
    P("native", "50%", 24.0, 39.6),            # exactly 1.10 × dense
    P("deepsparse", "50%", 25.0, 39.6),        # dominated by native 50% (same perplexity, slower)
    P("deepsparse", "60%", 21.0, 45.0),
    P("native", "60%", 21.0, 46.0),            # dominated by deepsparse 60% (same speed, worse)
    P("native", "70%", 18.0, 80.0),
    P("onnxruntime", "70%", 33.0, 80.0),       # dominated by everything faster with ppl <= 80
    P("deepsparse", "90%", 12.0, 900.0),
    P("onnxruntime", "90%", 35.0, float("nan")),   # a broken measurement: never on the frontier, never picked
]


def names(points):
    return [f"{p['engine']} {p['label']}" for p in points]


# ------------------------------------------------------------------------------------------- frontier
def test_frontier_keeps_exactly_the_undominated_points_sorted_by_latency():
    assert names(frontier(POINTS)) == ["deepsparse 90%", "native 70%", "deepsparse 60%", "native 50%",
                                       "onnxruntime Dense"]
    # the definition, checked point by point against the whole set
    usable = [p for p in POINTS if not math.isnan(p["ppl"])]
    front = frontier(POINTS)
    for p in usable:
        assert (p in front) == (not any(dominates(q, p) for q in usable)), names([p])


def test_frontier_ties_and_edge_cases():
    a, b = P("native", "50%", 20.0, 40.0), P("deepsparse", "50%", 20.0, 40.0)
    # identical points do not dominate each other: both stay
    assert names(frontier([b, a])) == ["deepsparse 50%", "native 50%"]
    # same latency: the lower perplexity wins; same perplexity: the faster wins
    assert names(frontier([P("native", "60%", 20.0, 41.0), a])) == ["native 50%"]
    assert names(frontier([P("native", "60%", 20.5, 40.0), a])) == ["native 50%"]
    # an infinite perplexity is a (bad) point; NaN latency or perplexity is left out
    inf = P("native", "90%", 5.0, float("inf"))
    assert names(frontier([a, inf, P("native", "80%", float("nan"), 50.0)])) == ["native 90%", "native 50%"]
    assert frontier([]) == []


# ------------------------------------------------------------------------------------------- pick
@pytest.mark.parametrize("budget, want", [
    (1.0, "onnxruntime Dense"),      # only the dense models qualify: the faster one
    (1.0999, "onnxruntime Dense"),   # just below 50%'s 1.10
    (1.10, "native 50%"),            # exactly on native 50%: admitted
    (1.25, "deepsparse 60%"),        # tie at 21 ms: the lower perplexity (45 vs 46)
    (1.30, "deepsparse 60%"),        # native 60% (46 <= 46.8) fits too: same speed, worse
    (2.3, "native 70%"),
    (25.0, "deepsparse 90%"),        # 900 = 25 × 36: exactly on the budget
    (100.0, "deepsparse 90%"),
])
def test_pick_within_a_perplexity_budget_is_the_fastest(budget, want):
    assert names([pick(POINTS, dense_ppl=DENSE_PPL, ppl_budget=budget)]) == [want]


@pytest.mark.parametrize("ms, want", [
    (100.0, "onnxruntime Dense"),    # everything fits: dense ORT and native dense tie on 36, ORT is faster
    (31.0, "onnxruntime Dense"),
    (29.9, "native 50%"),            # native 50% and deepsparse 50% tie on 39.6: the faster
    (24.0, "native 50%"),            # exactly on its latency
    (23.99, "deepsparse 60%"),
    (20.0, "native 70%"),
    (12.0, "deepsparse 90%"),
])
def test_pick_within_a_latency_budget_is_the_most_accurate(ms, want):
    assert names([pick(POINTS, dense_ppl=DENSE_PPL, latency_ms=ms)]) == [want]


def test_a_budget_exactly_on_a_point_admits_it_despite_float_rounding():
    assert 1.15 * 40.1 < 46.115                       # the product lands just below the point
    pts = [P("native", "Dense", 30.0, 40.1), P("native", "60%", 20.0, 46.115)]
    assert pick(pts, dense_ppl=40.1, ppl_budget=1.15)["label"] == "60%"
    assert pick(pts, dense_ppl=40.1, ppl_budget=1.1499)["label"] == "Dense"
    assert 0.1 + 0.2 > 0.3
    assert pick([P("native", "60%", 0.1 + 0.2, 50.0)], dense_ppl=40.1, latency_ms=0.3)["label"] == "60%"


def test_nothing_within_the_budget_names_the_closest_point_and_the_budget_that_admits_it():
    pruned = [p for p in POINTS if p["label"] != "Dense"]
    with pytest.raises(UserError) as e:
        pick(pruned, dense_ppl=DENSE_PPL, ppl_budget=1.05)
    msg = str(e.value)
    assert "native 50%" in msg and "39.60" in msg and "--ppl-budget 1.10 would admit it" in msg, msg
    assert pick(pruned, dense_ppl=DENSE_PPL, ppl_budget=1.10)["label"] == "50%"    # and it does
    with pytest.raises(UserError) as e:
        pick(pruned, dense_ppl=DENSE_PPL, ppl_budget=1.0)
    assert "--ppl-budget 1.10" in str(e.value)
    with pytest.raises(UserError) as e:
        pick(POINTS, dense_ppl=DENSE_PPL, latency_ms=11.95)
    msg = str(e.value)
    assert "deepsparse 90%" in msg and "12.00 ms/token" in msg and "--latency-ms 12.0 would admit it" in msg, msg
    # an odd ratio rounds up, so that the suggested budget really admits the point
    with pytest.raises(UserError) as e:
        pick([P("native", "60%", 20.0, 45.01)], dense_ppl=DENSE_PPL, ppl_budget=1.2)
    assert "--ppl-budget 1.26 would admit it" in str(e.value)
    assert pick([P("native", "60%", 20.0, 45.01)], dense_ppl=DENSE_PPL, ppl_budget=1.26)["label"] == "60%"
    # 39.96 / 36 is 1.11 plus a float crumb: still 1.11, not 1.12
    with pytest.raises(UserError) as e:
        pick([P("native", "60%", 20.0, 39.96)], dense_ppl=DENSE_PPL, ppl_budget=1.05)
    assert "--ppl-budget 1.11 would admit it" in str(e.value)
    assert pick([P("native", "60%", 20.0, 39.96)], dense_ppl=DENSE_PPL, ppl_budget=1.11)["label"] == "60%"
    with pytest.raises(UserError) as e:
        pick([P("native", "60%", 12.34, 45.0)], dense_ppl=DENSE_PPL, latency_ms=5)
    assert "--latency-ms 12.4 would admit it" in str(e.value)


@pytest.mark.parametrize("kw, needle", [
    ({}, "no budget given"),
    ({"ppl_budget": 1.1, "latency_ms": 20.0}, "both given"),
    ({"ppl_budget": 0.9}, "0.9 would ask for better than dense"),
    ({"ppl_budget": float("nan")}, "not a finite number"),
    ({"ppl_budget": float("inf")}, "not a finite number"),
    ({"ppl_budget": "1.1"}, "not a finite number"),
    ({"ppl_budget": True}, "not a finite number"),
    ({"latency_ms": 0.0}, "must be above 0"),
    ({"latency_ms": -3.0}, "must be above 0"),
    ({"latency_ms": float("inf")}, "not a finite number"),
])
def test_bad_budgets_are_user_errors(kw, needle):
    with pytest.raises(UserError) as e:
        check_budget(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):
        pick(POINTS, dense_ppl=DENSE_PPL, **kw)


def test_check_budget_returns_the_kind():
    assert check_budget(ppl_budget=1.0) == ("ppl", 1.0)
    assert check_budget(latency_ms=7) == ("latency", 7.0)


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, needle", [
    ([], "no budget given"),
    (["--ppl-budget", "1.1", "--latency-ms", "20"], "both given"),
    (["--ppl-budget", "0.9"], "0.9 would ask for better than dense"),
    (["--ppl-budget", "nan"], "not a finite number"),
    (["--latency-ms", "0"], "must be above 0"),
    (["--latency-ms", "-2"], "must be above 0"),
    (["--latency-ms", "inf"], "not a finite number"),
    (["--ppl-budget", "abc"], "--ppl-budget"),
    (["--ppl-budget", "1.1", "--engines", "tensorrt"], "unknown engine"),
    (["--ppl-budget", "1.1", "--engines", "llamacpp"], "names only the llama.cpp peer"),
    (["--ppl-budget", "1.1", "--sparsities", "0,1.5"], "outside"),
    (["--ppl-budget", "1.1", "--max-windows", "0"], "--max-windows"),
    (["--ppl-budget", "1.1", "--eval-seqlen", "4"], "--eval-seqlen"),
    (["--ppl-budget", "1.1", "--gguf-type", "q3_k"], "unknown GGUF type"),
    (["--ppl-budget", "1.1", "--prompt-tokens", "200"], "exceed"),
])
def test_bad_search_arguments_exit_2_with_one_line_before_any_work(args, needle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "search"
    code, stdout, err = run_cli(["search", "x", "--out", out, *args], monkeypatch, capsys)
    assert code == 2, (args, err)
    assert err.startswith("error:") and needle in err, (args, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- workflow
def _row(engine, sparsity, ms, dep, requested=None, gguf=None):
    return {"engine": engine, "requested_engine": requested or engine, "sparsity": sparsity, "latency_ms": ms,
            "deployment": str(dep), "label": "Dense" if sparsity == 0 else f"{round(sparsity * 100)}%",
            **({"gguf": gguf} if gguf else {})}


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """OUT with eval.json files for dense / 50% / 90%, and sweep + evaluate replaced by fakes that record calls."""
    from sparsedeploy.pipeline import stages
    from sparsedeploy.workflows import search as search_mod

    out = tmp_path / "sweep"
    ppl = {"dense": 36.0, "p50": 39.0, "p90": 700.0}
    for tag, value in ppl.items():
        (out / tag / "deployment").mkdir(parents=True)
        (out / tag / "eval.json").write_text(json.dumps({"perplexity": value, "data": "wikitext2"}))
    dep = {t: out / t / "deployment" for t in ppl}
    doc = {"machine": {"cpu": "Test CPU 9000", "cores": 2, "isa": ["avx2"]}, "settings": {"gguf_type": "q4_0"},
           "engines": {
               "native": [_row("native", 0.0, 32.0, dep["dense"]), _row("native", 0.5, 26.0, dep["p50"]),
                          _row("native", 0.9, 14.0, dep["p90"])],
               "deepsparse": [_row("deepsparse", 0.0, 28.0, dep["dense"]), _row("deepsparse", 0.5, 27.0, dep["p50"]),
                              _row("deepsparse", 0.9, 15.0, dep["p90"])],
               # the dense baseline bench adds when ONNX Runtime is not asked for: not a candidate
               "onnxruntime": [_row("onnxruntime", 0.0, 5.0, dep["dense"])],
           }}
    calls = {"sweep": [], "evaluate": [], "native": []}

    def fake_sweep_fn(cfg, o):
        calls["sweep"].append((cfg, Path(o)))
        return doc

    def fake_evaluate(source, ecfg, *, out=None, force=False):
        calls["evaluate"].append((source, Path(out)))
        return json.loads(Path(out).read_text())

    monkeypatch.setattr(search_mod, "sweep", fake_sweep_fn)
    monkeypatch.setattr(stages, "evaluate", fake_evaluate)
    monkeypatch.setattr("sparsedeploy.export.onnx_kv.read_deployment", lambda d: {"dir": str(d)})
    monkeypatch.setattr("sparsedeploy.export.native.ensure_native",
                        lambda meta, **kw: calls["native"].append((meta["dir"], kw)))
    return {"out": out, "doc": doc, "dep": dep, "calls": calls}


def _cfg(**kw):
    from sparsedeploy.workflows.search import SearchConfig

    base = dict(model="my-model", engines="native,deepsparse", sparsities=(0.5, 0.9), cores=1, max_windows=2)
    return SearchConfig(**{**base, **kw})


def test_search_picks_from_the_sweep_and_leaves_the_choice_ready(fake_sweep):
    from sparsedeploy.workflows.search import search

    out, dep, calls = fake_sweep["out"], fake_sweep["dep"], fake_sweep["calls"]
    seen = []
    res = search(_cfg(ppl_budget=1.10), out, on_step=lambda s, r: seen.append((s, r.choice is not None)))
    assert seen == [("measured", True)]
    # the sweep asked for: the given sparsities plus dense, the engines, this OUT
    (scfg, sout), = calls["sweep"]
    assert sout == out and scfg.sparsities == (0.0, 0.5, 0.9) and scfg.bench.engine == "native,deepsparse"
    assert scfg.model == "my-model" and scfg.bench.cores == 1 and not scfg.prepare_only
    # perplexity of the dense model into OUT/dense/eval.json, of each RUN into its own eval.json
    assert calls["evaluate"] == [("my-model", out / "dense" / "eval.json"), (str(out / "p50"), out / "p50" / "eval.json"),
                                 (str(out / "p90"), out / "p90" / "eval.json")]
    # 6 candidates (the ORT baseline left out); within 10% of 36: the dense models and 50% -> native 50% at 26 ms
    assert len(res.points) == 6 and {p["engine"] for p in res.points} == {"native", "deepsparse"}
    assert res.dense_ppl == 36.0
    c = res.choice
    assert (c["engine"], c["label"], c["ms"], c["ppl"]) == ("native", "50%", 26.0, 39.0)
    assert Path(c["deployment"]) == dep["p50"]
    assert res.serve == f"sparsedeploy serve {dep['p50']} --engine native --cores 1"
    assert calls["native"] == [(str(dep["p50"]), {"cores": 1, "keep_fixed": True})]
    assert names(res.frontier) == ["native 90%", "native 50%", "deepsparse Dense"]
    saved = json.loads((out / "search.json").read_text())
    assert saved["choice"] == c and saved["frontier"] == res.frontier and len(saved["points"]) == 6
    assert saved["budget"]["kind"] == "ppl" and saved["budget"]["value"] == 1.10
    assert saved["budget"]["max_ppl"] == pytest.approx(39.6)
    assert saved["machine"]["cpu"] == "Test CPU 9000" and saved["serve"] == res.serve and saved["error"] is None


def test_search_within_a_latency_budget_needs_nothing_built_for_deepsparse(fake_sweep):
    from sparsedeploy.workflows.search import search

    dep, calls = fake_sweep["dep"], fake_sweep["calls"]
    # <= 27.5 ms: native 50% (26) and deepsparse 50% (27) tie on perplexity 39: the faster
    res = search(_cfg(latency_ms=27.5), fake_sweep["out"])
    assert (res.choice["engine"], res.choice["label"]) == ("native", "50%")
    # <= 28 ms admits deepsparse's dense model (36): the most accurate; DeepSparse compiles when serve starts
    calls["native"].clear()
    res = search(_cfg(latency_ms=28.0, cores=None), fake_sweep["out"])
    assert (res.choice["engine"], res.choice["label"]) == ("deepsparse", "Dense")
    assert res.serve == f"sparsedeploy serve {dep['dense']} --engine deepsparse"
    assert calls["native"] == []
    saved = json.loads((fake_sweep["out"] / "search.json").read_text())
    assert saved["budget"] == {"kind": "latency", "value": 28.0, "data": "wikitext2"}


def test_search_with_nothing_in_budget_shows_the_frontier_then_fails(fake_sweep):
    from sparsedeploy.workflows.search import search

    out, calls = fake_sweep["out"], fake_sweep["calls"]
    seen = []
    with pytest.raises(UserError) as e:
        search(_cfg(latency_ms=10.0), out, on_step=lambda s, r: seen.append(names(r.frontier)))
    assert "native 90%" in str(e.value) and "--latency-ms 14.0 would admit it" in str(e.value)
    assert seen == [["native 90%", "native 50%", "deepsparse Dense"]]   # there to print before the error
    saved = json.loads((out / "search.json").read_text())
    assert saved["choice"] is None and saved["serve"] is None and "would admit it" in saved["error"]
    assert calls["native"] == []              # nothing was prepared


def test_points_of_the_llamacpp_peer_are_shown_not_chosen(fake_sweep, monkeypatch):
    from sparsedeploy.workflows.search import build_points, search

    out, doc, dep = fake_sweep["out"], fake_sweep["doc"], fake_sweep["dep"]
    doc["engines"]["llamacpp"] = [_row("llamacpp", 0.0, 11.0, dep["dense"], gguf="/g/model-q4_0.gguf")]
    pts = build_points(doc, out, (0.5, 0.9), ["native", "llamacpp"], peer_ppl=lambda g: 37.5)
    peer = [p for p in pts if p["engine"] == "llamacpp"]
    assert peer == [{"label": "Dense q4_0", "engine": "llamacpp", "sparsity": 0.0, "ms": 11.0, "ppl": 37.5,
                     "deployment": str(dep["dense"]), "kind": "llama.cpp peer", "gguf": "/g/model-q4_0.gguf"}]
    assert len(pts) == 4 and all(p["kind"] == "sparsedeploy" for p in pts if p is not peer[0])
    # the workflow: the peer is on the frontier and would win, but the choice is sparsedeploy's own
    import sparsedeploy.workflows.search as search_mod

    monkeypatch.setattr(search_mod, "_gguf_ppl", lambda g, cfg, o: 37.5)
    res = search(_cfg(engines="native,llamacpp", ppl_budget=1.10), out)
    # one sweep (it exports each model's GGUF itself when llama.cpp is built and named)
    assert [(c.prepare_only, c.bench.engines) for c, _ in fake_sweep["calls"]["sweep"]] == [(False, ["native", "llamacpp"])]
    assert names(res.frontier)[0] == "llamacpp Dense q4_0"
    assert res.choice["engine"] == "native" and res.choice["label"] == "50%"
    assert res.peer_better["engine"] == "llamacpp"


def test_the_cli_prints_the_frontier_the_choice_the_peer_and_the_serve_line(fake_sweep, monkeypatch, capsys):
    import sparsedeploy.workflows.search as search_mod

    out, doc, dep = fake_sweep["out"], fake_sweep["doc"], fake_sweep["dep"]
    doc["engines"]["llamacpp"] = [_row("llamacpp", 0.0, 11.0, dep["dense"], gguf="/g/model-q4_0.gguf")]
    monkeypatch.setattr(search_mod, "_gguf_ppl", lambda g, cfg, o: 37.5)
    code, stdout, err = run_cli(["search", "my-model", "--out", out, "--engines", "native,deepsparse,llamacpp",
                                 "--sparsities", "0.5,0.9", "--cores", 1, "--ppl-budget", "1.10"], monkeypatch, capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    chosen = [ln for ln in lines if "◀ chosen" in ln]
    assert len(chosen) == 1 and "native" in chosen[0] and "50%" in chosen[0] and "26.00" in chosen[0], chosen
    assert any("llamacpp" in ln and "Dense q4_0" in ln and "llama.cpp peer" in ln for ln in lines), stdout
    assert "note: the llama.cpp peer Dense q4_0 would do better within this budget (11.00 ms/token" in stdout
    assert "Test CPU 9000" in stdout
    assert lines[-1] == f"ready to serve: sparsedeploy serve {dep['p50']} --engine native --cores 1"


def test_a_missing_eval_is_a_one_line_error(fake_sweep):
    from sparsedeploy.workflows.search import build_points

    (fake_sweep["out"] / "p90" / "eval.json").unlink()
    with pytest.raises(UserError) as e:
        build_points(fake_sweep["doc"], fake_sweep["out"], (0.5, 0.9), ["native"])
    assert "p90/eval.json is missing" in str(e.value)


# ------------------------------------------------------------------------------------------- end to end
def test_search_end_to_end_on_the_tiny_llama_with_onnxruntime(tiny_llama_dir, corpus_file, tmp_path, monkeypatch,
                                                             capsys):
    out = tmp_path / "search"
    common = ["search", tiny_llama_dir, "--out", out, "--engines", "onnxruntime", "--sparsities", "0.5",
              "--nsamples", 4, "--calib-seqlen", 32, "--seqlen", 48, "--eval-data", f"file:{corpus_file}",
              "--eval-seqlen", 32, "--max-windows", 2, "--device", "cpu", "--cores", 1, "--prompt-tokens", 8,
              "--new-tokens", 8, "--rounds", 1]
    code, stdout, err = run_cli([*common, "--ppl-budget", 1000], monkeypatch, capsys)
    assert code == 0, err
    doc = json.loads((out / "search.json").read_text())
    pts = doc["points"]
    # the dense and the 50% model on ONNX Runtime, each with its own perplexity from its eval.json
    assert len(pts) == 2 and {p["engine"] for p in pts} == {"onnxruntime"}
    dense, pruned = sorted(pts, key=lambda p: p["sparsity"])
    assert dense["label"] == "Dense" and abs(pruned["sparsity"] - 0.5) < 1 / 32
    evals = {t: json.loads((out / t / "eval.json").read_text()) for t in ("dense", "p50")}
    assert doc["dense_ppl"] == evals["dense"]["perplexity"]
    assert (dense["ppl"], pruned["ppl"]) == (evals["dense"]["perplexity"], evals["p50"]["perplexity"])
    assert Path(pruned["deployment"]) == out / "p50" / "deployment"
    assert evals["p50"]["windows"] == 2 and evals["p50"]["seqlen"] == 32
    table = json.loads((out / "table5.json").read_text())
    assert {p["label"]: p["ms"] for p in pts} == {r["label"]: r["latency_ms"] for r in table["engines"]["onnxruntime"]}
    # a budget everything meets: the fastest point
    fastest = min(pts, key=lambda p: (p["ms"], p["ppl"]))
    assert doc["choice"] == fastest
    assert f"ready to serve: sparsedeploy serve {fastest['deployment']} --engine onnxruntime --cores 1" in stdout
    assert "◀ chosen" in stdout and "frontier" in stdout
    assert (Path(fastest["deployment"]) / "model.onnx").is_file()
    # again, with a latency budget everything meets: nothing is redone, the most accurate point is chosen
    stamps = {t: (out / t / "eval.json").stat().st_mtime_ns for t in ("dense", "p50")}
    code, stdout, err = run_cli([*common, "--latency-ms", 1e6], monkeypatch, capsys)
    assert code == 0, err
    assert "reusing" in err and "up to date" in err
    assert {t: (out / t / "eval.json").stat().st_mtime_ns for t in ("dense", "p50")} == stamps
    doc = json.loads((out / "search.json").read_text())
    assert doc["choice"] == min(doc["points"], key=lambda p: (p["ppl"], p["ms"]))
    # and a budget nothing meets: the frontier is printed, then one line naming what would admit the closest
    code, stdout, err = run_cli([*common, "--latency-ms", 1e-6], monkeypatch, capsys)
    assert code == 2 and "frontier" in stdout
    assert err.strip().splitlines()[-1].startswith("error: no configuration decodes within --latency-ms")
    assert "would admit it" in err and "Traceback" not in err
    # the llama.cpp peer's quantized GGUF is scored on its own (dequantized) weights, on the same windows
    from sparsedeploy.export.gguf import export_gguf
    from sparsedeploy.workflows.search import SearchConfig, _gguf_ppl

    gguf = export_gguf(str(out / "p50"), qtype="q4_0", out=out / "p50" / "deployment-gguf" / "model-q4_0.gguf", cores=1)
    cfg = SearchConfig(model=str(tiny_llama_dir), eval_data=f"file:{corpus_file}", eval_seqlen=32, max_windows=2,
                       device="cpu")
    q = _gguf_ppl(str(gguf), cfg, out)
    saved = json.loads(gguf.with_suffix(".eval.json").read_text())
    assert q == saved["perplexity"] and saved["windows"] == 2 and saved["seqlen"] == 32
    assert math.isfinite(q) and q != evals["p50"]["perplexity"]      # 4-bit weights: not the fp32 number
    assert q == pytest.approx(evals["p50"]["perplexity"], rel=0.2)
