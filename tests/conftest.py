"""Shared fixtures: tiny random Llama (GQA) and OPT models with a small trained tokenizer, and paths
to the real text in ../shared/data when it is there."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import sparsedeploy  # noqa: F401  (sets NM_DISABLE_ANALYTICS before anything imports deepsparse)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "calib" / "wikipedia-summaries.txt"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _corpus() -> str:
    if CALIB.is_file():
        return CALIB.read_text(encoding="utf-8")[:400_000]
    words = "the cat sat on a mat while dogs ran far away from home and birds sang songs".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[int(i)] for i in torch.randint(len(words), (60_000,), generator=g))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(_corpus(), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, corpus_file):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _build(kind: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    else:
        cfg = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init leaves near-uniform column norms; vary the input scales so allocators see real differences.
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2:
                p.mul_(1.0 + 0.5 * i / 10)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = _build(request.param, len(tiny_tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama-only")
    _build("llama", len(tiny_tokenizer)).save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out
