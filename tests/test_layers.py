"""The layering rule (../shared/DESIGN.md): each package imports only the layers below it, and the engine
layer stays torch-free. Every import in every module counts, function-local ones included."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sparsedeploy"

# Lower rank = lower layer. A module may import its own package and any package of a lower rank; packages of
# the same rank (bench, serve) may not import each other.
BASE = ("errors", "ui", "arch", "__init__")          # single modules at the bottom: one layer, "base"
RANK = {"base": 0, "engine": 1, "pipeline": 2, "export": 3, "bench": 4, "serve": 4, "workflows": 5, "cli": 6}


def _layer(module: str) -> str:
    """'sparsedeploy.engine.native.model' -> 'engine'."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return "base" if top in BASE else top


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute sparsedeploy module) for every import in the file."""
    rel = path.relative_to(root.parent).with_suffix("")
    here = list(rel.parts) if rel.name != "__init__" else list(rel.parts[:-1])
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sparsedeploy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                targets = [node.module] if node.module and node.module.split(".")[0] == "sparsedeploy" else []
            out += [(node.lineno, t) for t in targets]
    return out


def violations(root: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = _layer(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for line, target in _imports(path, root):
            other = _layer(target)
            if other == me or other not in RANK or me not in RANK:
                if me not in RANK or other not in RANK:
                    bad.append(f"{path.relative_to(root.parent)}:{line} imports {target}: "
                               f"layer '{other if other not in RANK else me}' is not in the layer table")
                continue
            if RANK[other] >= RANK[me]:
                bad.append(f"{path.relative_to(root.parent)}:{line} ({me}) imports {target} ({other})")
    return bad


def test_no_module_imports_upward_or_sideways():
    assert violations() == []


def test_the_checker_fails_on_an_upward_import(tmp_path):
    pkg = tmp_path / "sparsedeploy"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "bench").mkdir()
    (pkg / "engine" / "x.py").write_text("def f():\n    from ..bench import report\n")
    (pkg / "bench" / "report.py").write_text("from ..engine import x\n")
    (pkg / "bench" / "y.py").write_text("import sparsedeploy.serve.app\n")
    bad = violations(pkg)
    assert len(bad) == 2, bad
    assert any("engine/x.py:2 (engine) imports sparsedeploy.bench (bench)" in b for b in bad)
    assert any("bench/y.py:1 (bench) imports sparsedeploy.serve.app (serve)" in b for b in bad)


def test_engine_and_a_native_worker_leave_torch_and_transformers_out(tmp_path):
    code = (
        "import sys\n"
        "import sparsedeploy.engine, sparsedeploy.engine.worker, sparsedeploy.engine.decode\n"
        "import sparsedeploy.engine.native.runtime, sparsedeploy.engine.onnxruntime, sparsedeploy.engine.deployment\n"
        "import sparsedeploy.engine.llamacpp, sparsedeploy.engine.native.gptq_codes\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('LOADED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    assert "LOADED []" in out
