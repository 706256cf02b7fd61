"""The OpenAI-compatible surface of `sparsedeploy serve` against references and real clients.

References: PyTorch's log-softmax of the same tiny model on the same token ids (prompt scoring, generated
tokens' log-probabilities, lm-eval's score), transformers' `apply_chat_template` (the chat prompt), and the
server's own /v1/completions (the chat endpoint's text). Clients: the official `openai` package and lm-eval's
`local-completions` model, both against a live server on loopback.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from sparsedeploy.serve.app import Settings, create_app

from .serve_helpers import running, sse_events

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SEQLEN = 160
# the tiny tokenizer's own tokens in SmolLM2-Instruct's template layout (its real template names <|im_start|>)
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<s>system\nYou are a tiny test model</s>\n' }}{% endif %}"
            "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>' + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama_dir) -> Path:
    from sparsedeploy.export.stage import export

    return export(str(tiny_llama_dir), seqlen=SEQLEN, out=tmp_path_factory.mktemp("api") / "deployment")


@pytest.fixture(scope="module")
def torch_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def torch_logprobs(model, ids) -> np.ndarray:
    """[len(ids), V] log-probabilities; row t predicts ids[t + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def token_ids(deployment, text) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(deployment / "tokenizer.json")).encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------------- engine: scoring
def test_score_tokens_equal_pytorch_log_softmax_chunked_and_token_by_token(deployment, torch_model):
    from sparsedeploy.engine.decode import score_tokens
    from sparsedeploy.engine.onnxruntime import OrtRuntime
    from sparsedeploy.engine.worker import WorkerRuntime

    ids = token_ids(deployment, "The history of the city began when the river was crossed by a bridge")
    assert 20 < len(ids) < SEQLEN
    ref = torch_logprobs(torch_model, ids)
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    rt = OrtRuntime(deployment / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN)
    for chunk in (1, 8, 64):                       # token by token, several chunks + singles, one chunk
        res = score_tokens(rt, ids, 3, chunk=chunk)
        assert res.token_logprobs[0] is None and res.top_logprobs[0] is None and len(res.token_logprobs) == len(ids)
        assert np.allclose(res.token_logprobs[1:], want, atol=2e-4), chunk
        for t in range(1, len(ids)):
            top = res.top_logprobs[t]
            assert [i for i, _ in top] == [int(i) for i in np.argsort(-ref[t - 1], kind="stable")[:3]]
            assert np.allclose([lp for _, lp in top], np.sort(ref[t - 1])[::-1][:3], atol=2e-4)
    with WorkerRuntime("onnxruntime", deployment / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN) as w:
        res = w.score(ids, 0)
    assert np.allclose(res.token_logprobs[1:], want, atol=2e-4) and res.top_logprobs[1:] == [[]] * (len(ids) - 1)
    # the native engine (chunks of any L through its own kernels), in its worker
    from sparsedeploy.engine.deployment import read_deployment
    from sparsedeploy.export.native import ensure_native

    ensure_native(read_deployment(deployment))
    with WorkerRuntime("native", deployment / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN) as w:
        res = w.score(ids, 1)
    assert np.allclose(res.token_logprobs[1:], want, atol=5e-4)
    assert [top[0][0] for top in res.top_logprobs[1:]] == [int(np.argmax(ref[t - 1])) for t in range(1, len(ids))]


def test_generated_tokens_logprobs_equal_pytorch(deployment, torch_model):
    from sparsedeploy.engine.decode import sample_decode
    from sparsedeploy.engine.onnxruntime import OrtRuntime

    prompt = token_ids(deployment, "the cat sat on")
    rt = OrtRuntime(deployment / "model.onnx", cores=1, seq_len=1, cache_len=SEQLEN)
    res = sample_decode(rt, prompt, 12, temperature=0.0, logprobs=2)
    assert len(res.logprobs) == len(res.tokens) == 12
    ref = torch_logprobs(torch_model, prompt + res.tokens)
    for i, (tok, (lp, top)) in enumerate(zip(res.tokens, res.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp - row[tok]) < 2e-4
        assert top[0][0] == tok and top[0][1] == lp      # greedy: the chosen token is the most likely one
        assert len(top) == 2 and top[1][1] <= top[0][1]
    assert sample_decode(rt, prompt, 4, temperature=0.0).logprobs is None


# ----------------------------------------------------------------------------------- the HTTP API
@pytest.fixture(scope="module")
def chat_deployment(deployment, tmp_path_factory) -> Path:
    """The same deployment with a chat template (the tiny tokenizer has none of its own)."""
    out = tmp_path_factory.mktemp("api-chat") / "deployment"
    shutil.copytree(deployment, out)
    (out / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def server(chat_deployment):
    app = create_app(Settings(str(chat_deployment), engine="onnxruntime", cores=1, queue_size=4, timeout_s=60))
    with running(app) as url:
        yield url


def post(url, path, body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_echo_and_logprobs_score_the_prompt_as_pytorch_does(server, chat_deployment, torch_model):
    url = server
    text = "The history of the city began when the river"
    ids = token_ids(chat_deployment, text)
    ref = torch_logprobs(torch_model, ids)
    doc = post(url, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    ch = doc["choices"][0]
    assert ch["text"] == text and doc["usage"]["completion_tokens"] == 0 and doc["usage"]["prompt_tokens"] == len(ids)
    lp = ch["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert np.allclose(lp["token_logprobs"][1:], [ref[t - 1, ids[t]] for t in range(1, len(ids))], atol=2e-4)
    assert "".join(lp["tokens"]) == text
    assert [text[o:o + len(s)] for o, s in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    for t in range(1, len(ids)):
        assert len(lp["top_logprobs"][t]) == 2 and max(lp["top_logprobs"][t].values()) == pytest.approx(ref[t - 1].max(), abs=2e-4)
    # token ids as lm-eval sends them ([[ids]]), echo + 3 greedy tokens: prompt part as above, then the generated
    # tokens' log-probabilities, and the text is the prompt's followed by the plain completion's
    plain = post(url, "/v1/completions", {"prompt": text, "max_tokens": 3, "temperature": 0}).json()["choices"][0]["text"]
    doc = post(url, "/v1/completions", {"prompt": [ids], "max_tokens": 3, "temperature": 0, "echo": True,
                                        "logprobs": 1}).json()
    ch = doc["choices"][0]
    assert ch["text"] == text + plain
    lp = ch["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 3
    gen = []                                                           # PyTorch's greedy tokens
    for _ in range(3):
        gen.append(int(np.argmax(torch_logprobs(torch_model, ids + gen)[-1])))
    full = torch_logprobs(torch_model, ids + gen)
    assert np.allclose(lp["token_logprobs"][1:], [full[t - 1, (ids + gen)[t]] for t in range(1, len(ids) + 3)], atol=2e-4)
    assert all(lp["token_logprobs"][t] == max(lp["top_logprobs"][t].values()) for t in range(len(ids), len(ids) + 3))
    assert lp["text_offset"][len(ids)] == len(text)
    # logprobs without echo: the generated tokens only
    lp = post(url, "/v1/completions", {"prompt": text, "max_tokens": 3, "temperature": 0, "logprobs": 0}).json()
    assert len(lp["choices"][0]["logprobs"]["token_logprobs"]) == 3 and lp["choices"][0]["logprobs"]["text_offset"][0] == 0


def sse_docs(url, path, body) -> list[dict]:
    """The JSON documents of a streamed response, [DONE] left out."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_unstreamed_ones(server, echo):
    """Each streamed chunk carries the logprobs of the tokens whose text it releases; together they are the
    unstreamed object, token for token (also when a stop string cuts the text)."""
    url = server
    body = {"prompt": "The history of the city began when the river", "max_tokens": 12, "temperature": 0,
            "logprobs": 2, "echo": echo}
    full = post(url, "/v1/completions", {**body, "echo": False}).json()["choices"][0]["text"]
    assert len(full) >= 4
    for extra in ({}, {"stop": full[len(full) // 2:][:2]}):       # the second cuts the text about half way
        whole = post(url, "/v1/completions", {**body, **extra}).json()["choices"][0]
        docs = sse_docs(url, "/v1/completions", {**body, **extra, "stream": True})
        joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d in docs:
            lp = d["choices"][0]["logprobs"]
            assert lp is not None
            for k in joined:
                joined[k] += lp[k]
        assert "".join(d["choices"][0]["text"] for d in docs) == whole["text"]
        assert joined == whole["logprobs"], extra
        generated = sum(1 for o in joined["text_offset"] if o >= (len(body["prompt"]) if echo else 0))
        assert generated >= (12 if not extra else 1)
        if not echo:                     # a chunk's tokens start inside the text released up to it
            released = 0
            for d in docs:
                released += len(d["choices"][0]["text"])
                if not d["choices"][0]["finish_reason"]:
                    assert all(o < released for o in d["choices"][0]["logprobs"]["text_offset"])


def test_chat_logprobs_streamed_and_not(server, chat_deployment, torch_model):
    url = server
    messages = [{"role": "user", "content": "Tell me about the river"}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    doc = post(url, "/v1/chat/completions", body).json()
    content = doc["choices"][0]["logprobs"]["content"]
    assert len(content) == doc["usage"]["completion_tokens"] >= 1
    special = {"<s>", "</s>", "<unk>"}          # in the token list, not in the reply's text
    # token strings of partial UTF-8 characters do not join up; their bytes do
    assert bytes(b for c in content if c["token"] not in special for b in c["bytes"]).decode("utf-8", "replace") == \
        doc["choices"][0]["message"]["content"]
    for c in content:      # greedy: the chosen token is the most likely, and two alternatives are listed
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"]
        assert c["top_logprobs"][0]["logprob"] == c["logprob"] >= c["top_logprobs"][1]["logprob"]
    # the same log-probabilities as the completions endpoint gives for the templated prompt
    from transformers import AutoTokenizer
    templated = AutoTokenizer.from_pretrained(chat_deployment).apply_chat_template(messages, add_generation_prompt=True,
                                                                                   tokenize=False)
    plain = post(url, "/v1/completions", {"prompt": templated, "max_tokens": 8, "temperature": 0, "logprobs": 0}).json()
    assert [c["logprob"] for c in content] == plain["choices"][0]["logprobs"]["token_logprobs"]
    streamed = []
    for d in sse_docs(url, "/v1/chat/completions", {**body, "stream": True}):
        lp = d["choices"][0]["logprobs"]
        streamed += lp["content"] if lp else []
    assert streamed == content
    assert post(url, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}).json()["choices"][0]["logprobs"] is None


def test_api_refuses_what_it_cannot_do_with_4xx(server, deployment):
    url = server
    cases = [({"prompt": "x", "max_tokens": 0}, 422, "echo"),
             ({"prompt": "x", "logprobs": 6}, 422, "logprobs"),
             ({"prompt": [[1, 2], [3, 4]]}, 422, "prompt"),
             ({"prompt": [1, 10**6]}, 400, "vocabulary"),
             ({"prompt": [-1]}, 422, "prompt")]
    for body, status, needle in cases:
        r = post(url, "/v1/completions", body)
        assert r.status_code == status and needle in r.json()["error"]["message"], (body, r.text)
    for body, status, needle in [({"messages": []}, 422, "messages"),
                                 ({"messages": [{"role": "user"}], "n": 2}, 422, "n"),
                                 ({"messages": [{"role": "user", "content": 5}]}, 422, "content"),
                                 ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 422,
                                  "top_logprobs"),
                                 ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                   "top_logprobs": 6}, 422, "top_logprobs"),
                                 ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens")]:
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == status and needle in r.json()["error"]["message"], (body, r.text)


def test_chat_prompt_is_transformers_chat_template(chat_deployment):
    from transformers import AutoTokenizer

    from sparsedeploy.serve.app import ChatTemplate, Tokenizer

    hf = AutoTokenizer.from_pretrained(chat_deployment)
    ours = Tokenizer(chat_deployment, json.loads((chat_deployment / "config.json").read_text()))
    tpl = ChatTemplate(ours.chat_template, ours.special)
    for messages in ([{"role": "user", "content": "Hello there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]):
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tpl.render(messages) == want
        assert ours.encode(want) == [int(t) for t in hf(want, add_special_tokens=False)["input_ids"]]


def test_openai_sdk_against_the_server(server, chat_deployment, deployment):
    import openai
    from transformers import AutoTokenizer

    url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "the cat sat on"
    raw = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0}).json()
    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert c.choices[0].text == raw["choices"][0]["text"] and c.usage.completion_tokens == raw["usage"]["completion_tokens"]
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == c.choices[0].text
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == prompt and scored.choices[0].logprobs.token_logprobs[0] is None
    echoed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, echo=True,
                                            stream=True))
    assert echoed[0].choices[0].text == prompt and "".join(ch.choices[0].text for ch in echoed) == prompt + c.choices[0].text
    # chat: the reply is the greedy completion of the templated prompt
    messages = [{"role": "user", "content": "Tell me about the river"}]
    templated = AutoTokenizer.from_pretrained(chat_deployment).apply_chat_template(messages, add_generation_prompt=True,
                                                                                   tokenize=False)
    want = post(url, "/v1/completions", {"prompt": templated, "max_tokens": 12, "temperature": 0}).json()
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want["choices"][0]["text"]
    assert r.choices[0].finish_reason == want["choices"][0]["finish_reason"] and r.object == "chat.completion"
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # logprobs, streamed and not, as the SDK parses them
    lp_chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                               stream=True))
    assert sum(len(ch.choices[0].logprobs.tokens) for ch in lp_chunks) == c.usage.completion_tokens
    rl = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=2)
    assert len(rl.choices[0].logprobs.content) == rl.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in rl.choices[0].logprobs.content)
    # errors surface as the SDK's exceptions
    with pytest.raises(openai.BadRequestError, match="at most"):
        client.completions.create(model="tiny", prompt=" ".join(["the cat sat"] * 200), max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt=prompt, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10**6)
    # a tokenizer without a chat template: a 400 naming the problem (the completions endpoint still works)
    from .serve_helpers import FakeWorker

    bare = create_app(Settings(str(deployment)), worker_factory=lambda: FakeWorker())
    with running(bare) as bare_url:
        other = openai.OpenAI(base_url=f"{bare_url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            other.chat.completions.create(model="tiny", messages=messages)
        assert other.completions.create(model="tiny", prompt=prompt, max_tokens=2).choices[0].text is not None


# ----------------------------------------------------------------------------------- lm-eval
TASK = """task: sd_lastword_wiki
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(url: str, tokenizer_dir: Path, max_length: int, tmp_path: Path) -> tuple[dict, list[dict]]:
    """`lm-eval run --model local-completions` on the last-word task against the server at `url` (offline:
    the tokenizer is the deployment's own folder); returns (the task's results, the logged samples)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sd_lastword_wiki.yaml").write_text(TASK.format(data=DATA / "lastword_wiki.jsonl"), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    args = ",".join(["model=sparsedeploy", f"base_url={url}/v1/completions", f"tokenizer={tokenizer_dir}",
                     "tokenizer_backend=huggingface", "tokenized_requests=True", f"max_length={max_length}",
                     "num_concurrent=1", "max_retries=1"])
    r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                        "--tasks", "sd_lastword_wiki", "--include_path", str(tasks), "--batch_size", "1",
                        "--output_path", str(tmp_path / "out"), "--log_samples"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["sd_lastword_wiki"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_sd_lastword_wiki_*.jsonl"))
               .read_text().splitlines()]
    return results, samples


def check_against_pytorch(results, samples, model, tokenizer_dir: Path, seqlen: int) -> tuple[float, float]:
    """Every item's log-likelihood, the perplexity and the accuracy lm-eval got equal PyTorch's on lm-eval's own
    token split (encode(context + target), the context's tokens first). Returns PyTorch's (perplexity, acc)."""
    from transformers import AutoTokenizer

    items = [json.loads(line) for line in (DATA / "lastword_wiki.jsonl").read_text(encoding="utf-8").splitlines()]
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    lls, greedy = [], []
    for it in items:
        ctx = hf(it["context"], add_special_tokens=False)["input_ids"]
        whole = hf(it["context"] + it["target"], add_special_tokens=False)["input_ids"]
        assert len(whole) < seqlen - 1              # lm-eval truncates nothing, the server takes every item
        lp = torch_logprobs(model, whole)
        lls.append(float(sum(lp[t - 1, whole[t]] for t in range(len(ctx), len(whole)))))
        greedy.append(all(int(np.argmax(lp[t - 1])) == whole[t] for t in range(len(ctx), len(whole))))
    assert len(samples) == len(items) == 40
    by_doc = {s["doc_id"]: s for s in samples}
    got = [float(by_doc[i]["perplexity"]) for i in range(len(items))]      # per item: its log-likelihood
    assert np.allclose(got, lls, atol=1e-3)
    assert [by_doc[i]["acc"] for i in range(len(items))] == [int(g) for g in greedy]
    ppl, acc = math.exp(-float(np.mean(lls))), float(np.mean(greedy))
    assert results["perplexity,none"] == pytest.approx(ppl, rel=1e-3)
    assert results["acc,none"] == pytest.approx(acc)
    print(f"lm-eval: perplexity {results['perplexity,none']:.6g} acc {results['acc,none']:.4f}; "
          f"PyTorch: perplexity {ppl:.6g} acc {acc:.4f}")
    return ppl, acc


def test_lm_eval_local_completions_scores_as_pytorch(server, chat_deployment, torch_model, tmp_path):
    """lm-eval's `local-completions` model against the server (echo + logprobs on token ids) on last-word
    prediction over held-out Wikipedia sentences (tests/data/lastword_wiki.jsonl): its perplexity, accuracy
    and every item's log-likelihood equal PyTorch's (the tiny random model: a huge perplexity, accuracy 0)."""
    results, samples = run_lm_eval(server, chat_deployment, SEQLEN, tmp_path)
    check_against_pytorch(results, samples, torch_model, chat_deployment, SEQLEN)


@pytest.mark.slow
def test_smollm2_lm_eval_and_chat_against_pytorch(tmp_path):
    """The default model (SmolLM2-135M-Instruct, fp32 on ONNX Runtime): lm-eval's last-word score equals PyTorch's
    (a real accuracy this time), and /v1/chat/completions renders its own chat template as transformers does."""
    from transformers import AutoTokenizer

    from sparsedeploy.export.stage import export
    from sparsedeploy.pipeline.models import load, resolve

    import time

    t0 = time.perf_counter()
    model, tokenizer = load(resolve("smollm2-135m"))
    t1 = time.perf_counter()
    dep = export("smollm2-135m", seqlen=64, out=tmp_path / "deployment", head=False, model=model, tokenizer=tokenizer)
    print(f"load {t1 - t0:.1f} s, export {time.perf_counter() - t1:.1f} s")
    assert (dep / "chat_template.jinja").is_file() or "chat_template" in (dep / "tokenizer_config.json").read_text()
    app = create_app(Settings(str(dep), engine="onnxruntime", cores=None, timeout_s=120, prefill_chunk=32))
    with running(app) as url:
        t2 = time.perf_counter()
        results, samples = run_lm_eval(url, dep, 64, tmp_path)
        t3 = time.perf_counter()
        ppl, acc = check_against_pytorch(results, samples, model, dep, 64)
        print(f"lm-eval {t3 - t2:.1f} s, PyTorch reference {time.perf_counter() - t3:.1f} s")
        assert acc > 0.1                            # the real model gets some last words right
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        templated = AutoTokenizer.from_pretrained(dep).apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=False)
        want = post(url, "/v1/completions", {"prompt": templated, "max_tokens": 12, "temperature": 0}).json()
        got = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0}).json()
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["text"] and want["choices"][0]["text"]
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]


def test_a_scoring_job_queues_like_a_generation_and_a_dead_worker_is_a_503():
    """EngineService.submit_score: runs in the engine thread after the generations queued before it; a worker
    that dies during it fails it with 503 and is replaced (as for a generation)."""
    import threading
    import time

    from sparsedeploy.engine.decode import ScoreResult
    from sparsedeploy.serve.engine import EngineService

    from .serve_helpers import FakeWorker

    order = []

    class ScoringWorker(FakeWorker):
        def generate(self, prompt_ids, n, **kw):
            order.append("generate")
            yield from super().generate(prompt_ids, n, **kw)

        def score(self, ids, top_k):
            order.append("score")
            if ids == [666]:
                self._proc.kill()
                raise RuntimeError("the engine worker process died (exit code -9)")
            return ScoreResult(token_logprobs=[None] + [-1.0] * (len(ids) - 1), top_logprobs=[None] + [[]] * (len(ids) - 1),
                               engine="fake", score_ms=0.0)

    workers = []

    def factory():
        workers.append(ScoringWorker(delay=0.02))
        return workers[-1]

    svc = EngineService(factory, queue_size=4)
    try:
        events = {"gen": [], "score": [], "dead": []}
        done = {k: threading.Event() for k in events}

        def sink(key):
            def on_event(ev):
                events[key].append(ev)
                if ev[0] in ("done", "error"):
                    done[key].set()
            return on_event

        deadline = time.monotonic() + 30
        svc.submit([1, 2, 3], 10, {"temperature": 0.0}, deadline, sink("gen"))
        svc.submit_score([1, 2, 3], 2, deadline, sink("score"))
        assert done["gen"].wait(10) and done["score"].wait(10)
        assert order == ["generate", "score"]
        assert events["score"][-1][0] == "done" and events["score"][-1][1].token_logprobs == [None, -1.0, -1.0]
        svc.submit_score([666], 0, deadline, sink("dead"))
        assert done["dead"].wait(10)
        err = events["dead"][-1]
        assert err[0] == "error" and err[1].status == 503 and svc.restarts == 1 and len(workers) == 2
    finally:
        svc.close(timeout=10)
