"""Checks that a deployment is faithful: same greedy tokens as PyTorch, and the planned weight sparsity.

Failures of the check itself raise `VerificationError` (a UserError, so the CLI prints one line);
missing or corrupt deployment files raise a plain UserError naming the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .onnx_kv import read_deployment


class VerificationError(UserError):
    """The deployment does not reproduce the model (tokens or sparsity differ)."""


def _prompt_list(prompt_ids) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    ids = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    if not ids:
        raise UserError("the prompt is empty", "give at least one token id")
    return ids


@torch.no_grad()
def _greedy_torch(model, prompt_ids, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the gap between the best and second-best logit."""
    ids = _prompt_list(prompt_ids)
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    past = None
    tokens, margins = [], []
    was_training = model.training
    model.eval()
    try:
        for _ in range(n):
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            last = out.logits[0, -1].float()
            top = torch.topk(last, 2).values if last.numel() > 1 else torch.cat([last, last])
            tok = int(last.argmax())
            tokens.append(tok)
            margins.append(float(top[0] - top[1]))
            x = torch.tensor([[tok]], dtype=torch.long, device=device)
    finally:
        if was_training:
            model.train()
    return tokens, margins


def greedy_torch(model, prompt_ids, n: int) -> list[int]:
    """`n` greedy tokens from the PyTorch model (its own KV cache; EOS does not stop it)."""
    return _greedy_torch(model, prompt_ids, n)[0]


def verify_tokens(deployment_dir: str | Path, model, prompt_ids, n: int = 16, *, engine: str = "onnxruntime",
                  cores: int | None = None) -> dict:
    """Greedy tokens of the deployment (ONNX Runtime in this process; DeepSparse in a worker process) must equal
    PyTorch's. Returns {"tokens", "engine", "prompt_len", "n"}; raises VerificationError naming the first
    differing step and PyTorch's top-2 logit gap there (a gap near 0 means a numerical tie, not a bug)."""
    from ..engine.decode import greedy_decode
    from ..engine.onnxruntime import OrtRuntime
    from ..engine.worker import WorkerRuntime

    meta = read_deployment(deployment_dir)
    prompt = _prompt_list(prompt_ids)
    if n < 1:
        raise UserError(f"n={n}", "verify at least one token")
    S = int(meta["seqlen"])
    if len(prompt) + n > S:
        raise UserError(f"{len(prompt)} prompt + {n} new tokens do not fit the deployment's seqlen {S}",
                        "use a shorter prompt or fewer tokens (beyond seqlen the oldest cache entries are dropped)")
    if meta["vocab_size"] != model.config.vocab_size or meta["num_layers"] != model.config.num_hidden_layers:
        raise VerificationError(f"deployment {deployment_dir} was exported from a different model "
                                f"(vocab {meta['vocab_size']}, {meta['num_layers']} layers)", "re-export it from this model")
    maxpos = meta.get("max_positions")
    if engine == "onnxruntime":
        try:
            rt = OrtRuntime(meta["onnx"], cores=cores, seq_len=None, cache_len=S)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's load errors are long; one line is enough
            raise UserError(f"deployment {deployment_dir}: ONNX Runtime cannot load model.onnx "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})", "re-export the deployment") from None
        try:
            got = greedy_decode(rt, prompt, n, prefill=rt, max_positions=maxpos)
        finally:
            rt.close()
    else:
        with WorkerRuntime(engine, meta["onnx"], cores=cores, seq_len=1, cache_len=S) as rt:
            got = rt.decode(prompt, n, max_positions=maxpos)
    ref, margins = _greedy_torch(model, prompt, n)
    if got.tokens != ref:
        i = next(j for j, (a, b) in enumerate(zip(got.tokens, ref)) if a != b)
        raise VerificationError(
            f"{got.engine} greedy tokens differ from PyTorch's at step {i} of {n} "
            f"(engine {got.tokens[i]}, torch {ref[i]}; torch's top-2 logit gap there {margins[i]:.2e}; "
            f"engine {got.tokens[:i + 1]} vs torch {ref[:i + 1]})",
            "a gap near 0 is a numerical tie: retry with another prompt; otherwise re-export and report it")
    return {"tokens": got.tokens, "engine": got.engine, "prompt_len": len(prompt), "n": n}


# --------------------------------------------------------------------------------------------- sparsity
def _linear_name(initializer: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` (or `...weight.matmul`) -> `model.layers.0.mlp.up_proj`."""
    for suffix in (".weight.matmul", ".weight"):
        if initializer.endswith(suffix):
            return initializer[: -len(suffix)]
    return initializer


def _load_onnx(onnx_path: str | Path):
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist", "export the model first")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable ONNX model with its weights ({type(e).__name__})",
                        "re-export the model") from None


def _counts_sparseml(proto) -> dict[str, tuple[int, int]]:
    import sparsedeploy  # noqa: F401  (NM_DISABLE_ANALYTICS before sparseml loads)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sparseml.onnx.utils import onnx_nodes_sparsities
    _, per_node = onnx_nodes_sparsities(proto)
    out: dict[str, tuple[int, int]] = {}
    for key, m in per_node.items():
        weight = key.split("_inp=", 1)[1] if "_inp=" in key else key
        out[weight] = (int(m.params_zero_count), int(m.params_count))
    return out


def _counts_own(proto) -> dict[str, tuple[int, int]]:
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    out: dict[str, tuple[int, int]] = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        names = [x for x in node.input[:2] if x in inits]
        if len(names) != 1 or names[0] in out:
            continue
        arr = numpy_helper.to_array(inits[names[0]])
        out[names[0]] = (int(arr.size - np.count_nonzero(arr)), int(arr.size))
    return out


SPARSEML_MAX_NODES = 1500   # its onnx_nodes_sparsities scans every initializer per node: minutes on SmolLM2


def weight_zero_counts(onnx_path: str | Path, counter: str = "auto") -> tuple[dict[str, tuple[int, int]], str]:
    """{linear name: (zeros, size)} for every constant weight of a MatMul/Gemm, and which counter produced it.

    counter: "sparseml" (its onnx_nodes_sparsities), "own" (a direct count of the initializers), or "auto":
    SparseML for graphs up to SPARSEML_MAX_NODES nodes (its lookups are quadratic in the graph size; the two
    agree exactly, see tests/test_export.py), our own count beyond that or when SparseML fails."""
    proto = _load_onnx(onnx_path)
    use_sparseml = counter == "sparseml" or (counter == "auto" and len(proto.graph.node) <= SPARSEML_MAX_NODES)
    raw = None
    if use_sparseml:
        try:
            raw, source = _counts_sparseml(proto), "sparseml"
        except Exception:  # noqa: BLE001 - SparseML is optional here; the own counter gives the same numbers
            if counter == "sparseml":
                raise
    if raw is None:
        raw, source = _counts_own(proto), "own"
    out: dict[str, tuple[int, int]] = {}
    for init, (z, n) in raw.items():
        name = _linear_name(init)
        if name in out:                         # one weight under two names (should not happen): sum
            z0, n0 = out[name]
            z, n = z + z0, n + n0
        out[name] = (z, n)
    return out, source


def onnx_weight_sparsity(onnx_path: str | Path) -> dict[str, float]:
    """Fraction of exact zeros of each weight feeding a MatMul/Gemm, keyed by the torch linear's name
    (e.g. `model.layers.3.mlp.up_proj`, `lm_head`) where the export could map it, else the initializer name."""
    counts, _ = weight_zero_counts(onnx_path)
    return {name: z / n for name, (z, n) in counts.items() if n}


def verify_sparsity(onnx_path: str | Path, planned: dict[str, float], tol: float = 0.01, *,
                    counts: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """Each planned key must match the exported weights' zero fraction within `tol` (absolute).

    A key is a linear's name (`model.layers.0.self_attn.q_proj`) or any prefix of such names
    (`model.layers.0`: all its linears, weighted by size). Returns the measured fraction per key."""
    if not planned:
        raise UserError("the sparsity plan is empty", "pass {linear or layer name: fraction}")
    if not 0 <= tol < 1:
        raise UserError(f"tol={tol} must be in [0, 1)", "use e.g. tol=0.01")
    bad_values = [k for k, v in planned.items() if not isinstance(v, (int, float)) or not 0 <= float(v) <= 1]
    if bad_values:
        raise UserError(f"planned sparsity of {bad_values[0]} is not a fraction in [0, 1]", "give fractions, e.g. 0.5")
    if counts is None:
        counts, _ = weight_zero_counts(onnx_path)
    measured: dict[str, float] = {}
    missing, off = [], []
    for key, want in planned.items():
        parts = [(z, n) for name, (z, n) in counts.items() if name == key or name.startswith(key + ".")]
        if not parts:
            missing.append(key)
            continue
        z = sum(p[0] for p in parts)
        n = sum(p[1] for p in parts)
        measured[key] = z / n
        if abs(measured[key] - float(want)) > tol:
            off.append((abs(measured[key] - float(want)), key, float(want), measured[key]))
    if missing:
        raise VerificationError(f"{len(missing)} planned weights are not in {onnx_path} (e.g. {missing[0]})",
                                "export the pruned model itself, or check the plan's names")
    if off:
        off.sort(reverse=True)
        _, key, want, got = off[0]
        raise VerificationError(f"{len(off)} weights miss their planned sparsity by more than {tol:g} "
                                f"(worst {key}: planned {want:.4f}, exported {got:.4f})",
                                "export the pruned model (not the dense one) and check the pruning step")
    return measured
