"""The one architecture table (sparsedeploy/arch.py): every reader takes its names from it."""
from __future__ import annotations

import pytest

from sparsedeploy.arch import ARCHS, arch_for, native_arch, native_unsupported
from sparsedeploy.errors import UserError


def test_every_model_type_resolves_to_exactly_one_entry():
    types = [t for a in ARCHS for t in a.model_types]
    assert len(types) == len(set(types))
    for t in types:
        assert t in arch_for({"model_type": t}).model_types
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*sparsedeploy/arch.py"):
        arch_for({"model_type": "gpt2"})


def test_groups_stacks_and_linears_agree():
    for a in ARCHS:
        assert sorted(a.linears) == sorted(n for names in a.stacks().values() for n in names)


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "qwen3"}, "q/k norms"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "'gelu' activation"),
    ({"model_type": "opt", "do_layer_norm_before": False}, "pre-norm OPT"),
])
def test_native_refuses_what_it_cannot_run_in_one_line(config, needle):
    assert needle in native_unsupported(config)
    with pytest.raises(UserError, match="use --engine deepsparse or onnxruntime"):
        native_arch(config)


def test_native_runs_plain_llama_qwen2_and_pre_norm_opt():
    for t in ("llama", "mistral", "qwen2", "opt"):
        assert native_unsupported({"model_type": t, "rope_parameters": {"rope_type": "default"}}) is None


def test_tiny_models_hold_every_tensor_the_table_names(tiny_model_dir):
    import json

    from safetensors import safe_open

    config = json.loads((tiny_model_dir / "config.json").read_text())
    a = arch_for(config)
    with safe_open(str(next(tiny_model_dir.glob("*.safetensors"))), framework="numpy") as f:
        keys = set(f.keys())
    for i in range(int(config["num_hidden_layers"])):
        for name in (*a.linears, a.attn_norm, a.mlp_norm):
            assert f"{a.layers}.{i}.{name}.weight" in keys
    assert f"{a.embed}.weight" in keys and f"{a.final_norm}.weight" in keys
