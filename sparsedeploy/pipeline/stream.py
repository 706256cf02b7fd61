"""Streaming a model from its (sharded) safetensors, one decoder layer at a time, and writing one shard by shard.

Layer-sequential methods only ever need one decoder layer at a time, so a model larger than RAM can be
calibrated and pruned. `StreamedModel` builds the model's skeleton on the `meta` device (no memory), gives it
real tensors only for what runs before decoder layer 0 (embeddings, positions, the rotary table), and loads
decoder layer i in float32 from the memory-mapped safetensors when the walker reaches it (`load_layer`), then
returns it to `meta` (`release_layer`). The math is the walker's and the pruners', unchanged: same module
code, same fp32 weights, same inputs, so a streamed walk computes exactly what the in-memory walk computes.

`ShardWriter` writes tensors as they come into shards of at most `max_shard_bytes` plus
model.safetensors.index.json (one shard: a plain model.safetensors), each tensor's bytes straight to the open
file. Residents while streaming: the calibration activations, one decoder layer in fp32 (the embeddings only
until the inputs of layer 0 are captured; see `StreamedModel.release_residents`).
"""
from __future__ import annotations

import ctypes
import functools
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open

from ..errors import UserError
from .arch import ArchSpec, decoder_layers, get_module, spec_for, tied_aliases

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 1 << 30
# Above this many bytes of fp32 weights, `stream=None` (auto) streams instead of loading the whole model.
AUTO_STREAM_BYTES = 4 << 30


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file surfaces as several exception types
        raise UserError(f"{f} is corrupt or not a safetensors file ({type(e).__name__})",
                        "re-save the model with save_pretrained(safe_serialization=True)")


class SafetensorsFolder:
    """Read-only view of a Hugging Face folder's safetensors: tensor names → file, one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index} is corrupt ({type(e).__name__})", "re-save the model with save_pretrained")
            self.files = {name: self.path / f for name, f in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{self.path} holds no safetensors weights", "streaming needs a safetensors model folder")
            self.files = {}
            for f in shards:
                with _open(f) as h:
                    for name in h.keys():
                        self.files[name] = f
        missing = {f for f in self.files.values() if not f.is_file()}
        if missing:
            raise UserError(f"{self.path} lacks weight file {sorted(missing)[0].name}", "copy the complete model folder")
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.path}/config.json is missing or corrupt ({type(e).__name__})", "pass a complete HF folder")
        self._meta: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype (safetensors copies it out; the file is mapped only while reading)."""
        with _open(self.files[name]) as h:
            return h.get_tensor(name)

    def meta(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{name: (dtype string, shape)} from the headers only."""
        if self._meta is None:
            out = {}
            for f in sorted(set(self.files.values())):
                with _open(f) as h:
                    for name in h.keys():
                        sl = h.get_slice(name)
                        out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            self._meta = out
        return self._meta

    def fp32_bytes(self) -> int:
        total = 0
        for _, shape in self.meta().values():
            n = 1
            for d in shape:
                n *= d
            total += 4 * n
        return total


def should_stream(path: str | Path, stream: bool | None) -> bool:
    """`stream` as asked (True/False), or auto (None): stream local safetensors models above AUTO_STREAM_BYTES in fp32."""
    if stream is not None:
        return stream
    p = Path(path)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    try:
        return SafetensorsFolder(p).fp32_bytes() > AUTO_STREAM_BYTES
    except UserError:   # unreadable: the in-memory loader reports it in its own words
        return False


def use_stream(ref, stream: bool | None) -> bool:
    """Whether a stage streams the model `ref` (a models.ModelRef): asked for (True/False), or auto by size."""
    if stream and not ref.local:
        raise UserError(f"--stream needs a local safetensors model folder, not {ref.spec}",
                        "download the model to a folder first, or drop --stream")
    return bool(ref.local and should_stream(ref.path, stream))


def layer_prefix(spec: ArchSpec, i: int) -> str:
    return f"{spec.layers}.{i}."


class StreamedWeights:
    """A model folder's decoder layers as weights on disk: config, arch entry, one layer's linears at a time."""

    def __init__(self, path: str | Path):
        self.src = SafetensorsFolder(path)
        self.config = self.src.config
        self.spec = spec_for(self.config)
        self.n_layers = int(self.config.get("num_hidden_layers") or 0)
        if self.n_layers < 1:
            raise UserError(f"{self.src.path}/config.json has no num_hidden_layers", "pass a complete HF folder")

    def layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        """{linear name: fp32 weight} of decoder layer i's prunable linears, straight from the files."""
        prefix = layer_prefix(self.spec, i)
        try:
            return {name: self.src.get(f"{prefix}{name}.weight").to(torch.float32) for name in self.spec.linears}
        except KeyError as e:
            raise UserError(f"{self.src.path} lacks tensor {e.args[0]}", "pass a complete model folder")


class StreamedModel:
    """A model whose decoder layers live on disk until the walker needs them (see the module docstring)."""

    def __init__(self, path: str | Path):
        from .models import _transformers

        self.src = SafetensorsFolder(path)
        t = _transformers()
        try:
            cfg = t.AutoConfig.from_pretrained(str(self.src.path), trust_remote_code=False, local_files_only=True)
            with torch.device("meta"):
                model = t.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot build the model of {self.src.path} ({type(e).__name__}: {str(e)[:120]})",
                            "check config.json")
        self.model = model.eval()
        self.spec = spec_for(model)
        self.n_layers = len(decoder_layers(model, self.spec))
        self.tied = tied_aliases(model)   # before materializing: to_empty unties the parameters
        self._resident = False
        self.materialize_residents()

    def release_residents(self) -> None:
        """Once the walker has captured the inputs of decoder layer 0, nothing before the layers runs again: the
        input embeddings (a 7B model's are 0.5 GB in fp32, more with a larger vocabulary) go back to meta."""
        self.model.get_input_embeddings().to("meta")
        self._resident = False

    def materialize_residents(self) -> None:
        """Real tensors for every module outside the decoder layers and the lm_head (which the walk never runs):
        parameters from the safetensors, non-persistent buffers (rotary tables) computed as from_pretrained does.
        Idempotent: a walk calls it before capturing layer 0's inputs."""
        if self._resident:
            return
        self._resident = True
        skip = (self.spec.layers + ".", self.spec.lm_head)
        names = set(self.src.names())
        for mname, mod in self.model.named_modules():
            if mname == self.spec.layers or mname.startswith(skip) or mname == self.spec.lm_head:
                continue
            own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            if not own:
                continue
            mod.to_empty(device="cpu", recurse=False)
            self.model._init_weights(mod)
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full in names:
                    getattr(mod, pname).data.copy_(self.src.get(full).to(torch.float32))
                else:
                    raise UserError(f"{self.src.path} lacks tensor {full}", "pass a complete model folder")

    def layer_tensor_names(self, i: int) -> list[str]:
        prefix = layer_prefix(self.spec, i)
        return [n for n in self.src.names() if n.startswith(prefix)]

    def load_layer(self, i: int, layer: nn.Module) -> nn.Module:
        """Decoder layer i in float32 on the CPU, weights read from the safetensors."""
        prefix = layer_prefix(self.spec, i)
        layer.to_empty(device="cpu")
        state = {n[len(prefix):]: self.src.get(n).to(torch.float32) for n in self.layer_tensor_names(i)}
        want = set(layer.state_dict())
        if want - set(state):
            raise UserError(f"{self.src.path} lacks {prefix}{sorted(want - set(state))[0]}", "pass a complete model folder")
        # assign: the layer takes the fp32 tensors just read (no second copy; to_empty's pages are never touched)
        layer.load_state_dict({k: v for k, v in state.items() if k in want}, strict=True, assign=True)
        return layer

    @staticmethod
    def release_layer(layer: nn.Module) -> None:
        layer.to("meta")
        trim_heap()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere). A streamed stage frees a
    whole decoder layer's tensors at a time, and without this freed heap pages stay resident into the next layer
    (streamed GPTQ at LLaMA2-7B shapes, AMD EPYC Zen 5: 0.93 GiB resident between layers without, 0.48 GiB with)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# torch dtype -> the safetensors header's name for it
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
HEADER_RESERVE = 64 << 10   # bytes kept at the start of a shard for its JSON header (padded with spaces)
DTYPES = {name: dt for dt, name in ST_DTYPE.items() if dt.is_floating_point}   # a stored float dtype's torch dtype


class ShardWriter:
    """Writes tensors into shards of at most max_shard_bytes, then the index; atomically per file.

    Each tensor's bytes go to the open shard file as it is added (nothing is buffered: a writer holds no tensor
    data in memory). The header is written last, into HEADER_RESERVE bytes kept at the file's start and padded
    with spaces, as the safetensors format allows; a shard closes early when its header would outgrow that."""

    def __init__(self, out: Path, max_shard_bytes: int | None = None, metadata: dict | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes or MAX_SHARD_BYTES   # looked up now: tests shrink it to get shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self._file = None
        self._entries: dict[str, dict] = {}
        self._header_len = 0
        self._bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []

    def _header(self, entries: dict) -> bytes:
        return json.dumps({"__metadata__": self.metadata, **entries}, separators=(",", ":")).encode()

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in ST_DTYPE:
            raise TypeError(f"{name}: safetensors has no dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        entry = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape)}
        grow = len(json.dumps({name: entry | {"data_offsets": [10 ** 15, 10 ** 15]}}, separators=(",", ":"))) + 1
        if self._entries and (self._bytes + nbytes > self.max or self._header_len + grow > HEADER_RESERVE):
            self._flush()
        if self._file is None:
            self._file = open(self.out / f"part-{len(self._shards):05d}.safetensors", "wb")
            self._file.write(b" " * (8 + HEADER_RESERVE))
            self._header_len = len(self._header({}))
        if self._header_len + grow > HEADER_RESERVE:
            raise ValueError(f"{name}: the tensor's header entry alone exceeds {HEADER_RESERVE} bytes")
        if nbytes:
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = entry | {"data_offsets": [self._bytes, self._bytes + nbytes]}
        self._header_len += grow
        self._bytes += nbytes

    def _flush(self) -> None:
        if self._file is None:
            return
        head = self._header(self._entries)
        assert len(head) <= HEADER_RESERVE, (len(head), self._header_len)
        self._file.seek(0)
        self._file.write(HEADER_RESERVE.to_bytes(8, "little") + head + b" " * (HEADER_RESERVE - len(head)))
        self._file.close()
        self._shards.append((Path(self._file.name).name, list(self._entries), self._bytes))
        self._file, self._entries, self._bytes = None, {}, 0

    def close(self) -> int:
        """Finish: name the shards as Hugging Face does, write the index; returns the bytes of tensor data."""
        self._flush()
        n = len(self._shards)
        total = sum(b for _, _, b in self._shards)
        if n == 1:
            (self.out / self._shards[0][0]).rename(self.out / SINGLE)
            return total
        weight_map = {}
        for k, (tmp, names, _) in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            weight_map.update({t: final for t in names})
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return total


def copy_side_files(src: Path, dst: Path) -> None:
    """Everything of a model folder except its weights (config, tokenizer, generation config)."""
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != INDEX and not f.name.startswith("."):
            shutil.copy2(f, Path(dst) / f.name)


def iter_layer_weights(model_or_stream) -> Iterator[list[torch.Tensor]]:
    """Per decoder layer, its prunable linears' weights in the arch table's order (fp32), from a model or a stream."""
    if isinstance(model_or_stream, StreamedWeights):
        for i in range(model_or_stream.n_layers):
            yield list(model_or_stream.layer_weights(i).values())
        return
    spec = spec_for(model_or_stream)
    for layer in decoder_layers(model_or_stream, spec):
        yield [get_module(layer, name).weight.detach() for name in spec.linears]
