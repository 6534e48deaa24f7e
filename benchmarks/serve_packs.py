"""Hot load of prompt packs in a running server (issue 22, part 3): `vfpt-deploy serve B.onnx --packs DIR` with
--served packs, --clients threads sending requests for them without pause (each answer checked against an
in-process PackSession), and a new pack loaded with POST /v2/repository/models/NAME/load while they run.

Measured, --loads times (the pack is unloaded between loads): the load call itself, and the time from the load
request to the first correct answer of the new model; the clients' requests during the whole run (failed =
any answer that is not a 200 with the right logits), their latency overall and in the load windows; the load
average and the CPU. Tasks as benchmarks/packs.py builds them (random backbone, prompts x10, VTAB class counts;
packs with a 3-row golden set, which the load replays).

    .venv/bin/python benchmarks/serve_packs.py --tiny --out .scratch/serve_packs_tiny.json           # seconds
    .venv/bin/python benchmarks/serve_packs.py --out docs/benchmarks/serve_packs.json --work .scratch/sp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import cpu_jiffies, free_ports  # noqa: E402


def post(url: str, body: bytes = b"{}", headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def request(x: np.ndarray) -> tuple[bytes, dict]:
    """A V2 request with the image tensor as binary data (Triton's extension), logits asked as JSON."""
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def correct(status: int, body: bytes, want: np.ndarray) -> bool:
    if status != 200:
        return False
    out = {o["name"]: o for o in json.loads(body)["outputs"]}["logits"]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    return got.shape == want.shape and float(np.max(np.abs(got - want))) <= 1e-3 * max(1.0, float(np.abs(want).max()))


def client(url: str, model: str, x: np.ndarray, want: np.ndarray, stop: threading.Event, out: list) -> None:
    body, headers = request(x)
    while not stop.is_set():
        t0 = time.perf_counter()
        status, answer = post(f"{url}/v2/models/{model}/infer", body, headers)
        out.append((t0, time.perf_counter(), status == 200 and correct(status, answer, want),
                    status, answer[:200] if status != 200 else b""))


def load_once(url: str, new: str, body: bytes, headers: dict, want: np.ndarray, w0: float, log, what: str) -> dict:
    """Load `new` (unloading it first if loaded), then ask it until the answer is right; the times."""
    post(f"{url}/v2/repository/models/{new}/unload")
    time.sleep(1.0)
    t_load = time.perf_counter()
    status, answer = post(f"{url}/v2/repository/models/{new}/load")
    load_s = time.perf_counter() - t_load
    if status != 200:
        raise SystemExit(f"error: the load call answered {status}: {answer[:300]!r}")
    tries = 0
    while True:
        tries += 1
        status, answer = post(f"{url}/v2/models/{new}/infer", body, headers)
        if correct(status, answer, want):
            break
        if tries > 50:
            raise SystemExit(f"error: no correct answer from {new} after its load: {status} {answer[:300]!r}")
    first = time.perf_counter() - t_load
    log(f"load ({what}): call {load_s:.3f} s, first correct answer {first:.3f} s after the load request")
    return {"load_call_s": load_s, "first_correct_answer_s": first, "tries": tries,
            "window": (t_load - w0, time.perf_counter() - w0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--served", type=int, default=2, help="packs served from the start")
    ap.add_argument("--clients", type=int, default=2, help="client threads, one per served pack (round robin)")
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quiet-loads", type=int, default=3, help="loads before the clients start (no contention)")
    ap.add_argument("--reuse", action="store_true", help="reuse the backbone and packs already in --work")
    args = ap.parse_args()

    from multitask import Tasks, task_specs
    from packs import make_pack

    from vfpt_deploy.exporters.pack import export_backbone
    from vfpt_deploy.runtime.hardware import summary
    from vfpt_deploy.runtime.packs import PackSession
    from vfpt_deploy.threads import set_torch_threads

    set_torch_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    work = args.work or Path(tempfile.mkdtemp(prefix="serve-packs-"))
    (work / "packs").mkdir(parents=True, exist_ok=True)
    specs = task_specs(args.served + 1, [args.prompts])
    backbone, files = work / "backbone.onnx", [work / f"{s['name']}.pack.safetensors" for s in specs]
    if not args.reuse or not all(f.exists() for f in [backbone, *files]):
        t0 = time.perf_counter()
        tasks = Tasks(args.tiny, args.model)
        backbone = export_backbone(tasks.run(specs[0]), backbone).path
        files = [make_pack(tasks, s, backbone, f) for s, f in zip(specs, files)]
        del tasks
        log(f"exported the backbone and {len(files)} packs in {time.perf_counter() - t0:.0f} s")
    names = [s["name"] for s in specs]
    new = names[-1]
    with PackSession(backbone, ["cpu"], threads=args.threads) as s:
        size = tuple(s.geometry["image_size"])
        xs = {n: np.random.default_rng(i).standard_normal((1, 3, *size), dtype=np.float32) for i, n in enumerate(names)}
        for f in files:
            s.add(f)
        want = {n: s.infer(xs[n], n)[:, :s.pack(n).tables.num_classes] for n in names}
    (work / "packs" / files[-1].name).unlink(missing_ok=True)  # the one to load: not there at the start
    for f in files[:-1]:
        shutil.copyfile(f, work / "packs" / f.name)

    ports = free_ports(3)
    server_log = work / "server.log"
    cmd = [sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "serve", backbone, "--packs", work / "packs",
           "--host", "127.0.0.1", "--port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
           "--max-batch-delay-ms", args.max_batch_delay_ms, "--providers", "cpu", "--threads", args.threads]
    t0 = time.perf_counter()
    with open(server_log, "wb") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: the server exited:\n{server_log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        started = time.perf_counter() - t0
        log(f"server ready in {started:.1f} s")
        result = {"model": tasks_name(args), "prompts": args.prompts, "served": args.served, "clients": args.clients,
                  "threads": args.threads, "max_batch_delay_ms": args.max_batch_delay_ms, "cpu": summary(),
                  "cores": os.cpu_count(), "load_average_start": os.getloadavg(), "server_ready_s": started,
                  "pack_bytes": files[-1].stat().st_size}
        one, one_headers = request(xs[names[0]])
        plain = []
        for _ in range(4):  # a request to a served pack, nothing else running: the unit the loads compare to
            t = time.perf_counter()
            status, answer = post(f"{url}/v2/models/{names[0]}/infer", one, one_headers)
            plain.append(time.perf_counter() - t)
            assert correct(status, answer, want[names[0]]), answer[:300]
        result["quiet_request_s_median"] = statistics.median(plain[1:])
        log(f"one request to a served pack, quiet: {result['quiet_request_s_median']:.3f} s")
        body, headers = request(xs[new])
        shutil.copyfile(files[-1], work / "packs" / files[-1].name)
        result["quiet_loads"] = [load_once(url, new, body, headers, want[new], 0.0, log, "quiet")
                                 for _ in range(args.quiet_loads)]
        stop, records = threading.Event(), []
        threads = [threading.Thread(target=client, args=(url, names[i % args.served], xs[names[i % args.served]],
                                                         want[names[i % args.served]], stop, records), daemon=True)
                   for i in range(args.clients)]
        cpu0 = cpu_jiffies(proc.pid)
        w0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(3)
        loads = []
        for i in range(args.loads):
            loads.append(load_once(url, new, body, headers, want[new], w0, log, "with clients"))
            time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
        post(f"{url}/v2/repository/models/{new}/unload")
        elapsed = time.perf_counter() - w0
        cpu1 = cpu_jiffies(proc.pid)
        lat = [(a - w0, b - a) for a, b, *_ in records]
        in_window = [d for s0, d in lat if any(w[0] <= s0 <= w[1] for w in (x["window"] for x in loads))]
        failed = [(st, msg.decode("utf-8", "replace")) for *_, ok, st, msg in records if not ok]
        quiet = result["quiet_loads"]
        result.update(
            quiet_first_correct_answer_s_median=statistics.median(x["first_correct_answer_s"] for x in quiet)
            if quiet else None,
            quiet_load_call_s_median=statistics.median(x["load_call_s"] for x in quiet) if quiet else None,
            loads=loads, load_call_s_median=statistics.median(x["load_call_s"] for x in loads),
            first_correct_answer_s_median=statistics.median(x["first_correct_answer_s"] for x in loads),
            first_correct_answer_s_max=max(x["first_correct_answer_s"] for x in loads),
            client_requests=len(records), client_failed=len(failed), client_failures=failed[:5],
            client_latency_ms_median=1000 * statistics.median(d for _, d in lat),
            client_latency_ms_median_in_load_windows=1000 * statistics.median(in_window) if in_window else None,
            client_latency_ms_max=1000 * max(d for _, d in lat), seconds=elapsed,
            server_cpu_cores_busy=(cpu1[0] - cpu0[0]) / os.sysconf("SC_CLK_TCK") / elapsed,
            load_average_end=os.getloadavg())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    steps = [line.split(": pack ", 1)[1].strip() for line in server_log.read_text().splitlines()
             if f"model {new}: pack " in line]
    result["server_load_steps"] = steps  # per load: reading + checking + staging, the self-check, the swap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps({k: v for k, v in result.items() if k not in ("loads", "client_failures")}, indent=1))


def tasks_name(args) -> str:
    return "tiny" if args.tiny else args.model


if __name__ == "__main__":
    main()
