"""Reliability: no network, kill -9 at every stage of `run`, bad input across the whole CLI, property-based
fuzzing of the allocators and of the completion request schema, and the security defaults.

References: an uninterrupted `run` of the same tiny model (artifacts compared byte for byte or value for
value), the allocators' contract (parameter-weighted mean = target, every ratio in [0, R_MAX]), and a
snapshot of every file before and after each bad command.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .cli_helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedeploy import cli

ROOT = Path(__file__).resolve().parents[1]


_cli = run_cli


def _unshare_ok() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _tree(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under root."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st_ = p.stat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- run: offline, kill -9
KILL_HOOK = '''
import os, signal
_at = os.environ.get("SPARSEDEPLOY_TEST_KILL_AT")
if _at:
    _replace = os.replace
    def _kill_before_commit(src, dst, *a, **k):
        # the stage has written its artifact under a temp name and is about to rename it into place
        if os.path.basename(os.fspath(dst)) == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)
    os.replace = _kill_before_commit
'''

# (stage, the artifact whose commit it dies at): every stage of `run`, in order
KILL_POINTS = [("calibrate", "calib_stats.safetensors"), ("allocate", "ratios.json"), ("prune", "model"),
               ("eval dense", "eval_dense.json"), ("eval pruned", "eval.json"), ("export dense", "dense-deployment"),
               ("export pruned", "deployment"), ("compile", "compile-onnxruntime.json"), ("bench", "table5.json")]


def _run_argv(model_dir, corpus, out):
    return ["run", "--model", model_dir, "--out", out, "--nsamples", 4, "--seqlen", 32, "--eval-data", f"file:{corpus}",
            "--eval-seqlen", 32, "--max-windows", 2, "--device", "cpu", "--engine", "onnxruntime", "--cores", 1,
            "--export-seqlen", 48, "--prompt-tokens", 4, "--new-tokens", 4]


def _run(argv, env, *, netns=False, timeout=600):
    cmd = [sys.executable, "-c", "from sparsedeploy.cli import main; main()", *map(str, argv)]
    if netns:
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _check_no_half_written(out: Path) -> list[str]:
    """Every visible artifact is complete; returns the hidden temp leftovers (never read by any stage)."""
    from safetensors import safe_open

    hidden = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):
            hidden.append(str(rel))
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                list(f.keys())
        elif p.is_dir() and p.name in ("model", "deployment", "dense-deployment"):
            assert (p / "config.json").is_file(), f"{rel} is visible but incomplete"
            if "deployment" in p.name:
                assert (p / "sparsedeploy.json").is_file() and (p / "model.onnx").is_file(), f"{rel} is incomplete"
    return hidden


def _artifacts(out: Path) -> dict:
    from safetensors.torch import load_file

    ratios = json.loads((out / "ratios.json").read_text())
    weights = {}
    for f in sorted((out / "model").glob("*.safetensors")):
        for k, v in sorted(load_file(str(f)).items()):
            weights[k] = hashlib.sha256(v.numpy().tobytes()).hexdigest()
    ev, dense = (json.loads((out / n).read_text()) for n in ("eval.json", "eval_dense.json"))
    meta = json.loads((out / "deployment" / "sparsedeploy.json").read_text())
    return {"ratios": ratios, "weights": weights, "calib": _sha(out / "calib_stats.safetensors"),
            "ppl": (ev["perplexity"], dense["perplexity"], ev["sparsity"]),
            "deploy": (meta["verified"]["tokens"], meta["weights"], _sha(out / "deployment" / "model.onnx")),
            "table5": sorted(json.loads((out / "table5.json").read_text())["engines"])}


@pytest.mark.slow
def test_run_offline_and_killed_at_every_stage_equals_an_uninterrupted_run(tiny_llama_dir, corpus_file, tmp_path):
    """The reference run goes inside an empty network namespace (`unshare -n`) when allowed; then one RUN
    directory is killed with SIGKILL at the commit of each stage's artifact in turn (each rerun resumes
    and dies at the next stage), and a final rerun completes it. Its artifacts must equal the reference's."""
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(ROOT)])}
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_HOOK)
    ref = tmp_path / "reference"
    netns = _unshare_ok()
    r = _run(_run_argv(tiny_llama_dir, corpus_file, ref), env, netns=netns)
    assert r.returncode == 0, r.stderr[-3000:]
    if not netns:
        print("unshare -n is not permitted here: the reference run had the network")
    out = tmp_path / "interrupted"
    seen = []
    for stage, artifact in KILL_POINTS:
        r = _run(_run_argv(tiny_llama_dir, corpus_file, out), {**env, "SPARSEDEPLOY_TEST_KILL_AT": artifact})
        assert r.returncode == -signal.SIGKILL, f"{stage}: expected to die at {artifact} ({r.returncode}) {r.stderr[-2000:]}"
        hidden = _check_no_half_written(out)
        seen.append((stage, len(hidden)))
        found = list(out.rglob(artifact))
        visible = [p for p in found if not any(part.startswith(".") for part in p.relative_to(out).parts)]
        assert not visible, f"{stage}: {artifact} became visible although the process died before renaming it"
    r = _run(_run_argv(tiny_llama_dir, corpus_file, out), env)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_no_half_written(out)
    a, b = _artifacts(ref), _artifacts(out)
    for key in a:
        assert a[key] == b[key], f"{key} differs after the interrupted runs"
    print("kill points and hidden temp leftovers:", seen)


@pytest.mark.skipif(not _unshare_ok(), reason="unshare -n is not permitted on this machine (needs root or user namespaces)")
def test_no_network_means_no_network():
    """The namespace the offline run uses really has no network: even a TCP connect to a public address fails."""
    code = "import socket; s = socket.socket(); s.settimeout(3); s.connect(('1.1.1.1', 443))"
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and ("unreachable" in r.stderr.lower() or "OSError" in r.stderr)


# ------------------------------------------------------------------------------- bad input, every command
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir, corpus_file):
    """A calibrated RUN, a deployment and assorted broken files, all under one folder that is snapshotted."""
    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline import stages

    root = tmp_path_factory.mktemp("inputs")
    run = root / "calibrated"
    stages.calibrate(stages.RunDir(run), stages.CalibConfig(str(tiny_llama_dir), f"file:{corpus_file}", 4, 32, 0,
                                                            None, "cpu"))
    dep = export(str(tiny_llama_dir), seqlen=64, out=root / "deployment")
    files = {"run": run, "dep": dep, "model": tiny_llama_dir, "corpus": corpus_file}
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    (root / "empty.txt").write_text("")
    files["latin"], files["empty"] = root / "latin1.txt", root / "empty.txt"
    bad_run = root / "corrupt-run"            # a calibrated RUN whose files are damaged
    shutil.copytree(run, bad_run)
    (bad_run / "calib_stats.safetensors").write_bytes(b"\x00" * 50)
    files["bad_stats"] = bad_run
    bad_man = root / "corrupt-manifest"
    shutil.copytree(run, bad_man)
    (bad_man / "manifest.json").write_text('{"stages": ')
    files["bad_manifest"] = bad_man
    for name, damage in (("dep-bad-onnx", ("model.onnx", b"garbage")), ("dep-bad-meta", ("sparsedeploy.json", b"{nope")),
                         ("dep-no-tok", ("tokenizer.json", None))):
        d = root / name
        shutil.copytree(dep, d)
        fname, data = damage
        if data is None:
            (d / fname).unlink()
        else:
            (d / fname).write_bytes(data)
        files[name.replace("-", "_")] = d
    afile = root / "a-file"
    afile.write_text("x")
    files["afile"] = afile
    files["root"] = root
    return files


BAD_CLI = [
    # calibrate
    ("calibrate: nsamples 0", ["calibrate", "{model}", "--out", "{new}", "--nsamples", "0"], "--nsamples"),
    ("calibrate: seqlen 4", ["calibrate", "{model}", "--out", "{new}", "--seqlen", "4"], "--seqlen"),
    ("calibrate: missing model", ["calibrate", "{root}/nope", "--out", "{new}"], "does not exist"),
    ("calibrate: non-UTF-8 text", ["calibrate", "{model}", "--out", "{new}", "--calib", "file:{latin}", "--device", "cpu"], "UTF-8"),
    ("calibrate: empty text", ["calibrate", "{model}", "--out", "{new}", "--calib", "file:{empty}", "--device", "cpu"], "empty"),
    ("calibrate: missing text", ["calibrate", "{model}", "--out", "{new}", "--calib", "file:{root}/no.txt", "--device", "cpu"], "no.txt"),
    ("calibrate: unknown source", ["calibrate", "{model}", "--out", "{new}", "--calib", "imagenet"], "source"),
    ("calibrate: nsamples not a number", ["calibrate", "{model}", "--out", "{new}", "--nsamples", "many"], "--nsamples"),
    # allocate
    ("allocate: sparsity 1", ["allocate", "{run}", "--sparsity", "1"], "sparsity"),
    ("allocate: sparsity -0.2", ["allocate", "{run}", "--sparsity", "-0.2"], "sparsity"),
    ("allocate: sparsity nan", ["allocate", "{run}", "--sparsity", "nan"], "sparsity"),
    ("allocate: alpha negative", ["allocate", "{run}", "--sparsity", "0.5", "--alpha", "-0.1"], "α"),
    ("allocate: alpha too wide", ["allocate", "{run}", "--sparsity", "0.5", "--alpha", "0.9"], "α"),
    ("allocate: lambda too wide", ["allocate", "{run}", "--sparsity", "0.5", "--allocator", "owl", "--owl-lambda", "0.7"], "λ"),
    ("allocate: unknown allocator", ["allocate", "{run}", "--sparsity", "0.5", "--allocator", "best"], "allocator"),
    ("allocate: not a RUN", ["allocate", "{root}/nope", "--sparsity", "0.5"], "calibrat"),
    ("allocate: corrupt stats", ["allocate", "{bad_stats}", "--sparsity", "0.5", "--force"], "corrupt"),
    ("allocate: corrupt manifest", ["allocate", "{bad_manifest}", "--sparsity", "0.5"], "corrupt"),
    # prune
    ("prune: sparsity 1.5", ["prune", "{model}", "--out", "{new}", "--sparsity", "1.5"], "sparsity"),
    ("prune: pattern 3:2", ["prune", "{model}", "--out", "{new}", "--sparsity", "0.5", "--allocator", "uniform", "--pattern", "3:2"], "3:2"),
    ("prune: pattern mismatch", ["prune", "{model}", "--out", "{new}", "--sparsity", "0.6", "--allocator", "uniform", "--pattern", "2:4"], "2:4"),
    ("prune: unknown method", ["prune", "{model}", "--out", "{new}", "--sparsity", "0.5", "--method", "obc"], "method"),
    ("prune: unknown device", ["prune", "{model}", "--out", "{new}", "--sparsity", "0.5", "--device", "tpu"], "device"),
    # eval
    ("eval: max-windows 0", ["eval", "{model}", "--data", "file:{corpus}", "--max-windows", "0"], "--max-windows"),
    ("eval: seqlen 2", ["eval", "{model}", "--data", "file:{corpus}", "--seqlen", "2"], "--seqlen"),
    ("eval: unknown data", ["eval", "{model}", "--data", "imagenet"], "source"),
    ("eval: missing model", ["eval", "{root}/nope", "--data", "file:{corpus}"], "does not exist"),
    ("eval: non-UTF-8 data", ["eval", "{model}", "--data", "file:{latin}", "--device", "cpu"], "UTF-8"),
    # export
    ("export: seqlen 2", ["export", "{model}", "--seqlen", "2", "--out", "{new}"], "--seqlen"),
    ("export: seqlen huge", ["export", "{model}", "--seqlen", "1000000", "--out", "{new}"], "--seqlen"),
    ("export: out is a file", ["export", "{model}", "--seqlen", "16", "--out", "{afile}"], "not a folder"),
    ("export: out is a foreign folder", ["export", "{model}", "--seqlen", "16", "--out", "{run}"], "not a deployment"),
    ("export: missing source", ["export", "{root}/nope", "--out", "{new}"], "does not exist"),
    # compile
    ("compile: missing deployment", ["compile", "{root}/nope"], "does not exist"),
    ("compile: corrupt model.onnx", ["compile", "{dep_bad_onnx}", "--engine", "onnxruntime"], "model.onnx"),
    ("compile: corrupt metadata", ["compile", "{dep_bad_meta}", "--engine", "onnxruntime"], "sparsedeploy.json"),
    ("compile: missing tokenizer", ["compile", "{dep_no_tok}", "--engine", "onnxruntime"], "tokenizer.json"),
    ("compile: unknown engine", ["compile", "{dep}", "--engine", "tensorrt"], "engine"),
    ("compile: cores 0", ["compile", "{dep}", "--engine", "onnxruntime", "--cores", "0"], "--cores"),
    # bench
    ("bench: prompt + new > seqlen", ["bench", "{dep}", "--engine", "onnxruntime", "--prompt-tokens", "60", "--new-tokens", "10"], "exceed"),
    ("bench: missing deployment", ["bench", "{root}/nope"], "does not exist"),
    ("bench: corrupt model.onnx", ["bench", "{dep_bad_onnx}", "--engine", "onnxruntime"], "model.onnx"),
    ("bench: cores 999", ["bench", "{dep}", "--cores", "999"], "--cores"),
    # sweep
    ("sweep: sparsity 1.5", ["sweep", "{model}", "--out", "{new}", "--sparsities", "0,1.5"], "outside"),
    ("sweep: sparsities malformed", ["sweep", "{model}", "--out", "{new}", "--sparsities", "a,b"], "sparsit"),
    ("sweep: unknown synthetic", ["sweep", "--synthetic", "gpt5", "--out", "{new}"], "unknown synthetic"),
    # run
    ("run: sparsity 2", ["run", "--model", "{model}", "--out", "{new}", "--sparsity", "2"], "sparsity"),
    ("run: unknown method", ["run", "--model", "{model}", "--out", "{new}", "--method", "obc"], "method"),
    ("run: missing model", ["run", "--model", "{root}/nope", "--out", "{new}"], "does not exist"),
    ("run: nsamples 0", ["run", "--model", "{model}", "--out", "{new}", "--nsamples", "0", "--device", "cpu"], "--nsamples"),
    # serve (the rest: tests/test_serve.py, which also checks the ones that need a free port)
    ("serve: missing deployment", ["serve", "{root}/nope"], "does not exist"),
    ("serve: corrupt metadata", ["serve", "{dep_bad_meta}"], "sparsedeploy.json"),
    ("serve: port 70000", ["serve", "{dep}", "--port", "70000"], "--port"),
    ("serve: max-prompt-tokens > seqlen", ["serve", "{dep}", "--max-prompt-tokens", "200"], "--max-prompt-tokens"),
    # no such command / option
    ("unknown command", ["deploy"], "deploy"),
    ("unknown option", ["eval", "{model}", "--bogus"], "--bogus"),
]


@pytest.mark.parametrize("name,argv,needle", BAD_CLI, ids=[b[0] for b in BAD_CLI])
def test_every_command_rejects_bad_input_in_one_line_and_writes_nothing(name, argv, needle, inputs, tmp_path,
                                                                       monkeypatch, capsys):
    work = tmp_path / "cwd"                     # where default outputs (runs/...) would go
    work.mkdir()
    monkeypatch.chdir(work)
    watched = [inputs["root"], inputs["model"], work]
    before = [_tree(p) for p in watched]
    subs = {k: str(v) for k, v in inputs.items()} | {"new": str(tmp_path / "new")}
    code, out, err = _cli([a.format(**subs) for a in argv], monkeypatch, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.endswith(": done")]
    assert code == 2, (name, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), (name, err)
    assert needle.lower() in lines[0].lower(), (name, lines[0])
    assert not (tmp_path / "new").exists(), f"{name}: wrote {list((tmp_path / 'new').rglob('*'))}"
    assert [_tree(p) for p in watched] == before, f"{name}: files were written or changed"


# ------------------------------------------------------------------------------- hypothesis: allocators
finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def layer_problem(draw):
    n = draw(st.integers(1, 40))
    sizes = draw(st.lists(st.integers(1, 10**7), min_size=n, max_size=n))
    scores = draw(st.lists(st.floats(1e-6, 1e6, **finite), min_size=n, max_size=n))
    p = draw(st.floats(0.001, 0.99, **finite))
    return sizes, scores, p


@settings(max_examples=300, deadline=None)
@given(layer_problem(), st.one_of(st.none(), st.floats(0.0, 0.5, **finite)), st.sampled_from(["median", "mean"]))
def test_dlp_ratios_average_to_the_target_and_stay_in_bounds(problem, alpha, stat):
    from sparsedeploy.errors import UserError
    from sparsedeploy.pipeline.allocate import R_MAX, allocate_dlp

    sizes, scores, p = problem
    try:
        res = allocate_dlp(scores, sizes, p, alpha=alpha, stat=stat)
    except UserError as e:
        assert alpha is not None and "α" in str(e)       # only an explicit, infeasible α may be refused
        return
    r = res.ratios
    assert len(r) == len(sizes) and all(0.0 <= x <= R_MAX for x in r)
    mean = math.fsum(x * s for x, s in zip(r, sizes)) / math.fsum(sizes)
    assert abs(mean - p) < 1e-9 and abs(res.weighted_mean - p) < 1e-9
    assert res.alpha is None or res.alpha >= 0


@settings(max_examples=300, deadline=None)
@given(layer_problem(), st.one_of(st.none(), st.floats(0.0, 0.5, **finite)))
def test_owl_ratios_average_to_the_target_and_stay_in_bounds(problem, lam):
    from sparsedeploy.errors import UserError
    from sparsedeploy.pipeline.allocate import R_MAX, allocate_owl

    sizes, scores, p = problem
    outliers = [min(1.0, s / 1e6) for s in scores]
    try:
        res = allocate_owl(outliers, sizes, p, lam=lam)
    except UserError as e:
        assert lam is not None and "λ" in str(e)
        return
    assert all(0.0 <= x <= R_MAX for x in res.ratios)
    mean = math.fsum(x * s for x, s in zip(res.ratios, sizes)) / math.fsum(sizes)
    assert abs(mean - p) < 1e-9


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-2, 3, **finite), min_size=n, max_size=n),
    st.lists(st.floats(0.001, 1e6, **finite), min_size=n, max_size=n))), st.floats(0.0, 0.999, **finite))
def test_rebalance_hits_any_feasible_target(rw, target):
    from sparsedeploy.pipeline.allocate import R_MAX, rebalance

    ratios, weights = rw
    out = rebalance(ratios, weights, target)
    assert all(0.0 <= x <= R_MAX for x in out)
    assert abs(math.fsum(x * w for x, w in zip(out, weights)) / math.fsum(weights) - target) < 1e-9


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.booleans(), st.text(max_size=3)),
       st.integers(0, 5))
def test_allocators_refuse_nonsense_targets_with_user_errors(p, n):
    from sparsedeploy.errors import UserError
    from sparsedeploy.pipeline.allocate import allocate

    stats = [{"median": 1.0 + i, "mean": 2.0 + i, "outlier_ratio": 0.01 * i} for i in range(n)]
    for name in ("uniform", "owl", "dlp"):
        try:
            res = allocate(name, stats, [10] * n, p)
        except UserError:
            continue
        assert isinstance(p, float) and 0 < p < 1 and n > 0 and abs(res.weighted_mean - p) < 1e-9


# ------------------------------------------------------------------------------- hypothesis: request schema
any_text = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20).map("".join)  # + lone surrogates
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False), any_text)
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed", "n", "model"]
request_doc = st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=len(FIELDS)) | \
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=30), any_text)},
                          optional={"max_tokens": st.integers(-3, 100), "temperature": st.floats(-1, 3),
                                    "top_p": st.floats(-0.5, 1.5), "stream": st.booleans(),
                                    "stop": st.one_of(any_text, st.lists(any_text, max_size=6)),
                                    "seed": st.integers(-5, 2**64)})


@settings(max_examples=500, deadline=None)
@given(st.one_of(request_doc.map(lambda d: json.dumps(d).encode()), json_value.map(lambda v: json.dumps(v).encode()),
                 st.binary(max_size=64)))
def test_request_schema_gives_a_request_or_a_4xx_never_anything_else(body):
    from sparsedeploy.serve.app import CompletionRequest, parse_request
    from sparsedeploy.serve.engine import ServeError

    try:
        req = parse_request(body)
    except ServeError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert isinstance(req, CompletionRequest)
    assert req.max_tokens >= 1 and 0 <= req.temperature <= 2 and 0 < req.top_p <= 1 and req.n == 1
    assert isinstance(req.prompt, str) or (isinstance(req.prompt, list) and len(req.prompt) == 1)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory, tiny_llama_dir):
    from sparsedeploy.export.stage import export
    from sparsedeploy.serve.app import Settings, create_app

    from .serve_helpers import FakeWorker, running

    dep = export(str(tiny_llama_dir), seqlen=64, out=tmp_path_factory.mktemp("fuzz") / "deployment")
    app = create_app(Settings(str(dep), timeout_s=10, queue_size=64), worker_factory=lambda: FakeWorker())
    with running(app) as url:
        yield url


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(request_doc.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_the_server_never_answers_500(fake_server, body):
    import httpx

    r = httpx.post(f"{fake_server}/v1/completions", content=body, timeout=30)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200 and r.headers["content-type"].startswith("application/json"):
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    elif r.status_code != 200:
        assert r.json()["error"]["code"] == r.status_code


# ------------------------------------------------------------------------------- security defaults
def test_trust_remote_code_is_never_on(tmp_path, tiny_llama_dir, corpus_file, monkeypatch, capsys):
    """A model folder whose config asks for custom code: loading it must fail, and the code must never run."""
    marker = tmp_path / "remote-code-ran"
    evil = tmp_path / "evil"
    shutil.copytree(tiny_llama_dir, evil)
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    code, out, err = _cli(["eval", evil, "--data", f"file:{corpus_file}", "--seqlen", "8", "--max-windows", "1",
                           "--device", "cpu"], monkeypatch, capsys)
    assert not marker.exists(), "remote code ran"
    # transformers ignores auto_map without trust_remote_code and loads the built-in Llama class instead
    assert code in (0, 2) and "Traceback" not in err
    src = "\n".join(p.read_text() for p in (ROOT / "sparsedeploy").rglob("*.py"))
    assert "trust_remote_code=True" not in src and src.count("trust_remote_code=False") >= 2


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """A folder with only a pickle checkpoint whose unpickling would run code: refused, and nothing runs."""
    import pickle

    marker = tmp_path / "pickle-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy2(tiny_llama_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    for argv in (["eval", d, "--data", "wikipedia-summaries-heldout", "--device", "cpu"],
                 ["prune", d, "--out", tmp_path / "run", "--sparsity", "0.5"],
                 ["calibrate", d, "--out", tmp_path / "run"]):
        code, out, err = _cli(argv, monkeypatch, capsys)
        assert code == 2 and "pickle" in err and "--allow-pickle" in err, (argv, err)
        assert not marker.exists() and not (tmp_path / "run").exists()
    from sparsedeploy.pipeline.models import resolve

    assert resolve(str(d), allow_pickle=True).path == str(d)     # only an explicit opt-in lets it through


def test_server_binds_loopback_unless_told_otherwise():
    from sparsedeploy.serve.app import Settings

    assert Settings("x").host == "127.0.0.1"
    assert inspect.signature(cli.serve).parameters["host"].default.default == "127.0.0.1"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"--host", "0.0.0.0"' in dockerfile          # only the container opts in, explicitly
