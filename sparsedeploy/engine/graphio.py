"""Graph IO of a KV-cache text-generation ONNX file: names, cache geometry, static copies (onnx only)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError

CACHE_INPUT_PREFIX = "past_key_values."
CACHE_OUTPUT_PREFIX = "present."


def _io_from_proto(proto, path: Path) -> dict:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    outputs = [o.name for o in proto.graph.output]
    past = [n for n in names if n.startswith(CACHE_INPUT_PREFIX)]
    if not past or "input_ids" not in names or "logits" not in outputs:
        raise UserError(f"{path} is not a KV-cache text-generation graph", "export it with `sparsedeploy export`")
    dims = inputs[names.index(past[0])].type.tensor_type.shape.dim
    data_files = sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
    vocab = proto.graph.output[outputs.index("logits")].type.tensor_type.shape.dim[2].dim_value or None
    props = {p.key: p.value for p in proto.metadata_props}
    max_pos = int(props["sparsedeploy.max_positions"]) if "sparsedeploy.max_positions" in props else None
    return {"max_positions": max_pos, "input_names": names, "output_names": outputs, "past_names": past,
            "present_names": [CACHE_OUTPUT_PREFIX + n[len(CACHE_INPUT_PREFIX):] for n in past],
            "kv_heads": dims[1].dim_value, "head_dim": dims[3].dim_value, "vocab_size": vocab, "data_files": data_files}


def load_header(path: Path):
    """The graph without external weights (inline weights are parsed too: ~2 s for a 0.5 GB file)."""
    import onnx

    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist", "export the model first")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a parse failure of any kind means a corrupt file
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})", "re-export the model") from None


_IO_CACHE: dict[tuple, dict] = {}


def model_io(onnx_path: str | Path) -> dict:
    """Names and cache geometry of a KV-cache graph (cached per file version)."""
    path = Path(onnx_path).resolve()
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _IO_CACHE:
        return dict(_IO_CACHE[key])
    if key is None:                  # no graph: a native-only deployment's IO comes from its sparsedeploy.json
        from .deployment import native_only_io

        io = native_only_io(path)
        if io is not None:
            return io
    io = _io_from_proto(load_header(path), path)
    if key is not None:
        _IO_CACHE.clear()
        _IO_CACHE[key] = io
    return dict(io)


def static_copy(onnx_path: str | Path, dest_dir: str | Path, *, seq_len: int, cache_len: int,
                batch: int = 1) -> Path:
    """Copy model.onnx (and its external weights) into dest_dir with every input shape fixed for (L, S).
    DeepSparse rewrites the file it is given, so it only ever sees such a copy."""
    import onnx

    src = Path(onnx_path)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    proto = load_header(src)
    io = _io_from_proto(proto, src)
    for name in io["data_files"]:
        shutil.copy2(src.parent / name, dest / name)
    L, S = int(seq_len), int(cache_len)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in io["input_names"]:
            continue
        dims[0].dim_value = batch
        if inp.name in ("input_ids", "positions"):
            dims[1].dim_value = L
        elif inp.name == "attention_mask":
            dims[1].dim_value = S
        elif inp.name == "causal_mask":
            dims[2].dim_value = L
            dims[3].dim_value = S
        elif inp.name.startswith(CACHE_INPUT_PREFIX):
            dims[2].dim_value = S - L
    out = dest / src.name
    onnx.save_model(proto, str(out))
    return out

