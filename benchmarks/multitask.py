"""Many tasks, one backbone (issue 11): what one multi-task ONNX saves against T single-task ONNX files.

Tasks are built in memory on ONE shared backbone object (random weights, fixed seeds): deep prompts,
prompts scaled x10 as trained ones are (benchmarks/prompt_cost.py), class counts of the first 16 VTAB-1k
tasks, two task sets:
  mixM    M cycles through --prompts (default 10, 25, 50, 100): one graph pads every task to the largest M
  m50     every task has M = --uniform-prompts (default 50): the issue's size goal
Task i has the same M, classes and seed wherever it appears, so a single-task file is exported once.
For every T in --tasks (default 1, 4, 16) and both sets:
  size     the multi-task ONNX (exporters.onnx.export_tasks) vs the T single-task ONNX (export_onnx, kv fold)
  rss      peak RSS (VmHWM) of a fresh process that opens one multi-task session, or the T single-task
           sessions, and runs one batch on each (onnxruntime CPU, --threads); median of --rss-repeats
           processes
and at the largest T, latency of one batch (--batch, default 8; onnxruntime CPU, --threads, default 1):
  <set>.mixed_batch  the multi-task session, sample i of task i mod T (mixM: every M in the batch)
  <set>.one_task     the same session, every sample of the reference task (task 2: M = 50 in both sets)
  single.<task>      that task's own single-task ONNX (the reference task; for mixM also the tasks with
                     the smallest and the largest M: what padding every sample to the largest M costs)
Forms are interleaved (round-robin, a different starting form every repeat); a repeat times each form
by the median of --iters calls; ratios are taken within a repeat, then the median over repeats. Before
timing, the mixed batch's rows are checked against each timed single-task file (max |logit diff|).

    .venv/bin/python benchmarks/multitask.py --out docs/benchmarks/multitask.json --work .scratch/bench_mt
    .venv/bin/python benchmarks/multitask.py --tiny --tasks 1,3 --repeats 2 --rss-repeats 1 --out mt.json  # seconds
    .venv/bin/python benchmarks/multitask.py --parts latency --work .scratch/bench_mt --reuse \
        --out docs/benchmarks/multitask_latency.json   # latency again, on the files the first run kept

Targets (issue 11): 16 tasks of M = 50 in one file under 1.25x one task's file; a mixed-task batch of 8
within 1.05x of a single-task batch of 8.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Class counts of the first 16 VTAB-1k tasks (CIFAR-100 ... dSprites/location), cycled past 16.
TASK_CLASSES = [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16]
TARGETS = {"size_m50_16_vs_one": 1.25, "latency_mixed_vs_one": 1.05}
REF_TASK = 2  # the reference single task of the latency part (M = 50 in both sets with the defaults)
PARTS = ("size", "rss", "latency")


def task_specs(count: int, prompts: list[int]) -> list[dict]:
    """Task i: M = prompts[i mod len], the i-th VTAB-1k class count; the name says both, so that the same
    task in two sets is one single-task file."""
    out = []
    for i in range(count):
        m, c = prompts[i % len(prompts)], TASK_CLASSES[i % len(TASK_CLASSES)]
        out.append({"index": i, "name": f"t{i}_m{m}_c{c}", "M": m, "classes": c})
    return out


class Tasks:
    """Runs built in memory on one backbone object, each once (by name)."""

    def __init__(self, tiny: bool, model: str) -> None:
        import torch

        from prompt_cost import MODELS
        from vfpt_deploy.models.backbone import create_backbone, state_sha256
        from vfpt_deploy.artifacts.checkpoint import BackboneInfo
        from vfpt_deploy.runs import preprocess_for

        self.name, self.kwargs = MODELS["tiny"] if tiny else MODELS.get(model, (model, {}))
        torch.manual_seed(0)
        self.backbone = create_backbone(self.name, **self.kwargs)
        self.info = BackboneInfo(self.name, dict(self.kwargs), source="random",
                                 sha256=state_sha256(self.backbone.state_dict()))
        self.preprocess = preprocess_for(self.backbone)
        self.image_size = tuple(self.backbone.patch_embed.img_size)
        self.runs: dict = {}

    def run(self, spec: dict):
        if spec["name"] not in self.runs:
            import torch

            from vfpt_deploy.artifacts.checkpoint import Run
            from vfpt_deploy.models.config import VFPTConfig
            from vfpt_deploy.models.vit.model import VFPTViT

            torch.manual_seed(10_000 + 1000 * spec["index"] + spec["M"])
            model = VFPTViT(self.backbone, spec["classes"], VFPTConfig(num_prompts=spec["M"], deep=True, alpha=0.5)).eval()
            with torch.no_grad():  # trained prompts are far from their tiny init
                for p in model.tuned_parameters().values():
                    p.mul_(10.0)
            self.runs[spec["name"]] = Run(model, self.info, [f"{spec['name']}-{c}" for c in range(spec["classes"])],
                                          self.preprocess, meta={})
        return self.runs[spec["name"]]

    def task_set(self, specs: list[dict]):
        from vfpt_deploy.folding.multitask import check_task_set

        return check_task_set([s["name"] for s in specs], [self.run(s) for s in specs])


def export_all(tasks: Tasks, sets: dict, needed: dict, work: Path, reuse: bool, log) -> tuple[dict, dict]:
    """({task name: single-task ONNX}, {(set, T): multi-task ONNX}) for what `needed` asks."""
    from vfpt_deploy.exporters.onnx import export_onnx, export_tasks

    singles, multis = {}, {}
    for name in needed["singles"]:
        spec = next(s for specs in sets.values() for s in specs if s["name"] == name)
        singles[name] = _export(work / f"single_{name}.onnx", reuse, log,
                                lambda p, s=spec: export_onnx(tasks.run(s), p, fold="kv"))
    for key in needed["multis"]:
        set_name, t = key
        multis[key] = _export(work / f"multi_{set_name}_T{t}.onnx", reuse, log,
                              lambda p, s=sets[set_name][:t]: export_tasks(tasks.task_set(s), p, fold="kv"))
    return singles, multis


def _export(path: Path, reuse: bool, log, fn) -> Path:
    if reuse and path.is_file():
        log(f"  reusing {path.name}")
        return path
    t0 = time.perf_counter()
    fn(path)
    log(f"  exported {path.name} in {time.perf_counter() - t0:.1f} s ({path.stat().st_size / 2**20:.1f} MiB)")
    return path


def sizes(sets: dict, counts: list[int], singles: dict, multis: dict, tasks: Tasks) -> list[dict]:
    """File bytes; the prompt constants' share computed from the multi-task module's constant shapes."""
    from vfpt_deploy.folding.multitask import fold_tasks

    rows = []
    for set_name, specs in sets.items():
        for t in counts:
            one = [singles[s["name"]].stat().st_size for s in specs[:t]]
            multi = multis[(set_name, t)].stat().st_size
            mt = fold_tasks(tasks.task_set(specs[:t]), "kv")
            kv_bytes = 4 * (mt.prompt_keys.numel() + mt.prompt_values.numel())  # stored unpadded (kv_rows)
            rows.append({"set": set_name, "T": t, "prompts": [s["M"] for s in specs[:t]],
                         "classes": [s["classes"] for s in specs[:t]], "multi_bytes": multi,
                         "single_bytes": one, "singles_total_bytes": sum(one),
                         "ratio_to_largest_single": multi / max(one), "ratio_to_first_single": multi / one[0],
                         "ratio_to_singles_total": multi / sum(one),
                         "kv_constants_bytes": kv_bytes, "prompts_total": sum(mt.num_prompts),
                         "head_bytes": 4 * (mt.head_weight.numel() + mt.head_bias.numel())})
            del mt
    return rows


# -- peak RSS, each measurement in a fresh process ------------------------------------------------
def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_child(spec: dict) -> dict:
    """Open every session of spec['sessions'] ([path, task ids or None]), run one batch on each, keep them
    all open; report VmHWM. Imports only onnxruntime and the torch-free runtime."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    from vfpt_deploy.runtime.onnx_runner import make_session
    from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME, TASK_INPUT

    x = np.random.default_rng(0).standard_normal((spec["batch"], 3, *spec["image_size"]), dtype=np.float32)
    baseline = _vm("VmHWM")
    t0, held = time.perf_counter(), []
    for path, ids in spec["sessions"]:
        sess = make_session(path, ["cpu"], threads=spec["threads"])
        feed = {INPUT_NAME: x} if ids is None else {INPUT_NAME: x, TASK_INPUT: np.asarray(ids, dtype=np.int64)}
        sess.run([OUTPUT_NAME], feed)
        held.append(sess)
    rss = _vm("VmRSS")  # Linux updates VmHWM lazily, so it can lag the current RSS: the peak is the larger
    return {"sessions": len(held), "baseline_bytes": baseline, "peak_bytes": max(_vm("VmHWM"), rss),
            "rss_after_bytes": rss, "seconds": time.perf_counter() - t0}


def measure_rss(sessions: list, image_size, batch: int, threads: int) -> dict:
    spec = {"sessions": [[str(p), ids] for p, ids in sessions], "image_size": list(image_size), "batch": batch,
            "threads": threads}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(spec)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"error: the RSS child failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mixed_ids(t: int, batch: int) -> list[int]:
    return [i % t for i in range(batch)]


def rss_rows(sets: dict, counts: list[int], singles: dict, multis: dict, image_size, args, log) -> list[dict]:
    """Each configuration measured --rss-repeats times (outer loop: repeats), since the peak of the very
    same file varies between processes by up to half the model size (allocator behaviour while loading)."""
    configs = [(s, t, form, sessions) for s, specs in sets.items() for t in counts
               for form, sessions in (("multi", [(multis[(s, t)], mixed_ids(t, args.batch))]),
                                      ("singles", [(singles[x["name"]], None) for x in specs[:t]]))]
    runs: dict = {c[:3]: [] for c in configs}
    for rep in range(args.rss_repeats):
        for s, t, form, sessions in configs:
            r = measure_rss(sessions, image_size, args.batch, args.threads)
            runs[(s, t, form)].append(r)
            log(f"  rss {rep + 1}/{args.rss_repeats} {s} T={t} {form}: peak {r['peak_bytes'] / 2**20:.0f} MiB "
                f"({r['sessions']} sessions, baseline {r['baseline_bytes'] / 2**20:.0f} MiB)")
    rows = []
    for (s, t, form), rs in runs.items():
        peaks = [r["peak_bytes"] for r in rs]
        rows.append({"set": s, "T": t, "form": form, "sessions": rs[0]["sessions"],
                     "peak_bytes": int(np.median(peaks)), "peak_min_bytes": min(peaks), "peak_max_bytes": max(peaks),
                     "baseline_bytes": int(np.median([r["baseline_bytes"] for r in rs])), "runs": rs})
    return rows


# -- latency ---------------------------------------------------------------------------------------
def latency_forms(sets: dict, t: int, batch: int) -> dict:
    """{form: (set or None, task name for a single file, task ids or None)} at T = t."""
    forms, ref = {}, min(REF_TASK, t - 1)
    for set_name, specs in sets.items():
        forms[f"{set_name}.mixed_batch"] = (set_name, None, mixed_ids(t, batch))
        forms[f"{set_name}.one_task"] = (set_name, None, [ref] * batch)
        picks = [specs[ref]]
        if len({s["M"] for s in specs[:t]}) > 1:  # padding yardsticks: the smallest and the largest M
            picks += [min(specs[:t], key=lambda s: s["M"]), max(specs[:t], key=lambda s: s["M"])]
        for s in picks:
            forms.setdefault(f"single.{s['name']}", (None, s["name"], None))
    return forms


def latency(sets: dict, t: int, singles: dict, multis: dict, image_size, args, log) -> dict:
    from prompt_cost import time_calls
    from vfpt_deploy.runtime.onnx_runner import make_session
    from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME, TASK_INPUT

    forms = latency_forms(sets, t, args.batch)
    x = np.random.default_rng(8).standard_normal((args.batch, 3, *image_size), dtype=np.float32)
    sessions, feeds = {}, {}
    for f, (set_name, single, ids) in forms.items():
        path = multis[(set_name, t)] if set_name else singles[single]
        shared = sessions.get(f"{set_name}.mixed_batch")  # one_task runs on the mixed_batch session
        sessions[f] = shared or make_session(path, ["cpu"], threads=args.threads)
        feeds[f] = {INPUT_NAME: x} if ids is None else {INPUT_NAME: x, TASK_INPUT: np.asarray(ids, dtype=np.int64)}
    outs = {f: sessions[f].run([OUTPUT_NAME], feeds[f])[0] for f in forms}  # also the first (warm-up) call
    diffs = {}
    for set_name, specs in sets.items():  # rows of the mixed batch vs each timed single-task file
        mixed, ids = f"{set_name}.mixed_batch", forms[f"{set_name}.mixed_batch"][2]
        for f, (_, single, _) in forms.items():
            rows = [i for i in range(args.batch) if single and specs[ids[i]]["name"] == single]
            if rows:
                c = specs[ids[rows[0]]]["classes"]
                diffs[f"{mixed} rows vs {f}"] = float(np.abs(outs[mixed][rows, :c] - outs[f][rows]).max())
    names, per = list(forms), {f: [] for f in forms}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for f in names[r % len(names):] + names[:r % len(names)]:
            per[f].append(time_calls(sessions[f], feeds[f], OUTPUT_NAME, args.warmup, args.iters))
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{f} {per[f][-1] * 1e3:.0f}" for f in names) + " ms")
    return {"T": t, "batch": args.batch, "threads": args.threads, "repeats": args.repeats, "iters": args.iters,
            "warmup": args.warmup, "forms": {f: {"set": s, "single": n, "task_ids": i} for f, (s, n, i) in forms.items()},
            "max_abs_diff": diffs, "raw_seconds": per, "load_before": load_before, "load_after": os.getloadavg(),
            "median_ms": {f: float(np.median(v)) * 1e3 for f, v in per.items()},
            "ratios": latency_ratios(sets, forms, per, t)}


def latency_ratios(sets: dict, forms: dict, per: dict, t: int) -> dict:
    """Within-repeat ratios of the multi-task forms to their yardsticks: median, min, max, and the ratio of
    the fastest repeats (robust when other jobs disturb some repeats)."""
    out = {}
    for set_name, specs in sets.items():
        mixed, one = f"{set_name}.mixed_batch", f"{set_name}.one_task"
        ref = f"single.{specs[min(REF_TASK, t - 1)]['name']}"
        own = [f"single.{s['name']}" for s in specs[:t]]
        pairs = [(mixed, one), (mixed, ref), (one, ref)] + [(mixed, f) for f in forms if f in own and f != ref]
        for a, b in pairs:
            num, den = np.array(per[a]), np.array(per[b])
            q = num / den
            out[f"{a} / {b}"] = {"median": float(np.median(q)), "min": float(q.min()), "max": float(q.max()),
                                 "of_fastest": float(num.min() / den.min())}
    return out


# -- main ------------------------------------------------------------------------------------------
def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"error: expected positive integers, got {text!r}")
    return values


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name (random weights)")
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT (32x32, 3 blocks, width 32) instead: a smoke test")
    ap.add_argument("--tasks", default="1,4,16", help="task counts T")
    ap.add_argument("--prompts", default="10,25,50,100", help="prompt counts M the mixed set cycles through")
    ap.add_argument("--uniform-prompts", type=int, default=50, help="M of every task in the uniform set")
    ap.add_argument("--parts", default=",".join(PARTS), help="what to measure: size, rss, latency (comma separated)")
    ap.add_argument("--batch", type=int, default=8, help="images per call (latency and the RSS batch)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (and torch's while exporting)")
    ap.add_argument("--repeats", type=int, default=10, help="round-robin latency repeats")
    ap.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per peak-RSS figure (median taken)")
    ap.add_argument("--iters", type=int, default=1, help="timed calls per form per repeat (median taken)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls per form per repeat (each session is "
                                                         "called once before the repeats in any case)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/multitask.json"), help="JSON file to write")
    ap.add_argument("--work", type=Path, default=None, help="folder for the ONNX files, kept (default: a temp folder, removed)")
    ap.add_argument("--reuse", action="store_true", help="reuse the ONNX files already in --work (same settings!)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.counts, args.cycle = sorted(set(ints(args.tasks))), ints(args.prompts)
    args.part_list = [p for p in args.parts.split(",") if p]
    if set(args.part_list) - set(PARTS) or not args.part_list:
        raise SystemExit(f"error: --parts takes {', '.join(PARTS)}")
    if min(args.batch, args.threads, args.repeats, args.rss_repeats, args.iters, args.uniform_prompts) < 1 or args.warmup < 0:
        raise SystemExit("error: --batch, --threads, --repeats, --iters, --uniform-prompts must be >= 1, --warmup >= 0")
    return args


def needed_files(sets: dict, counts: list[int], parts: list[str], batch: int) -> dict:
    top = max(counts)
    if {"size", "rss"} & set(parts):
        singles = {s["name"] for specs in sets.values() for s in specs[:top]}
        multis = [(n, t) for n in sets for t in counts]
    else:
        singles, multis = set(), []
    if "latency" in parts:
        singles |= {n for _, n, _ in latency_forms(sets, top, batch).values() if n}
        multis += [(n, top) for n in sets if (n, top) not in multis]
    return {"singles": sorted(singles), "multis": multis}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rss_child is not None:
        print(json.dumps(rss_child(json.loads(args.rss_child))), flush=True)
        return 0
    import torch

    from vfpt_deploy.artifacts.files import atomic_write, dumps_json
    from vfpt_deploy.runtime.timing import machine_info

    log = lambda s: print(s, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="vfpt-multitask-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    machine, loads = machine_info(), {"start": os.getloadavg()}
    log(f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, load {loads['start'][0]:.2f}")
    t0 = time.perf_counter()
    top = max(args.counts)
    sets = {"mixM": task_specs(top, args.cycle), f"m{args.uniform_prompts}": task_specs(top, [args.uniform_prompts])}
    tasks = Tasks(args.tiny, args.model)
    log(f"{tasks.name} {tasks.kwargs or ''}: T in {args.counts}, mixed M cycle {args.cycle}, parts {args.part_list}")
    singles, multis = export_all(tasks, sets, needed_files(sets, args.counts, args.part_list, args.batch),
                                 work, args.reuse, log)
    loads["exported"] = os.getloadavg()
    result = {"model": tasks.name, "backbone_kwargs": tasks.kwargs, "tiny": args.tiny, "task_counts": args.counts,
              "sets": sets, "batch": args.batch, "threads": args.threads, "targets": TARGETS, "machine": machine,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if "size" in args.part_list:
        result["size"] = sizes(sets, args.counts, singles, multis, tasks)
        for r in result["size"]:
            log(f"  size {r['set']} T={r['T']}: multi {r['multi_bytes'] / 2**20:.1f} MiB, {r['T']} singles "
                f"{r['singles_total_bytes'] / 2**20:.1f} MiB, {r['ratio_to_largest_single']:.3f}x the largest single")
    image_size = tasks.image_size
    del tasks  # the torch models: not part of what the sessions below cost
    if "rss" in args.part_list:
        result["rss"] = rss_rows(sets, args.counts, singles, multis, image_size, args, log)
        loads["rss"] = os.getloadavg()
    if "latency" in args.part_list:
        result["latency"] = latency(sets, top, singles, multis, image_size, args, log)
        for k, v in result["latency"]["ratios"].items():
            log(f"  {k}: {v['median']:.3f}x (repeats {v['min']:.3f}..{v['max']:.3f}, fastest {v['of_fastest']:.3f}x)")
    loads["end"] = os.getloadavg()
    result["verdicts"] = verdicts(result, sets, args)
    for k, v in result["verdicts"].items():
        log(f"target {k}: {v['value']:.3f} (limit {v['limit']}) {'met' if v['met'] else 'MISSED'}")
    result.update(loadavg=loads, wall_s=time.perf_counter() - t0)
    atomic_write(args.out, lambda p: Path(p).write_text(dumps_json(result, indent=2) + "\n"))
    log(f"wrote {args.out} ({result['wall_s']:.0f} s; load {loads['start'][0]:.2f} at the start, {loads['end'][0]:.2f} at the end)")
    if tmp:
        tmp.cleanup()
    return 0


def verdicts(result: dict, sets: dict, args) -> dict:
    out = {}
    uni = f"m{args.uniform_prompts}"
    for r in result.get("size", []):
        if r["set"] == uni and r["T"] == 16:
            out["size: 16 tasks in one file / one task's file"] = {
                "value": r["ratio_to_first_single"], "limit": TARGETS["size_m50_16_vs_one"],
                "met": r["ratio_to_first_single"] < TARGETS["size_m50_16_vs_one"]}
    for set_name in sets:
        k = f"{set_name}.mixed_batch / {set_name}.one_task"
        v = result.get("latency", {}).get("ratios", {}).get(k)
        if v:
            out[f"latency: {k}"] = {"value": v["median"], "limit": TARGETS["latency_mixed_vs_one"],
                                    "met": v["median"] <= TARGETS["latency_mixed_vs_one"]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
