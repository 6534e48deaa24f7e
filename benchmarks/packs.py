"""Prompt packs (issue 22): what a pack costs against a single-task ONNX and the baked multi-task artifact.

Tasks are built in memory on one backbone with random weights (benchmarks/multitask.py's Tasks: deep prompts
scaled x10, VTAB-1k class counts; task 0 has M = --prompts and 100 classes). Measured, onnxruntime CPU:
  size      a pack file (task 0, with a 3-row golden set as an export with --data writes) vs the single-task
            ONNX of the same run, and the backbone artifact
  load      opening the backbone artifact's session; adding one pack (read + table assembly) and the first
            inference after it, on that warm session
  latency   one batch of --batch (default 8), sample i of task i mod T over T = --tasks packs, interleaved
            (round-robin, another starting form each repeat; each form timed by the median of --iters calls,
            ratios within a repeat, then the median over repeats):
              baked         the multi-task ONNX of the same T tasks (tables as graph constants)
              packs.inputs  the backbone artifact, tables fed as graph inputs (PackSession)
              packs.init    the backbone artifact with the tables added as overridable initializers (graph
                            inputs with stored defaults), not fed
              single        task 0's single-task ONNX on a batch of task 0
  rss       peak RSS (VmHWM) of a fresh process: one single-task session (a bare InferenceSession, and an
            OnnxPredictor, which reads the graph first as predict / serve do) vs the backbone session holding
            --rss-packs packs (default 16: added at once with add_many, and one by one); each runs one
            batch; median of --rss-repeats processes
Before timing, every pack row of the mixed batch is checked against the baked artifact (max |logit diff|).

    .venv/bin/python benchmarks/packs.py --tiny --repeats 2 --out .scratch/packs_tiny.json   # seconds
    .venv/bin/python benchmarks/packs.py --out docs/benchmarks/packs.json --work .scratch/bench_packs
    .venv/bin/python benchmarks/packs.py --reuse --work .scratch/bench_packs --threads 1 --no-rss \
        --out docs/benchmarks/packs_latency_1thread.json       # latency again, on the files kept
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from multitask import _vm  # noqa: E402  (VmHWM / VmRSS of this process; multitask imports no torch at load)


def rss_child(spec: dict) -> dict:
    """One single-task session, or the backbone session with spec['packs']; one batch; VmHWM. Torch-free."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    from vfpt_deploy.runtime.onnx_runner import make_session
    from vfpt_deploy.runtime.packs import PackSession

    x = np.random.default_rng(0).standard_normal((spec["batch"], 3, *spec["image_size"]), dtype=np.float32)
    baseline = _vm("VmHWM")
    if spec["packs"]:
        s = PackSession(spec["model"], ["cpu"], threads=spec["threads"])
        if spec["bulk"]:
            s.add_many(spec["packs"])
        else:
            for p in spec["packs"]:
                s.add(p)
        s.infer(x, [s.names[i % len(s.names)] for i in range(len(x))])
    elif spec.get("predictor"):  # as predict / serve open a single-task file (its graph read first)
        from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

        s = OnnxPredictor(spec["model"], ["cpu"], threads=spec["threads"])
        s.infer(x)
    else:
        s = make_session(spec["model"], ["cpu"], threads=spec["threads"])
        s.run(None, {"images": x})
    rss = _vm("VmRSS")
    return {"baseline_bytes": baseline, "peak_bytes": max(_vm("VmHWM"), rss)}


def measure_rss(model: Path, packs: list[Path], image_size, batch: int, threads: int, bulk: bool = True,
                predictor: bool = False) -> dict:
    spec = {"model": str(model), "packs": [str(p) for p in packs], "image_size": list(image_size), "batch": batch,
            "threads": threads, "bulk": bulk, "predictor": predictor}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(spec)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"error: the RSS child failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_initializers(backbone: Path, arrays: dict, out: Path) -> Path:
    """The backbone artifact with `arrays` stored as initializers of its table inputs: onnxruntime's overridable
    initializers (a graph input with a stored default)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(backbone))
    for name, a in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
    onnx.save_model(m, str(out))
    return out


def make_pack(tasks, spec: dict, backbone: Path, out: Path) -> Path:
    """A pack file as `export --format pack --data ...` writes it (3 golden rows), without the verification."""
    import torch

    from vfpt_deploy.artifacts.compare import Tolerances
    from vfpt_deploy.artifacts.files import file_sha256
    from vfpt_deploy.artifacts.golden import KEY, encode
    from vfpt_deploy.exporters.pack import write_run_pack
    from vfpt_deploy.folding.packs import pack_tables
    from vfpt_deploy.verify import InputSet, make_golden

    run = tasks.run(spec)
    g = torch.Generator().manual_seed(spec["index"])
    x = torch.randn(8, 3, *tasks.image_size, generator=g).numpy()
    sets = [InputSet("random", x[:4], None, random=True), InputSet("images", x[4:], None)]
    golden = encode(make_golden(run, sets, Tolerances.for_precision("fp32"), "fp32", rows=(1, 2)))
    write_run_pack(run, out, pack_tables(run), spec["name"], file_sha256(backbone), {KEY: golden})
    return out


def timed(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rss-packs", type=int, default=16)
    ap.add_argument("--rss-repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep the files --work already holds (no re-export)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-memory part")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency part")
    ap.add_argument("--rss-child", default=None)
    args = ap.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return
    if args.out is None:
        ap.error("--out FILE.json is required")
    import tempfile

    from multitask import Tasks, task_specs

    from vfpt_deploy.exporters.onnx import export_onnx, export_tasks
    from vfpt_deploy.exporters.pack import export_backbone
    from vfpt_deploy.runtime.packs import PackSession
    from vfpt_deploy.threads import set_torch_threads

    set_torch_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="packs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    tasks = Tasks(args.tiny, args.model)
    specs = task_specs(max(args.tasks, args.rss_packs), [args.prompts])
    t0 = time.perf_counter()

    def made(path: Path, make) -> Path:
        if not (args.reuse and path.is_file()):
            make(path)
        return path

    single = made(work / "single.onnx", lambda p: export_onnx(tasks.run(specs[0]), p, fold="kv"))
    backbone = made(work / "backbone.onnx", lambda p: export_backbone(tasks.run(specs[0]), p))
    baked = made(work / f"baked_T{args.tasks}.onnx",
                 lambda p: export_tasks(tasks.task_set(specs[:args.tasks]), p, fold="kv"))
    packs = [made(work / f"{s['name']}.pack.safetensors", lambda p, s=s: make_pack(tasks, s, backbone, p))
             for s in specs]
    log(f"exported in {time.perf_counter() - t0:.0f} s")
    result = {"model": tasks.name, "prompts": args.prompts, "tasks": args.tasks, "batch": args.batch,
              "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "load_average_start": os.getloadavg()}
    try:
        from vfpt_deploy.runtime.hardware import summary

        result["cpu"] = summary()
    except Exception:  # noqa: BLE001 - informative only
        pass
    result["size"] = {"pack_bytes": packs[0].stat().st_size, "single_onnx_bytes": single.stat().st_size,
                      "backbone_bytes": backbone.stat().st_size, "pack_task": specs[0]["name"]}
    result["size"]["pack_vs_single"] = result["size"]["pack_bytes"] / result["size"]["single_onnx_bytes"]

    # load: the backbone session, then one pack added to it and the first inference
    x = np.random.default_rng(0).standard_normal((args.batch, 3, *tasks.image_size), dtype=np.float32)
    t0 = time.perf_counter()
    session = PackSession(backbone, ["cpu"], threads=args.threads)
    opened = time.perf_counter() - t0
    for p in packs[1:args.tasks]:
        session.add(p)
    t0 = time.perf_counter()
    session.add(packs[0])
    added = time.perf_counter() - t0
    session.infer(x[:1], specs[0]["name"])
    first = time.perf_counter() - t0
    result["load"] = {"backbone_session_s": opened, "add_pack_s": added, "add_pack_to_first_answer_s": first,
                      "packs_loaded": len(session.names)}

    # latency forms
    from vfpt_deploy.runtime.onnx_runner import make_session

    names = [s["name"] for s in specs[:args.tasks]]
    mixed = [names[i % len(names)] for i in range(args.batch)]
    tables = session._tables
    ids = tables.index(mixed)
    init = make_session(with_initializers(backbone, tables.arrays, work / "backbone_init.onnx"), ["cpu"],
                        threads=args.threads)
    baked_s = make_session(baked, ["cpu"], threads=args.threads)
    single_s = make_session(single, ["cpu"], threads=args.threads)
    baked_ids = np.array([i % args.tasks for i in range(args.batch)], np.int64)
    forms = {
        "baked": lambda: baked_s.run(None, {"images": x, "task": baked_ids})[0],
        "packs.inputs": lambda: session.run(x, ids, tables),
        "packs.init": lambda: init.run(None, {"images": x, "task": ids})[0],
        "single": lambda: single_s.run(None, {"images": x})[0],
    }
    outs = {k: f() for k, f in forms.items()}
    fin = np.isfinite(outs["baked"])
    result["check_max_abs_diff"] = {k: float(np.abs(outs[k][:, :outs["baked"].shape[1]][fin] - outs["baked"][fin]).max())
                                    for k in ("packs.inputs", "packs.init")}
    rows = []
    keys = list(forms)
    for r in range(0 if args.no_latency else args.repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        row = {k: timed(forms[k], args.iters) for k in order}
        rows.append(row)
        log(f"repeat {r}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items()))
    ratio = lambda a, b: statistics.median(r[a] / r[b] for r in rows)  # noqa: E731
    result["latency_s"] = {k: statistics.median(r[k] for r in rows) for k in keys} if rows else None
    result["ratios"] = None if not rows else {"packs_inputs_vs_baked": ratio("packs.inputs", "baked"),
                        "packs_init_vs_baked": ratio("packs.init", "baked"),
                        "packs_inputs_vs_init": ratio("packs.inputs", "packs.init"),
                        "baked_vs_single": ratio("baked", "single")}
    session.close()
    init = baked_s = single_s = None

    # peak memory, fresh processes, interleaved
    rss = {"single": [], "single_predictor": [], "packs": [], "packs_one_by_one": []}
    for _ in range(0 if args.no_rss else args.rss_repeats):
        rss["single"].append(measure_rss(single, [], tasks.image_size, args.batch, args.threads)["peak_bytes"])
        rss["single_predictor"].append(measure_rss(single, [], tasks.image_size, args.batch, args.threads,
                                                   predictor=True)["peak_bytes"])
        for key, bulk in (("packs", True), ("packs_one_by_one", False)):
            rss[key].append(measure_rss(backbone, packs[:args.rss_packs], tasks.image_size, args.batch,
                                        args.threads, bulk)["peak_bytes"])
    if rss["single"]:
        med = {k: statistics.median(v) for k, v in rss.items()}
        result["rss"] = {"single_peak_bytes": med["single"], "packs_peak_bytes": med["packs"],
                         "packs_one_by_one_peak_bytes": med["packs_one_by_one"], "packs": args.rss_packs,
                         "single_predictor_peak_bytes": med["single_predictor"],
                         "packs_vs_single_predictor": med["packs"] / med["single_predictor"],
                         "packs_vs_single": med["packs"] / med["single"],
                         "packs_one_by_one_vs_single": med["packs_one_by_one"] / med["single"], "all": rss}
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("size", "load", "ratios", "rss", "check_max_abs_diff")}, indent=1))


if __name__ == "__main__":
    main()
