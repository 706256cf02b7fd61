"""A deployment folder (what `sparsedeploy export` writes), read and checked without torch."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

ONNX_NAME = "model.onnx"
DEPLOY_META = "sparsedeploy.json"
DEPLOY_FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_deployment(deployment_dir: str | Path) -> dict:
    """Check a deployment folder and return its sparsedeploy.json metadata (plus `dir` and `onnx`).
    Missing or unreadable files raise a one-line UserError. Needs no torch."""
    d = Path(deployment_dir)
    if not d.is_dir():
        raise UserError(f"deployment folder {d} does not exist", "write one with write_deployment / `sparsedeploy export`")
    for name in (*DEPLOY_FILES, DEPLOY_META):
        f = d / name
        if not f.is_file() or f.stat().st_size == 0:
            raise UserError(f"deployment {d} is missing {name}", "re-export the deployment")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", DEPLOY_META):
        try:
            json.loads((d / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"deployment {d}: {name} is not valid JSON ({type(e).__name__})", "re-export the deployment")
    meta = json.loads((d / DEPLOY_META).read_text(encoding="utf-8"))
    for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "seqlen", "input_names", "output_names"):
        if key not in meta:
            raise UserError(f"deployment {d}: {DEPLOY_META} lacks '{key}'", "re-export the deployment")
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
    meta["dir"] = str(d)
    meta["onnx"] = str(d / ONNX_NAME)
    return meta
