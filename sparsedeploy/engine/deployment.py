"""A deployment folder (what `sparsedeploy export` writes), read and checked without torch."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

ONNX_NAME = "model.onnx"
DEPLOY_META = "sparsedeploy.json"
DEPLOY_FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


NATIVE_ONLY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
NATIVE_INDEX = "native/native.json"


def read_deployment(deployment_dir: str | Path) -> dict:
    """Check a deployment folder and return its sparsedeploy.json metadata (plus `dir` and `onnx`).
    Missing or unreadable files raise a one-line UserError. Needs no torch.
    A native-only deployment (`native_only` in sparsedeploy.json: config, tokenizer, native/, no graph; written
    by `sparsedeploy export MODEL --format native`) is checked for those files; its `onnx` names the graph it
    does not have, beside native/, where the native engine looks for its weights."""
    d = Path(deployment_dir)
    if not d.is_dir():
        raise UserError(f"deployment folder {d} does not exist", "write one with write_deployment / `sparsedeploy export`")
    f = d / DEPLOY_META
    if not f.is_file() or f.stat().st_size == 0:
        raise UserError(f"deployment {d} is missing {DEPLOY_META}", "re-export the deployment")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"deployment {d}: {DEPLOY_META} is not valid JSON ({type(e).__name__})", "re-export the deployment")
    if not isinstance(meta, dict):
        raise UserError(f"deployment {d}: {DEPLOY_META} is not a JSON object", "re-export the deployment")
    native_only = bool(meta.get("native_only"))
    for name in (*(NATIVE_ONLY_FILES + (NATIVE_INDEX,) if native_only else DEPLOY_FILES),):
        f = d / name
        if not f.is_file() or f.stat().st_size == 0:
            raise UserError(f"deployment {d} is missing {name}", "re-export the deployment")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 *(() if native_only else ("special_tokens_map.json",))):
        try:
            json.loads((d / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"deployment {d}: {name} is not valid JSON ({type(e).__name__})", "re-export the deployment")
    for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "seqlen", "input_names", "output_names"):
        if key not in meta:
            raise UserError(f"deployment {d}: {DEPLOY_META} lacks '{key}'", "re-export the deployment")
    meta["dir"] = str(d)
    meta["onnx"] = str(d / ONNX_NAME)
    if native_only:
        return meta
    try:
        import onnx

        proto = onnx.load(str(d / ONNX_NAME), load_external_data=False)
        names = [i.name for i in proto.graph.input]
        data_files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise UserError(f"deployment {d}: model.onnx is not a readable ONNX model ({type(e).__name__})",
                        "re-export the deployment") from None
    if names != meta["input_names"]:
        raise UserError(f"deployment {d}: model.onnx inputs do not match {DEPLOY_META}", "re-export the deployment")
    for name in data_files:
        if not (d / name).is_file():
            raise UserError(f"deployment {d} is missing the weights file {name}", "re-export the deployment")
    return meta


def native_only_io(onnx_path: str | Path) -> dict | None:
    """The graph IO (graphio.model_io's dict) of a native-only deployment whose graph `onnx_path` would be, from
    its sparsedeploy.json; None when the folder is not one."""
    d = Path(onnx_path).parent
    try:
        meta = json.loads((d / DEPLOY_META).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not meta.get("native_only") or not (d / NATIVE_INDEX).is_file():
        return None
    names = list(meta["input_names"])
    past = [n for n in names if n.startswith("past_key_values.")]
    return {"max_positions": meta.get("max_positions"), "input_names": names, "output_names": list(meta["output_names"]),
            "past_names": past, "present_names": ["present." + n[len("past_key_values."):] for n in past],
            "kv_heads": int(meta["num_kv_heads"]), "head_dim": int(meta["head_dim"]),
            "vocab_size": int(meta["vocab_size"]), "data_files": [], "native_only": True}
