"""Load test of `sparsedeploy serve` on loopback: a concurrency sweep, batch-1 server against the batched one.

For each --max-batch value (default 1 and 8: the batch-1 server and continuous batching) it starts a server on
the deployment (default: dense SmolLM2-135M exported with seqlen 256, made on first use with
`sparsedeploy export smollm2-135m --seqlen 256 --out runs/serve_smollm2/deployment`), warms it up, then for each
concurrency level (default 1, 2, 4, 8, 16 clients) runs N clients that each send one streaming completion
(a --prompt-tokens long prompt, default 64) after another for --duration seconds, and reports generated
tokens/s (and the ratio to the batch-1 server at the same level), time to first token p50/p99, latency p50/p99,
errors by kind (429s included), the batched server's mean step time (from /metrics), and each server's resident
memory (HTTP process and engine worker) before and after its sweep, and the cores each part kept busy per
level (CPU seconds / wall seconds of the engine worker, the HTTP process and the clients). Both servers feed a prompt in chunks of 64
tokens by default (the batch-1 server: --prefill-chunk; the batched one: --batch-prefill per step), so the ratio
measures batching, not a token-by-token prompt. Writes benchmarks/results/load_test_<engine>_sweep_<cpu>.{json,md}
(or --out STEM), naming the CPU. On an idle machine:

    .venv/bin/python benchmarks/load_test.py --deployment DEP --engine native [--duration 30] [--label NAME]

Time: (levels x duration + about a minute of start-up and warm-up) per server: about 6 minutes with the defaults.
The clients run in this process (asyncio + httpx) on the same cores as the server.
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

from sparsedeploy.engine.cpuinfo import cpu_name, cpu_tag  # noqa: E402

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


def cpu_seconds(pid: int) -> dict:
    """CPU seconds (user + system) so far of the server's HTTP process, its engine worker(s) and this process
    (the clients): their differences over a level say how the 2 cores were shared."""
    def used(p) -> float:
        t = p.cpu_times()
        return t.user + t.system
    out = {"http": 0.0, "worker": 0.0, "clients": used(psutil.Process())}
    try:
        proc = psutil.Process(pid)
        out["http"] = used(proc)
        for child in proc.children(recursive=True):
            try:
                out["worker"] += used(child)
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def cpu_share(before: dict, after: dict, elapsed: float) -> dict:
    """Cores each part kept busy over a level (CPU seconds / wall seconds)."""
    return {k: round((after[k] - before[k]) / elapsed, 2) for k in before} if elapsed > 0 else {}


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
                      timeout: float, prompts: list[str] = PROMPTS) -> tuple[list[dict], float]:
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(i: int) -> None:
            k = 0
            while time.perf_counter() < stop_at:
                prompt = prompts[(i + k) % len(prompts)]
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
        if line.startswith(("sparsedeploy_requests_total", "sparsedeploy_generated_tokens_total",
                            "sparsedeploy_worker_restarts_total", "sparsedeploy_completion_errors_total",
                            "sparsedeploy_batch_step_seconds_sum", "sparsedeploy_batch_step_seconds_count")):
            name, value = line.rsplit(" ", 1)
            keep[name] = float(value)
    return keep


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def prompts_of(dep: Path, n_tokens: int) -> list[str]:
    """PROMPTS made n_tokens long with the deployment's tokenizer (each sentence, then the others, cut there)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dep / "tokenizer.json"))
    out = []
    for i in range(len(PROMPTS)):
        text = " ".join(PROMPTS[i:] + PROMPTS[:i])
        ids = tok.encode(text, add_special_tokens=False).ids
        while len(ids) < n_tokens:
            ids = ids + ids
        out.append(tok.decode(ids[:n_tokens]))
    return out


def start_server(dep: Path, a, max_batch: int) -> tuple[subprocess.Popen, str, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _cli("serve", str(dep), "--engine", a.engine, "--port", str(port), "--queue-size", str(a.queue_size),
               "--timeout-s", str(a.timeout_s), "--prefill-chunk", str(a.prefill_chunk), "--max-batch", str(max_batch),
               "--batch-prefill", str(a.batch_prefill), *(["--cores", str(a.cores)] if a.cores else []))
    server = subprocess.Popen(cmd, env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve exited with {server.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return server, url, r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("serve did not become healthy in 600 s")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def step_stats(before: dict, after: dict) -> dict:
    """Mean batched step time and batch size over a level, from the server's /metrics (batched servers only)."""
    n = after.get("sparsedeploy_batch_step_seconds_count", 0) - before.get("sparsedeploy_batch_step_seconds_count", 0)
    if n <= 0:
        return {}
    t = after.get("sparsedeploy_batch_step_seconds_sum", 0) - before.get("sparsedeploy_batch_step_seconds_sum", 0)
    return {"steps": int(n), "step_ms_mean": round(1e3 * t / n, 3)}


def _cores(c: dict | None) -> str:
    return f"{c['worker']:.2f} / {c['http']:.2f} / {c['clients']:.2f}" if c else ""


def write_reports(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    c = doc["config"]
    md = [f"# Load test: `sparsedeploy serve` on loopback, concurrency sweep — {doc['label']}", ""]
    if doc.get("note"):
        md += [f"**{doc['note']}**", ""]
    md += [f"Streaming clients, each sending one completion after another for {c['duration_s']} s per level: "
           f"{c['prompt_tokens']}-token prompts, max_tokens {c['max_tokens']}, temperature {c['temperature']}; "
           f"deployment `{c['deployment']}`, engine {c['engine']} ({c['cores'] or 'all'} cores), queue {c['queue_size']}, "
           f"timeout {c['timeout_s']} s; the batch-1 server feeds a prompt "
           f"{'token by token' if not c['prefill_chunk'] else 'in chunks of ' + str(c['prefill_chunk'])}, batched servers "
           f"{c['batch_prefill']} prompt tokens per step.", "",
           f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, load average at start "
           f"{doc['machine']['loadavg_at_start']}; {doc['finished']}.", "",
           "'× batch-1': tokens/s over the batch-1 server's at the same level; '× 1 client': over the same server's "
           "own 1-client level (the gain from concurrency alone, whatever path a lone request takes).", "",
           "| server | clients | ok / total | tokens/s | × batch-1 | × 1 client | TTFT p50 / p99 (s) | "
           "latency p50 / p99 (s) | errors | mean step (ms) | cores busy: worker / HTTP / clients |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    base = {lv["clients"]: lv["summary"]["tokens_per_s"] for srv in doc["servers"] if srv["max_batch"] == 1
            for lv in srv["levels"]}
    for srv in doc["servers"]:
        one = next((lv["summary"]["tokens_per_s"] for lv in srv["levels"] if lv["clients"] == 1), None)
        for lv in srv["levels"]:
            s = lv["summary"]
            ratio = (f"{s['tokens_per_s'] / base[lv['clients']]:.2f}" if base.get(lv["clients"]) else "")
            own = f"{s['tokens_per_s'] / one:.2f}" if one else ""
            md.append(f"| max-batch {srv['max_batch']} | {lv['clients']} | {s['ok']} / {s['requests']} | "
                      f"{s['tokens_per_s']} | {ratio} | {own} | {s['ttft_p50_s']} / {s['ttft_p99_s']} | "
                      f"{s['latency_p50_s']} / {s['latency_p99_s']} | "
                      f"{json.dumps(s['errors']) if s['errors'] else 'none'} | {lv['steps'].get('step_ms_mean', '')} | "
                      f"{_cores(lv.get('cpu_cores'))} |")
    md += ["", "| server | RSS before → after the sweep (MB, HTTP + worker) | worker restarts | exit code |",
           "|---|---|---:|---:|"]
    for srv in doc["servers"]:
        b, e = srv["rss_before"], srv["rss_after"]
        md.append(f"| max-batch {srv['max_batch']} ({srv['engine']}) | {b.get('total_mb')} → {e.get('total_mb')} "
                  f"({b.get('server_mb')} + {b.get('worker_mb')} → {e.get('server_mb')} + {e.get('worker_mb')}) | "
                  f"{srv['server_metrics'].get('sparsedeploy_worker_restarts_total', 0):.0f} | {srv['exit_code']} |")
    md.append("")
    for suffix, text in ((".json", json.dumps(doc, indent=2) + "\n"), (".md", "\n".join(md))):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(f"wrote {stem}.{{json,md}}", flush=True)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"not a comma-separated list of integers: {text!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"need positive integers: {text!r}")
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployment", type=Path, default=DEFAULT_DEPLOYMENT)
    ap.add_argument("--engine", default="native")
    ap.add_argument("--cores", type=int, default=None)
    ap.add_argument("--clients", default="1,2,4,8,16", help="the concurrency levels, comma-separated")
    ap.add_argument("--max-batch", default="1,8", help="the servers to run, one per --max-batch value")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--prefill-chunk", type=int, default=64,
                    help="the batch-1 server's prompt chunk (0: token by token)")
    ap.add_argument("--batch-prefill", type=int, default=64)
    ap.add_argument("--label", default="full run")
    ap.add_argument("--note", default=None, help="a line printed in bold at the top of the report")
    ap.add_argument("--out", type=Path, default=None, help="report stem (default benchmarks/results/load_test_<engine>_sweep_<cpu>)")
    ap.add_argument("--rerender", type=Path, default=None, metavar="JSON",
                    help="only write a saved run's .md again from its .json (after a change to the report's layout)")
    a = ap.parse_args()
    if a.rerender is not None:
        write_reports(json.loads(a.rerender.read_text(encoding="utf-8")), a.rerender.with_suffix(""))
        return
    levels, batches = _ints(a.clients), _ints(a.max_batch)

    dep = ensure_deployment(a.deployment)
    prompts = prompts_of(dep, a.prompt_tokens)
    host = machine()                                            # load average before the servers start
    servers = []
    for mb in batches:
        server, url, health = start_server(dep, a, mb)
        try:
            # warm-up, not measured: one request from each of max(2, max-batch) clients at once, so the batched
            # server has met full batches (buffers, compiled shapes) before its memory is read
            asyncio.run(run_clients(url, max(2, mb), 0.01, 8, 0.0, a.timeout_s + 30, prompts))
            rss_before = rss_mb(server.pid)
            rows = []
            for n in levels:
                print(f"max-batch {mb} ({health['engine']}): {n} clients × {a.duration:g} s ...", flush=True)
                m0, c0, t0 = server_metrics(url), cpu_seconds(server.pid), time.perf_counter()
                results, elapsed = asyncio.run(run_clients(url, n, a.duration, a.max_tokens, a.temperature,
                                                           a.timeout_s + 30, prompts))
                c1, t1 = cpu_seconds(server.pid), time.perf_counter()
                m1 = server_metrics(url)
                rows.append({"clients": n, "summary": summarize(results, elapsed), "steps": step_stats(m0, m1),
                             "cpu_cores": cpu_share(c0, c1, t1 - t0), "rss_after": rss_mb(server.pid)})
                print(f"  {json.dumps(rows[-1]['summary'])}", flush=True)
            rss_after = rss_mb(server.pid)
            metrics = server_metrics(url)
        finally:
            code = stop_server(server)
        servers.append({"max_batch": mb, "engine": health["engine"], "seqlen": health["seqlen"], "levels": rows,
                        "rss_before": rss_before, "rss_after": rss_after, "server_metrics": metrics, "exit_code": code})
    out = a.out or RESULTS / f"load_test_{a.engine}_sweep_{cpu_tag()}"
    doc = {"label": a.label, "note": a.note, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "config": {"deployment": str(dep.resolve().relative_to(ROOT)) if dep.resolve().is_relative_to(ROOT) else str(dep),
                      "engine": a.engine, "cores": a.cores, "clients": levels, "max_batch": batches,
                      "duration_s": a.duration, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                      "temperature": a.temperature, "queue_size": a.queue_size, "timeout_s": a.timeout_s,
                      "prefill_chunk": a.prefill_chunk, "batch_prefill": a.batch_prefill},
           "machine": host, "servers": servers}
    write_reports(doc, out)


if __name__ == "__main__":
    main()
