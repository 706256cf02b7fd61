"""End-to-end stages on tiny random Llama (GQA) and OPT models, the walker, text sources and the CLI's bad-input contract."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from .cli_helpers import run_cli
import torch
from safetensors.torch import load_file

from sparsedeploy import cli
from sparsedeploy.errors import UserError
from sparsedeploy.pipeline import data, models, stages, walker
from sparsedeploy.pipeline.arch import decoder_layers, layer_linears, spec_for
from sparsedeploy.pipeline.rundir import RunDir

from .conftest import CALIB


def _prune_cfg(model_dir, corpus_file, **kw):
    calib = stages.CalibConfig(str(model_dir), f"file:{corpus_file}", nsamples=8, seqlen=64, device="cpu")
    base = dict(model=str(model_dir), sparsity=0.5, allocator="dlp", method="wanda", calib=calib, device="cpu")
    base.update(kw)
    return stages.PruneConfig(**base)


def _layer_sparsities(model_dir: Path, spec) -> list[float]:
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = []
    i = 0
    while f"{spec.layers}.{i}.{spec.linears[0]}.weight" in tensors:
        ws = [tensors[f"{spec.layers}.{i}.{name}.weight"] for name in spec.linears]
        out.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
        i += 1
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_end_to_end(tiny_model_dir, corpus_file, tmp_path, method):
    from transformers import AutoModelForCausalLM

    run = RunDir(tmp_path / "run")
    out = stages.prune(run, _prune_cfg(tiny_model_dir, corpus_file, method=method))
    man = json.loads((run.path / "manifest.json").read_text())
    for name in ("calibrate", "allocate", "prune"):
        assert man["stages"][name]["done"], name
        assert "torch" in man["stages"][name]["versions"]
    ratios = json.loads((run.path / "ratios.json").read_text())
    for key in ("target_sparsity", "allocator", "alpha", "stat", "realized_sparsity", "layers"):
        assert key in ratios
    assert {"index", "score", "importance", "sparsity"} <= set(ratios["layers"][0])
    planned = [layer["sparsity"] for layer in ratios["layers"]]
    sizes = ratios["sizes"]
    assert abs(sum(p * s for p, s in zip(planned, sizes)) / sum(sizes) - 0.5) < 1e-3
    assert len(set(round(p, 6) for p in planned)) > 1, "DLP should vary the ratios across layers"
    # the realized sparsity per layer, read back from the saved safetensors, follows the plan
    model = AutoModelForCausalLM.from_pretrained(out)  # plain HF loading works
    spec = spec_for(model)
    realized = _layer_sparsities(out, spec)
    assert len(realized) == len(planned)
    for r, p in zip(realized, planned):
        assert abs(r - p) < 0.02, (realized, planned)
    assert abs(ratios["realized_sparsity"] - 0.5) < 0.01
    assert (run.path / "ratios.png").stat().st_size > 0


def test_stage_skip_recompute_and_force(tiny_llama_dir, corpus_file, tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = _prune_cfg(tiny_llama_dir, corpus_file)
    stages.prune(run, cfg)
    first = run.manifest()["stages"]
    stages.prune(run, cfg)  # same arguments: every stage skips
    assert run.manifest()["stages"] == first
    cfg2 = _prune_cfg(tiny_llama_dir, corpus_file, sparsity=0.6)  # changed argument: allocate + prune recompute
    stages.prune(run, cfg2)
    second = run.manifest()["stages"]
    assert second["calibrate"] == first["calibrate"]
    assert second["allocate"]["finished"] >= first["allocate"]["finished"]
    assert second["allocate"]["args"]["sparsity"] == 0.6
    assert json.loads((run.path / "ratios.json").read_text())["target_sparsity"] == 0.6
    realized = _layer_sparsities(run.path / "model", spec_for(models.load(models.resolve(str(run.path)))[0]))
    assert abs(sum(realized) / len(realized) - 0.6) < 0.02
    calib_mtime = (run.path / stages.CALIB_STATS).stat().st_mtime_ns
    stages.prune(run, cfg2, force=True)
    assert (run.path / stages.CALIB_STATS).stat().st_mtime_ns != calib_mtime


def test_nm_pattern_end_to_end(tiny_llama_dir, corpus_file, tmp_path):
    run = RunDir(tmp_path / "run")
    out = stages.prune(run, _prune_cfg(tiny_llama_dir, corpus_file, allocator="uniform", pattern="2:4"))
    tensors = load_file(str(next(out.glob("*.safetensors"))))
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert bool((groups == 2).all())


def test_walker_replays_the_model(tiny_model_dir, corpus_file):
    model, tok = models.load(models.resolve(str(tiny_model_dir)))
    ids = data.calibration_windows(tok, data.load_text(f"file:{corpus_file}"), 3, 32, 0)
    hidden, args, kwargs = walker.capture_inputs(model, ids)
    x = hidden
    for layer in decoder_layers(model):
        x = walker.run_layer(layer, x, args, kwargs, "cpu", chunk=2)  # chunks use batch-1 kwargs by broadcasting
    ref = model(ids, output_hidden_states=True).hidden_states
    # the last hidden state may have the final norm applied; compare the input of the last layer instead
    x2 = hidden
    for layer in list(decoder_layers(model))[:-1]:
        x2 = walker.run_layer(layer, x2, args, kwargs, "cpu", chunk=3)
    assert torch.allclose(x2, ref[-2], atol=1e-5)


def test_walker_sequential_groups_and_stats(tiny_llama_dir, corpus_file):
    model, tok = models.load(models.resolve(str(tiny_llama_dir)))
    ids = data.calibration_windows(tok, data.load_text(f"file:{corpus_file}"), 4, 32, 0)
    seen = []

    def on_layer(i, layer, stats):
        seen.append((i, tuple(stats)))
        for s in stats.values():
            assert s.ntokens == 4 * 32
            h = s.hessian
            assert torch.allclose(h, h.t(), atol=1e-4) and torch.allclose(torch.diagonal(h), 2 * s.col_norm ** 2 / s.ntokens, rtol=1e-3)
        return False

    walker.walk(model, ids, on_layer, needs=("col_norm", "hessian"), sequential=True)
    spec = spec_for(model)
    assert seen[: len(spec.groups)] == [(0, g) for g in spec.groups]


def test_wikipedia_summaries_match_shared_file():
    if not CALIB.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    text = data.load_text("wikipedia-summaries")
    digest = hashlib.sha256(text.joined.encode()).hexdigest()
    assert digest == hashlib.sha256(CALIB.read_bytes()).hexdigest()
    held = data.load_text("wikipedia-summaries-heldout")
    assert not set(held.docs[:50]) & set(text.docs)


def test_windows(tiny_tokenizer, corpus_file):
    text = data.load_text(f"file:{corpus_file}")
    a = data.calibration_windows(tiny_tokenizer, text, 5, 40, seed=1)
    b = data.calibration_windows(tiny_tokenizer, text, 5, 40, seed=1)
    c = data.calibration_windows(tiny_tokenizer, text, 5, 40, seed=2)
    assert a.shape == (5, 40) and torch.equal(a, b) and not torch.equal(a, c)
    w = data.eval_windows(tiny_tokenizer, text, 50, max_windows=3)
    full = tiny_tokenizer(text.joined, add_special_tokens=False).input_ids
    assert w.shape == (3, 50) and w.flatten().tolist() == full[:150]
    with pytest.raises(UserError):
        data.eval_windows(tiny_tokenizer, data.Text("t", ["a b"], "a b"), 50)


# ------------------------------------------------------------------------------------------ CLI contract
_cli = run_cli


def test_cli_allocate_and_eval(tiny_llama_dir, corpus_file, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, out, err = _cli(["calibrate", str(tiny_llama_dir), "--out", str(run), "--calib", f"file:{corpus_file}",
                           "--nsamples", "4", "--seqlen", "32", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0, err
    for allocator in ("uniform", "owl", "dlp"):
        code, out, err = _cli(["allocate", str(run), "--sparsity", "0.7", "--allocator", allocator], monkeypatch, capsys)
        assert code == 0, err
        doc = json.loads((run / "ratios.json").read_text())
        assert doc["allocator"] == allocator and "layers" in doc
    code, out, err = _cli(["eval", str(tiny_llama_dir), "--data", f"file:{corpus_file}", "--seqlen", "64",
                           "--max-windows", "2", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0 and "perplexity" in out, err


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 10)
    pickle_only = tmp_path / "pickle_only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x00")
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(gpt2)
    return dict(empty=empty, latin=latin, short=short, corrupt=corrupt, pickle_only=pickle_only, gpt2=gpt2,
                missing=tmp_path / "nope.gguf")


BAD = [
    ("sparsity above 1", ["prune", "{model}", "--out", "{run}", "--sparsity", "1.5"], "sparsity"),
    ("sparsity zero", ["prune", "{model}", "--out", "{run}", "--sparsity", "0"], "sparsity"),
    ("N >= M", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--allocator", "uniform", "--pattern", "4:4"], "4:4"),
    ("bad pattern", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--pattern", "dense"], "pattern"),
    ("N:M with dlp", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--pattern", "2:4"], "uniform"),
    ("unknown method", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--method", "obc"], "method"),
    ("unknown allocator", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--allocator", "best"], "allocator"),
    ("missing gguf", ["prune", "{missing}", "--out", "{run}", "--sparsity", "0.5"], "does not exist"),
    ("corrupt model", ["prune", "{corrupt}", "--out", "{run}", "--sparsity", "0.5", "--device", "cpu"], "corrupt"),
    ("pickle weights", ["prune", "{pickle_only}", "--out", "{run}", "--sparsity", "0.5"], "pickle"),
    ("unknown arch", ["prune", "{gpt2}", "--out", "{run}", "--sparsity", "0.5", "--calib", "file:{corpus}",
                      "--nsamples", "2", "--seqlen", "16", "--device", "cpu"], "architecture"),
    ("empty calib", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--calib", "file:{empty}",
                     "--device", "cpu"], "empty"),
    ("non-utf8 calib", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--calib", "file:{latin}",
                        "--device", "cpu"], "UTF-8"),
    ("too few tokens", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--calib", "file:{short}",
                        "--seqlen", "64", "--nsamples", "2", "--device", "cpu"], "fewer"),
    ("alpha infeasible", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--alpha", "0.9",
                          "--calib", "file:{corpus}", "--nsamples", "2", "--seqlen", "16", "--device", "cpu"], "α"),
    ("cuda without gpu", ["prune", "{model}", "--out", "{run}", "--sparsity", "0.5", "--device", "cuda"], "cuda"),
    ("allocate before calibrate", ["allocate", "{run}", "--sparsity", "0.5"], "calibrat"),
    ("bad stat", ["allocate", "{run}", "--sparsity", "0.5", "--dlp-stat", "mode"], "stat"),
    ("unknown eval data", ["eval", "{model}", "--data", "imagenet"], "source"),
    ("bad option type", ["prune", "{model}", "--out", "{run}", "--sparsity", "lots"], "sparsity"),
]


@pytest.mark.parametrize("name,argv,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, argv, needle, bad_files, tiny_llama_dir,
                                                         corpus_file, tmp_path, monkeypatch, capsys):
    if name == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = tmp_path / "badrun"
    subs = {k: str(v) for k, v in bad_files.items()} | {"model": str(tiny_llama_dir), "run": str(run),
                                                      "corpus": str(corpus_file)}
    code, out, err = _cli([a.format(**subs) for a in argv], monkeypatch, capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("calibrate", "prune", "perplexity"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert not run.exists() or not any(run.iterdir()), list(run.iterdir())


def test_one_resume_key_for_manifest_records_and_deployments(tmp_path):
    from pathlib import Path as P

    from sparsedeploy.pipeline.rundir import is_current, stage_key

    key = stage_key({"seqlen": 64, "out": P("/x")}, {"fingerprint": "abc", "source": P("/run")})
    assert key == {"args": {"seqlen": 64, "out": "/x"}, "inputs": {"fingerprint": "abc", "source": "/run"}}
    run = RunDir(tmp_path / "r")
    run.mark_done("s", {"seqlen": 64, "out": P("/x")}, {"fingerprint": "abc", "source": P("/run")}, 1.0)
    rec = run.stage("s")
    assert is_current(rec, key) and run.is_done("s", {"seqlen": 64, "out": "/x"}, {"fingerprint": "abc", "source": "/run"})
    assert not run.is_done("s", {"seqlen": 32, "out": "/x"}, {"fingerprint": "abc", "source": "/run"})
    assert not is_current(dict(rec, inputs={"fingerprint": "other", "source": "/run"}), key)
    assert not is_current(None, key) and not is_current({"args": key["args"]}, key)
