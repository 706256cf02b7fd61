"""The run directory: artifacts written atomically, and a manifest saying which stages are done with what.

manifest.json = {"stages": {name: {"done", "args", "inputs", "versions", "seconds", "finished"}}}
A stage is skipped when it is done with the same args and inputs; anything else recomputes it.

One resume scheme for every stage, the export included: `stage_key(args, inputs)` is what a record must hold
to be current (`is_current`), whether the record is a manifest entry or a deployment's sparsedeploy.json.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

VERSIONED = ("sparsedeploy", "torch", "transformers", "numpy", "onnx", "onnxruntime", "deepsparse", "sparseml")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing", "run the stage that writes it first")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e.__class__.__name__})", "delete it and rerun the stage (or pass --force)")


@contextmanager
def atomic_path(path: Path):
    """Yields a temp path next to `path`; renamed onto it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def stage_key(args: dict, inputs: dict) -> dict:
    """The resume key of a stage: its arguments and its inputs (fingerprints of files, or the finish time of
    the stage that wrote them), as JSON stores them. A record holding the same key is up to date."""
    return {"args": _jsonable(args), "inputs": _jsonable(inputs)}


def is_current(record: dict | None, key: dict) -> bool:
    """Whether `record` (a manifest stage entry, a deployment's metadata) holds `key` (from stage_key)."""
    return bool(record) and {k: record.get(k) for k in key} == key


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return read_json(self.manifest_path)

    def stage(self, name: str) -> dict | None:
        return self.manifest()["stages"].get(name)

    def is_done(self, name: str, args: dict, inputs: dict, files: tuple[str, ...] = ()) -> bool:
        rec = self.stage(name)
        return bool(rec and rec.get("done") and is_current(rec, stage_key(args, inputs))
                    and all((self.path / f).exists() for f in files))

    def invalidate(self, name: str) -> None:
        man = self.manifest()
        if name in man["stages"]:
            man["stages"][name]["done"] = False
            write_json(self.manifest_path, man)

    def mark_done(self, name: str, args: dict, inputs: dict, seconds: float, **extra) -> None:
        man = self.manifest()
        man["stages"][name] = {"done": True, **stage_key(args, inputs), "versions": versions(), "seconds": round(seconds, 3),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_jsonable(extra)}
        write_json(self.manifest_path, man)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
