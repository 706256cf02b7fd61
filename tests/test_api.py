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
SEQLEN = 96
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
