"""A bounded load test of `vfpt-deploy serve` on loopback, against in-process inference at the same batch sizes.

For each model: start `vfpt-deploy serve` (a subprocess, free ports), then for 1, 8 and 32 concurrent
clients (each a thread with its own keep-alive HTTP connection, sending one encoded JPEG per V2 REST
request, back to back) run a warm-up and then a fixed time, and report requests/s, p50/p99 latency, failed
requests, and the server-side batch sizes seen (the server's `vfpt_batch_size` Prometheus histogram, read
before and after each window). Then, with the server stopped, time OnnxPredictor.infer in this process on
preprocessed batches of 1, 8 and 32 for the same time: what the model alone does at those batch sizes.

Models: `demo` (the built-in demo's architecture: ViT 4 blocks, width 64, 32 x 32 input, 8 deep prompts,
kv fold, random weights: seconds to build) and `vitb16` (ViT-B/16, 50 deep prompts, kv fold, 100 classes,
random weights: ~1 min and ~2 GB RAM to build; pass --models demo,vitb16). Or --onnx NAME=PATH for any
exported artifact. Clients and server share this machine's CPUs: on a small machine the clients' own work
(JSON, base64) is part of what is measured.

    .venv/bin/python benchmarks/serve_load.py --duration 3                 # the demo-sized model, seconds
    .venv/bin/python benchmarks/serve_load.py --models demo,vitb16 --duration 20 --work serve-work --out docs/benchmarks

--tritonclient-http: instead, a stock tritonclient.http (16 client processes by default, --clients), sending the
preprocessed FP32 `images` tensor of one image per request, alternately with the binary tensor data extension
(tritonclient's default) and as JSON (binary_data=False for the input and every output): --rounds windows of
each, interleaved (binary, json, binary, json, ...) so drifting machine load hits both alike. Each window
records requests/s, p50/p99, failures, the 1-minute load average at its end, the machine's CPU busy share
(/proc/stat) and the server process's CPU seconds per second (/proc/PID/stat).

    .venv/bin/python benchmarks/serve_load.py --tritonclient-http --clients 16 --rounds 3 --duration 10
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vfpt_deploy.artifacts.files import atomic_write, dumps_json  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info  # noqa: E402

MODELS = {  # name -> (timm name, kwargs, prompts M, classes)
    "demo": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}, 8, 10),
    "vitb16": ("vit_base_patch16_224", {}, 50, 100),
}


def build(model: str, work: Path) -> Path:
    """A run.pt with random weights (scaled prompts, as trained ones are far from their init), exported kv."""
    path = work / f"{model}_kv.onnx"
    if path.is_file():
        return path
    import torch

    from vfpt_deploy.models.backbone import create_backbone
    from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
    from vfpt_deploy.models.config import VFPTConfig
    from vfpt_deploy.exporters.onnx import export_onnx
    from vfpt_deploy.models.vit.model import VFPTViT
    from vfpt_deploy.runs import preprocess_for

    name, kwargs, prompts, classes = MODELS[model]
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs)
    vfpt = VFPTViT(backbone, classes, VFPTConfig(num_prompts=prompts, deep=True, alpha=0.5)).eval()
    with torch.no_grad():
        for p in vfpt.tuned_parameters().values():
            p.mul_(10.0)
    save_run(work / f"{model}.pt", vfpt, BackboneInfo(name, kwargs), [f"class{i}" for i in range(classes)],
             preprocess_for(backbone))
    export_onnx(load_run(work / f"{model}.pt"), path, fold="kv")
    return path


def photo_jpeg(seed: int, size=(320, 240)) -> bytes:
    """A smooth, photo-like JPEG (gradients and blobs): decodes like a photo, unlike noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    img = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(0.5, 2))
                    for _ in range(3)], -1)
    img = ((img - img.min()) / (np.ptp(img) + 1e-9) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(name: str, onnx: Path, args, log: Path) -> tuple[subprocess.Popen, list[int]]:
    ports = free_ports(3)
    cmd = [sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "serve", f"{name}={onnx}",
           "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
           "--max-batch-size", args.max_batch_size, "--max-batch-delay-ms", args.max_batch_delay_ms,
           "--providers", "cpu", *(["--threads", args.threads] if args.threads else [])]
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, ports
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("error: the server was not ready after 600 s")


def histogram(metrics_port: int, name: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("vfpt_batch_size") and s.labels.get("model_name") == name and s.name.endswith(
                    ("_bucket", "_count", "_sum")):
                out[s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]] = s.value
    return out


def batch_summary(before: dict, after: dict) -> dict:
    """Batches in the window: how many, mean rows per batch, and how many fell in each bucket."""
    calls = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    cum = {le: after[le] - before.get(le, 0.0) for le in after if le not in ("count", "sum")}
    les = sorted(cum, key=float)
    per = {f"<={float(le):g}": int(cum[le] - (cum[les[i - 1]] if i else 0)) for i, le in enumerate(les)}
    return {"batches": int(calls), "rows": int(rows), "mean_rows": rows / calls if calls else 0.0,
            "by_size": {k: v for k, v in per.items() if v}}


def client(port: int, path: str, bodies: list[bytes], stop: float, out: list, failures: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = 0
    while time.perf_counter() < stop:
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and b'"top_k_labels"' in data
        except (OSError, http.client.HTTPException) as e:
            ok, data = False, repr(e).encode()
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        (out if ok else failures).append(time.perf_counter() - t0 if ok else data[:200].decode(errors="replace"))
    conn.close()


def load_level(port: int, path: str, bodies: list[bytes], clients: int, seconds: float) -> tuple[list, list, float]:
    lat: list = []
    failures: list = []
    stop = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(port, path, bodies[i::clients] or bodies, stop, lat, failures))
               for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, failures, time.perf_counter() - t0


def serve_levels(name: str, onnx: Path, args, bodies: list[bytes], log: Path) -> list[dict]:
    proc, (http_port, _, metrics_port) = start_server(name, onnx, args, log)
    path = f"/v2/models/{name}/infer"
    rows = []
    try:
        for clients in args.clients:
            load_level(http_port, path, bodies, clients, args.warmup)
            before = histogram(metrics_port, name)
            lat, failures, wall = load_level(http_port, path, bodies, clients, args.duration)
            batches = batch_summary(before, histogram(metrics_port, name))
            ms = np.asarray(lat) * 1e3
            rows.append({"clients": clients, "requests": len(lat), "failed": len(failures),
                         "failures": failures[:3], "seconds": wall, "requests_per_s": len(lat) / wall,
                         "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                         "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, **batches})
            print(f"  {name} {clients:3d} clients: {rows[-1]['requests_per_s']:8.1f} req/s  p50 {rows[-1]['p50_ms']:8.1f} ms"
                  f"  p99 {rows[-1]['p99_ms']:8.1f} ms  failed {len(failures)}  batches {batches['batches']}"
                  f" (mean {batches['mean_rows']:.1f} rows, {batches['by_size']})", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return rows


# -- tritonclient.http: binary tensor data vs JSON ----------------------------------------------------------
def triton_client(url: str, name: str, x: np.ndarray, binary: bool, start: float, stop: float, queue) -> None:
    """One client process: requests back to back from now on; those sent in [start, stop) wall time count."""
    import tritonclient.http as th

    client = th.InferenceServerClient(url)
    outs = None if binary else [th.InferRequestedOutput(o, binary_data=False) for o in
                                ("logits", "top_k_labels", "top_k_probabilities", "top_k_indices")]
    lat, failures = [], []
    while time.time() < stop:
        t0, w0 = time.perf_counter(), time.time()
        try:
            inp = th.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)  # the client's encoding is part of each request
            r = client.infer(name, [inp], outputs=outs)
            ok = r.as_numpy("logits") is not None
        except Exception as e:  # any client or server error is a failed request
            ok = False
            failures.append(repr(e)[:200])
        if ok and w0 >= start and time.time() < stop:
            lat.append(time.perf_counter() - t0)
    client.close()
    queue.put((lat, failures))


def cpu_jiffies(pid: int | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of the machine, or (utime + stime, 0) of process pid."""
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), 0
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals) - vals[3] - vals[4], sum(vals)  # idle and iowait are not busy


def triton_window(url: str, name: str, x: np.ndarray, binary: bool, clients: int, args, server_pid: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter per client (gevent, no inherited state)
    queue = ctx.Queue()
    start = time.time() + args.warmup + 3.0  # spawning and importing first, then warm-up requests
    stop = start + args.duration
    procs = [ctx.Process(target=triton_client, args=(url, name, x, binary, start, stop, queue)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start - time.time()))
    m0, s0, t0 = cpu_jiffies(), cpu_jiffies(server_pid)[0], time.perf_counter()
    time.sleep(max(0.0, stop - time.time()))
    m1, s1, wall = cpu_jiffies(), cpu_jiffies(server_pid)[0], time.perf_counter() - t0
    load = os.getloadavg()[0]
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    lat = [v for r in results for v in r[0]]
    failures = [v for r in results for v in r[1]]
    ms = np.asarray(lat) * 1e3
    hz = os.sysconf("SC_CLK_TCK")
    return {"mode": "binary" if binary else "json", "clients": clients, "requests": len(lat), "failed": len(failures),
            "failures": failures[:3], "seconds": wall, "requests_per_s": len(lat) / args.duration,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "load_average_1m": load, "machine_cpu_busy": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
            "server_cpu_per_s": (s1 - s0) / hz / wall}


def triton_http(name: str, onnx: Path, args, log: Path) -> list[dict]:
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

    with OnnxPredictor(onnx, ["cpu"], threads=1) as p:
        h, w = p.preprocess.size
    x = np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32)
    proc, (http_port, _, _) = start_server(name, onnx, args, log)
    rows = []
    try:
        for r in range(args.rounds):
            for binary in (True, False):
                for clients in args.clients:
                    row = triton_window(f"127.0.0.1:{http_port}", name, x, binary, clients, args, proc.pid)
                    rows.append({"round": r + 1, **row})
                    print(f"  {name} round {r + 1} {row['mode']:6s} {clients:3d} clients: {row['requests_per_s']:7.1f} req/s"
                          f"  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}  load "
                          f"{row['load_average_1m']:.1f}  machine CPU {100 * row['machine_cpu_busy']:.0f}%  server "
                          f"{row['server_cpu_per_s']:.2f} CPU-s/s", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return rows


def triton_markdown(results: dict) -> str:
    lines = ["| model | round | mode | clients | req/s | p50 ms | p99 ms | failed | load 1m | machine CPU | server CPU-s/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["tritonclient_http"].items():
        for r in rows:
            lines.append(f"| {name} | {r['round']} | {r['mode']} | {r['clients']} | {r['requests_per_s']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} | {r['load_average_1m']:.1f} | "
                         f"{100 * r['machine_cpu_busy']:.0f}% | {r['server_cpu_per_s']:.2f} |")
    return "\n".join(lines)


def in_process(onnx: Path, jpeg: bytes, args) -> list[dict]:
    """OnnxPredictor.infer on preprocessed batches (the JPEG decoded and preprocessed once, outside the timing)."""
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor
    from vfpt_deploy.runtime.preprocess import load_image

    rows = []
    with OnnxPredictor(onnx, ["cpu"], threads=args.threads) as p:
        x1 = p.preprocess.batch([load_image(io.BytesIO(jpeg))])
        for b in args.batches:
            x = np.repeat(x1, b, axis=0)
            p.infer(x)
            t, calls, stop = [], 0, time.perf_counter() + args.duration
            while time.perf_counter() < stop or calls < 3:
                t0 = time.perf_counter()
                p.infer(x)
                t.append(time.perf_counter() - t0)
                calls += 1
            rows.append({"batch": b, "calls": calls, "p50_ms": float(np.median(t)) * 1e3,
                         "images_per_s": b * calls / sum(t)})
            print(f"  in-process batch {b:3d}: {rows[-1]['images_per_s']:8.1f} img/s  p50 {rows[-1]['p50_ms']:8.1f} ms/call",
                  flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = ["| model | clients | req/s | p50 ms | p99 ms | failed | batches | mean rows/batch | batch sizes seen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        for row in r["serve"]:
            sizes = ", ".join(f"{k}: {v}" for k, v in row["by_size"].items())
            lines.append(f"| {name} | {row['clients']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.1f} | "
                         f"{row['p99_ms']:.1f} | {row['failed']} | {row['batches']} | {row['mean_rows']:.2f} | {sizes} |")
    lines += ["", "| model | in-process batch | img/s | p50 ms per call |", "|---|---|---|---|"]
    for name, r in results["models"].items():
        for row in r["in_process"]:
            lines.append(f"| {name} | {row['batch']} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo", help="comma-separated: demo, vitb16 (built with random weights)")
    ap.add_argument("--onnx", action="append", default=[], help="NAME=PATH of an exported artifact (repeatable)")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients per level")
    ap.add_argument("--batches", default="1,8,32", help="in-process batch sizes")
    ap.add_argument("--duration", type=float, default=10.0, help="timed seconds per level and per batch size")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each level")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (server and in-process)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the built ONNX files and server logs here, and reuse them (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="write serve_load{tag}.json here")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--tritonclient-http", action="store_true",
                    help="tritonclient.http with binary tensor data vs JSON, interleaved (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="--tritonclient-http: windows of each mode")
    args = ap.parse_args(argv)
    args.clients = [int(v) for v in args.clients.split(",")]
    args.batches = [int(v) for v in args.batches.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
            args.work = Path(work)
            return run(args)
    args.work.mkdir(parents=True, exist_ok=True)
    return run(args)


def run(args) -> None:
    artifacts = {m: None for m in args.models.split(",") if m}
    artifacts.update(dict(item.split("=", 1) for item in args.onnx))
    bodies = [json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                      "data": [base64.b64encode(photo_jpeg(i)).decode()]}]}).encode() for i in range(64)]
    results = {"machine": machine_info(), "mlserver": metadata.version("mlserver"), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "load_average_start": os.getloadavg(), "models": {}}
    if args.tritonclient_http:
        results["tritonclient"] = metadata.version("tritonclient")
        results["tritonclient_http"] = {}
        for name, path in artifacts.items():
            onnx = Path(path) if path else build(name, args.work)
            results["tritonclient_http"][name] = triton_http(name, onnx, args, args.work / f"{name}_server.log")
        results["load_average_end"] = os.getloadavg()
        print(triton_markdown(results))
        if args.out:
            out = args.out / f"serve_load_tritonclient{args.tag}.json"
            atomic_write(out, lambda tmp: Path(tmp).write_text(dumps_json(results, indent=2) + "\n"))
            print(f"wrote {out}")
        if any(r["failed"] for rows in results["tritonclient_http"].values() for r in rows):
            raise SystemExit("error: some requests failed (see 'failures' in the rows)")
        return
    for name, path in artifacts.items():
        t0 = time.perf_counter()
        onnx = Path(path) if path else build(name, args.work)
        print(f"{name}: {onnx} ({onnx.stat().st_size / 2**20:.1f} MiB, ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        serve = serve_levels(name, onnx, args, bodies, args.work / f"{name}_server.log")
        results["models"][name] = {"onnx_mib": onnx.stat().st_size / 2**20, "serve": serve,
                                   "in_process": in_process(onnx, photo_jpeg(0), args)}
    results["load_average_end"] = os.getloadavg()
    print(markdown(results))
    if args.out:
        out = args.out / f"serve_load{args.tag}.json"
        atomic_write(out, lambda tmp: Path(tmp).write_text(dumps_json(results, indent=2) + "\n"))
        print(f"wrote {out}")
    if any(row["failed"] for r in results["models"].values() for row in r["serve"]):
        raise SystemExit("error: some requests failed (see 'failures' in the rows)")


if __name__ == "__main__":
    main()
