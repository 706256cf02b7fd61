"""A test model saved as a bf16 Hugging Face folder in small safetensors shards (the streamed paths' input)."""
from __future__ import annotations

from pathlib import Path


def save_bf16_shards(model_dir: Path, out: Path, max_shard_size: str = "40KB") -> Path:
    """model_dir's weights in bf16, sharded, with its tokenizer and other side files (config.json as saved)."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(out, max_shard_size=max_shard_size)
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out
