"""Memory under hostile input (issue 24's acceptance): what files and requests *claim* must not drive memory.

1. `vfpt-deploy predict` over 10 and over 1,000 small JPEGs (~700 bytes each) whose headers declare
   6000 x 6000 (36 megapixels, under the 40 MP limit; 103 MiB each if decoded at full size): the peak RSS
   of each run, a fresh process each, at --batch 32 (the default) and --batch 1. Before the fix memory grew
   with the number of files (4.6 GB); now it must be flat.
2. `vfpt-deploy serve` on a tiny model (the demo architecture: ViT 4 blocks, width 64, 32 x 32 input): the
   server's RSS (VmRSS) and peak (VmHWM) from /proc before and after
   - one REST request of 32 such JPEGs (108 KB of base64 claiming 1152 MP; before the fix: 4711 MiB),
   - 4 real 6000 x 6000 JPEGs in one request (550 KB each; 144 MP, within the per-request limit: decoded),
   - a 2 MiB gzip body that inflates to 2 GiB (before the fix: 4272 MiB, held),
   - a 200 MB body sent chunked (no Content-Length to refuse up front).
   Each must leave the server under 1 GB.

Prints one JSON object (also written to --out): the numbers, the load average before and after, the CPU
and its ISA flags. Files are generated in --work (default: a temporary folder).

    .venv/bin/python benchmarks/hostile_memory.py
    .venv/bin/python benchmarks/hostile_memory.py --files 1000 --out docs/benchmarks/hostile_memory.json
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import build, start_server  # noqa: E402

from vfpt_deploy.artifacts.files import atomic_write, dumps_json  # noqa: E402
from vfpt_deploy.runtime.timing import machine_info  # noqa: E402

SIDE = 6000
GiB = 2**30
LIMIT_MIB = 1024  # "both stay under 1 GB"

# Runs a command and prints the peak RSS (KiB) of that child alone: this wrapper waits for one child only.
PEAK = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def jpeg(side: int, color=(90, 120, 200)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, "JPEG", quality=20)
    return buf.getvalue()


def claiming(side: int, seed: int) -> bytes:
    """A 64 x 64 JPEG (~700 bytes) whose header is edited to declare side x side: what a hostile client sends.
    Pillow decodes it (the missing data comes out grey), so it is a valid input at the claimed size."""
    blob = bytearray(jpeg(64, (seed * 37 % 256, seed * 11 % 256, 200)))
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(blob)


def folder(work: Path, n: int) -> Path:
    d = work / f"claims_{n}"
    if not d.is_dir() or len(list(d.iterdir())) != n:
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{i:04d}.jpg").write_bytes(claiming(SIDE, i))
    return d


def predict_peak(onnx: Path, images: Path, batch: int) -> dict:
    cmd = [sys.executable, "-c", "from vfpt_deploy.cli import run; run()", "predict", str(onnx), str(images),
           "--json", "--batch", str(batch), "--providers", "cpu"]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, timeout=3600)
    rc, kib = out.stdout.split()
    return {"files": len(list(images.iterdir())), "batch": batch, "exit": int(rc), "peak_rss_mib": int(kib) / 1024,
            "seconds": round(time.monotonic() - t0, 1)}


def proc_mib(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read()[:200].decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:200].decode(errors="replace")


def images_body(blobs: list[bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)],
                                   "data": [base64.b64encode(b).decode() for b in blobs]}]}).encode()


def gzip_bomb(inflated: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * 2**24
    return b"".join(z.compress(chunk) for _ in range(inflated // len(chunk))) + z.flush()


def chunked_body(port: int, path: str, total: int) -> tuple[int, int]:
    """POST `total` bytes with Transfer-Encoding: chunked until the server answers; (status, bytes sent)."""
    import select

    chunk = b"[" + b"0.0," * (2**18 - 1) + b"0]"
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(framed)
                sent += len(chunk)
        except OSError:
            pass
        s.settimeout(60)
        try:
            while b"\r\n" not in reply:
                more = s.recv(4096)
                if not more:
                    break
                reply += more
        except OSError:
            pass
    return (int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0), sent


def serve_case(name: str, pid: int, send) -> dict:
    before = proc_mib(pid)
    t0 = time.monotonic()
    status, detail = send()
    time.sleep(1.0)  # let the request's memory go back
    after = proc_mib(pid)
    return {"case": name, "status": status, "answer": detail, "seconds": round(time.monotonic() - t0, 2),
            "rss_before_mib": round(before["VmRSS"], 1), "rss_after_mib": round(after["VmRSS"], 1),
            "peak_mib": round(after["VmHWM"], 1)}


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000, help="files in the large predict run (the small one has 10)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the model and the generated files")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hostile-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    onnx = build("demo", work)

    few, many = folder(work, 10), folder(work, args.files)
    predict = []
    for batch in (32, 1):
        for images in (few, many):
            predict.append(predict_peak(onnx, images, batch))
            print(json.dumps(predict[-1]), file=sys.stderr)

    class Opts:  # what serve_load.start_server reads
        max_batch_size, max_batch_delay_ms, threads = 32, 5, 1

    log = work / "server.log"
    proc, ports = start_server("m", onnx, Opts, log)
    url, path = f"http://127.0.0.1:{ports[0]}/v2/models/m/infer", "/v2/models/m/infer"
    serve = []
    try:
        idle = proc_mib(proc.pid)
        claims = images_body([claiming(SIDE, i) for i in range(32)])
        real = images_body([jpeg(SIDE)] * 4)
        bomb = gzip_bomb(2 * GiB)
        cases = [
            (f"32 JPEGs declaring {SIDE}x{SIDE} each ({len(claims) // 1024} KB body)", lambda: post(url, claims)),
            (f"4 real {SIDE}x{SIDE} JPEGs ({len(real) // 1024} KB body, decoded)", lambda: post(url, real)),
            (f"gzip body of {len(bomb) / 2**20:.1f} MiB inflating to 2 GiB",
             lambda: post(url, bomb, {"Content-Encoding": "gzip"})),
            ("200 MB body, chunked (no Content-Length)", lambda: (lambda r: (r[0], f"{r[1]} bytes sent"))(
                chunked_body(ports[0], path, 200 * 10**6))),
        ]
        for name, send in cases:
            serve.append(serve_case(name, proc.pid, send))
            print(json.dumps(serve[-1]), file=sys.stderr)
        ok = post(url, images_body([jpeg(64)]))[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    load_after = os.getloadavg()
    machine = machine_info()
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in
                    ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}) if Path("/proc/cpuinfo").exists() else []
    result = {
        "predict": predict,
        "predict_growth_mib": {b: round(max(r["peak_rss_mib"] for r in predict if r["batch"] == b and r["files"] > 10)
                                        - max(r["peak_rss_mib"] for r in predict if r["batch"] == b and r["files"] == 10), 1)
                               for b in (32, 1)},
        "serve_idle_mib": round(idle["VmRSS"], 1), "serve": serve, "serve_good_request_after": ok,
        "serve_exit_code": code,
        "all_under_1gb": all(r["peak_rss_mib"] < LIMIT_MIB for r in predict) and all(
            r["peak_mib"] < LIMIT_MIB for r in serve),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
        "cpu": machine["cpu_model"], "isa": flags, "usable_cpus": machine["usable_cpus"],
        "versions": {k: _version(k) for k in ("onnxruntime", "mlserver", "uvicorn", "pillow", "numpy")},
        "time_utc": machine["time_utc"],
    }
    text = dumps_json(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))


if __name__ == "__main__":
    main()
