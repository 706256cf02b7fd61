"""Load test of `sparsedeploy serve` on loopback: N concurrent streaming clients for T seconds.

Starts the server on a deployment (default: dense SmolLM2-135M exported with seqlen 256, made on first use
with `sparsedeploy export smollm2-135m --seqlen 256 --out runs/serve_smollm2/deployment`), warms it up, then
runs N clients that each send one streaming completion after another until T seconds have passed, and
reports requests/s, generated tokens/s, latency p50/p99, time to first token p50/p99, errors by kind, and the
server's resident memory (HTTP process and engine worker) before and after. Writes
benchmarks/results/load_test.{json,md} (or --out STEM). Run it on an otherwise idle machine:

    .venv/bin/python benchmarks/load_test.py [--clients 8] [--duration 60] [--engine deepsparse] [--label NAME]

The clients run in this process (asyncio + httpx) on the same cores as the server; with batch-1 decoding
the server handles one request at a time, so N clients mostly measure queueing: latency ≈ N × one request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DEPLOYMENT = ROOT / "runs" / "serve_smollm2" / "deployment"
PROMPTS = [
    "The history of the city began when",
    "In mathematics, a prime number is",
    "The most important rule of cooking is",
    "Once upon a time, in a small village by the sea,",
    "The main difference between a violin and a viola is",
    "Photosynthesis is the process by which",
    "The first thing to check when a computer does not start is",
    "A good night's sleep matters because",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sparsedeploy.cli import main; main()", *args]


def ensure_deployment(path: Path) -> Path:
    if (path / "sparsedeploy.json").is_file():
        return path
    print(f"exporting smollm2-135m (seqlen 256) to {path} ...", flush=True)
    subprocess.run(_cli("export", "smollm2-135m", "--seqlen", "256", "--out", str(path)), check=True)
    return path


def rss_mb(pid: int) -> dict:
    """Resident memory of the server process and of its engine worker (its child)."""
    try:
        proc = psutil.Process(pid)
        out = {"server_mb": proc.memory_info().rss / 2**20, "worker_mb": 0.0}
        for child in proc.children(recursive=True):
            out["worker_mb"] += child.memory_info().rss / 2**20
        out["total_mb"] = out["server_mb"] + out["worker_mb"]
        return {k: round(v, 1) for k, v in out.items()}
    except psutil.Error:
        return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, temperature: float,
                      seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                kind = f"http_{r.status_code}"
                try:
                    kind += ":" + r.json()["error"]["type"]
                except Exception:  # noqa: BLE001
                    pass
                return {"ok": False, "kind": kind, "latency_s": time.perf_counter() - t0}
            tokens, done, err = 0, False, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                doc = json.loads(data)
                if "error" in doc:
                    err = "stream:" + doc["error"].get("type", "error")
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
            if err or not done:
                return {"ok": False, "kind": err or "stream_incomplete", "latency_s": time.perf_counter() - t0}
            return {"ok": True, "latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens}
    except httpx.TimeoutException:
        return {"ok": False, "kind": "client_timeout", "latency_s": time.perf_counter() - t0}
    except httpx.HTTPError as e:
        return {"ok": False, "kind": f"connection:{type(e).__name__}", "latency_s": time.perf_counter() - t0}


async def run_clients(url: str, clients: int, duration: float, max_tokens: int, temperature: float,
                      timeout: float) -> tuple[list[dict], float]:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(i: int) -> None:
            k = 0
            while time.perf_counter() < stop_at:
                prompt = PROMPTS[(i + k) % len(PROMPTS)]
                res = await one_request(client, url, prompt, max_tokens, temperature, seed=1000 * i + k)
                res["client"] = i
                results.append(res)
                k += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return results, elapsed


def pct(xs, q):
    return round(float(np.percentile(xs, q)), 4) if xs else None


def summarize(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if r["ok"]]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["kind"]] = errors.get(r["kind"], 0) + 1
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": errors, "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(len(ok) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2),
            "generated_tokens": tokens, "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "latency_max_s": round(max(lat), 4) if lat else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}


def server_metrics(url: str) -> dict:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    keep = {}
    for line in text.splitlines():
        if line.startswith("sparsedeploy_requests_total") or line.startswith("sparsedeploy_generated_tokens_total") \
                or line.startswith("sparsedeploy_worker_restarts_total") or line.startswith("sparsedeploy_completion_errors_total"):
            name, value = line.rsplit(" ", 1)
            keep[name] = float(value)
    return keep


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def write_reports(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    s, c = doc["summary"], doc["config"]
    md = [f"# Load test: `sparsedeploy serve` on loopback — {doc['label']}", ""]
    if doc.get("note"):
        md += [f"**{doc['note']}**", ""]
    md += [f"{c['clients']} concurrent streaming clients for {c['duration_s']} s, max_tokens {c['max_tokens']}, "
           f"temperature {c['temperature']}; deployment `{c['deployment']}`, engine {doc['server']['engine']} "
           f"({c['cores'] or 'all'} cores), queue {c['queue_size']}, timeout {c['timeout_s']} s.", "",
           f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, load average at start "
           f"{doc['machine']['loadavg_at_start']}; {doc['finished']}.", "",
           "| metric | value |", "| --- | --- |",
           f"| requests (ok / total) | {s['ok']} / {s['requests']} |",
           f"| requests/s | {s['requests_per_s']} |",
           f"| generated tokens/s | {s['tokens_per_s']} |",
           f"| latency p50 / p99 (s) | {s['latency_p50_s']} / {s['latency_p99_s']} |",
           f"| time to first token p50 / p99 (s) | {s['ttft_p50_s']} / {s['ttft_p99_s']} |",
           f"| errors by kind | {json.dumps(s['errors']) if s['errors'] else 'none'} |",
           f"| server RSS before → after (MB, HTTP + worker) | {doc['rss_before'].get('total_mb')} → "
           f"{doc['rss_after'].get('total_mb')} ({doc['rss_before'].get('server_mb')} + {doc['rss_before'].get('worker_mb')}"
           f" → {doc['rss_after'].get('server_mb')} + {doc['rss_after'].get('worker_mb')}) |",
           f"| worker restarts | {doc['server_metrics'].get('sparsedeploy_worker_restarts_total', 0):.0f} |", ""]
    for suffix, text in ((".json", json.dumps(doc, indent=2) + "\n"), (".md", "\n".join(md))):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(f"wrote {stem}.{{json,md}}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    ap.add_argument("--engine", default="deepsparse")
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--prefill-chunk", type=int, default=0)
    ap.add_argument("--label", default="full run")
    ap.add_argument("--note", default=None, help="a line printed in bold at the top of the report")
    ap.add_argument("--out", type=Path, default=RESULTS / "load_test")
    a = ap.parse_args()

    dep = ensure_deployment(a.deployment)
    host = machine()                                            # load average before the server starts
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _cli("serve", str(dep), "--engine", a.engine, "--port", str(port), "--queue-size", str(a.queue_size),
               "--timeout-s", str(a.timeout_s), "--prefill-chunk", str(a.prefill_chunk),
               *(["--cores", str(a.cores)] if a.cores else []))
    server = subprocess.Popen(cmd, env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    try:
        deadline = time.monotonic() + 600
        health = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"serve exited with {server.returncode}")
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200:
                    health = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if health is None:
            raise SystemExit("serve did not become healthy in 600 s")
        for p in PROMPTS[:2]:                                   # warm-up, not measured
            httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}, timeout=120)
        before = rss_mb(server.pid)
        print(f"server ready ({health['engine']}); {a.clients} clients × {a.duration:g} s ...", flush=True)
        results, elapsed = asyncio.run(run_clients(url, a.clients, a.duration, a.max_tokens, a.temperature,
                                                   a.timeout_s + 30))
        after = rss_mb(server.pid)
        metrics = server_metrics(url)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    summary = summarize(results, elapsed)
    doc = {"label": a.label, "note": a.note, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "config": {"deployment": str(dep.resolve().relative_to(ROOT)) if dep.resolve().is_relative_to(ROOT) else str(dep),
                      "engine": a.engine, "cores": a.cores, "clients": a.clients, "duration_s": a.duration,
                      "max_tokens": a.max_tokens, "temperature": a.temperature, "queue_size": a.queue_size,
                      "timeout_s": a.timeout_s, "prefill_chunk": a.prefill_chunk},
           "server": {"engine": health["engine"], "seqlen": health["seqlen"], "exit_code": code},
           "machine": host, "summary": summary, "rss_before": before, "rss_after": after,
           "server_metrics": metrics}
    write_reports(doc, a.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
