import csv
import json
import os
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from vfpt_deploy.bench import (BenchReport, BenchSettings, OrtBackend, Result, Skipped, Unavailable, parse_batches,
                               run_bench)
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, save_run
from vfpt_deploy.cli import app
from vfpt_deploy.errors import VFPTError
from vfpt_deploy.runtime.onnx_runner import gpu_present
from vfpt_deploy.runtime.preprocess import Preprocess
from vfpt_deploy.runtime.timing import LoopSpec, machine_info, measure, peak_rss_bytes, reset_peak_rss, summarize

from conftest import TINY, TINY_KWARGS, tiny_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--batch", "1,2", "--warmup", "1", "--iters", "3"]
# onnxruntime-gpu lists CUDA even without a GPU (and falls back); the CPU build [dev] installs does not list it.
CUDA_LISTED = "CUDAExecutionProvider" in ort.get_available_providers()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "run.pt"
    model = tiny_model(num_prompts=4, alpha=0.5, scale=10.0)
    save_run(path, model, BackboneInfo(TINY, TINY_KWARGS), [str(i) for i in range(5)], Preprocess(resize=[32, 32]))
    return path


# -- statistics --------------------------------------------------------------------------------------
def test_summary_against_hand_computed_values():
    # 1, 2, 3, 4, 10 ms. Linear interpolation between order statistics at rank q/100 * (n - 1):
    #   p50 -> rank 2.0  -> 3
    #   p90 -> rank 3.6  -> 4 + 0.6 * (10 - 4) = 7.6
    #   p95 -> rank 3.8  -> 4 + 0.8 * 6       = 8.8
    #   p99 -> rank 3.96 -> 4 + 0.96 * 6      = 9.76
    # mean 20 / 5 = 4; std (ddof=1): squared deviations 9 + 4 + 1 + 0 + 36 = 50, / 4 = 12.5 -> sqrt(12.5)
    # throughput at batch 2: 2 images * 5 calls / 0.020 s = 500 images/s
    s = summarize([0.003, 0.010, 0.001, 0.004, 0.002], batch=2)  # order must not matter
    assert s.n == 5 and (s.min_ms, s.max_ms) == pytest.approx((1.0, 10.0))
    assert (s.p50_ms, s.p90_ms, s.p95_ms, s.p99_ms) == pytest.approx((3.0, 7.6, 8.8, 9.76))
    assert s.mean_ms == pytest.approx(4.0) and s.std_ms == pytest.approx(12.5 ** 0.5)
    assert s.throughput == pytest.approx(500.0)


def test_percentiles_on_known_values():
    s = summarize(np.arange(1, 101) / 1e3)  # 1..100 ms: linear interpolation between order statistics
    assert (s.p50_ms, s.p90_ms, s.p95_ms, s.p99_ms) == pytest.approx((50.5, 90.1, 95.05, 99.01))
    one = summarize([0.004])
    assert one.std_ms == 0.0 and one.p99_ms == pytest.approx(4.0)
    with pytest.raises(VFPTError):
        summarize([])


class FakeTime:
    """A clock that moves only when the measured function runs: one call takes `step` seconds."""

    def __init__(self, step: float = 1.0):
        self.now, self.step, self.calls = 0.0, step, 0

    def clock(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.step

    def time(self, fn) -> float:  # a Timer reading the same clock
        t0 = self.now
        fn()
        return self.now - t0


def test_measure_by_count():
    calls = []
    times = measure(lambda: calls.append(1), LoopSpec(warmup=3, iters=7))
    assert len(times) == 7 and len(calls) == 10 and (times >= 0).all()


def test_measure_by_time_counts_calls_on_a_fake_clock():
    ft = FakeTime(step=1.0)
    times = measure(ft.fn, LoopSpec(warmup=None, warmup_s=5, iters=None, duration_s=15), timer=ft, clock=ft.clock)
    # warm-up: calls at t = 0, 1, 2, 3, 4 (the clock reaches 5); measurement: t = 5 .. 19 (reaches 20)
    assert ft.calls == 20 and len(times) == 15 and np.all(times == 1.0)
    # a duration shorter than one call still yields min_iters calls
    ft = FakeTime(step=1.0)
    times = measure(ft.fn, LoopSpec(warmup=0, iters=None, duration_s=0.5, min_iters=3), timer=ft, clock=ft.clock)
    assert len(times) == 3 and ft.calls == 3


def test_measure_by_time_stops_at_max_iters(monkeypatch):
    import vfpt_deploy.runtime.timing as timing

    monkeypatch.setattr(timing, "MAX_ITERS", 40)
    ft = FakeTime(step=0.0)  # a clock that never moves: only the call bound ends the loops
    times = measure(ft.fn, LoopSpec(warmup=None, warmup_s=1, iters=None, duration_s=1), timer=ft, clock=ft.clock)
    assert len(times) == 40 and ft.calls == 80


@pytest.mark.parametrize("kwargs, words", [
    (dict(warmup=1, warmup_s=1.0), "not both"),
    (dict(warmup=None, warmup_s=None), "not both"),
    (dict(warmup=-1), ">= 0"),
    (dict(iters=5, duration_s=1.0), "not both"),
    (dict(iters=0), ">= 1"),
    (dict(iters=None, duration_s=0.0), "> 0"),
])
def test_loop_spec_rejects(kwargs, words):
    with pytest.raises(VFPTError, match=words):
        LoopSpec(**kwargs).check()


def test_parse_batches():
    assert parse_batches("1, 8,32") == (1, 8, 32)
    for bad in ("", "0", "1,-2", "a", "1,1", "1.5"):
        with pytest.raises(VFPTError):
            parse_batches(bad)


def test_peak_rss_sees_a_fresh_allocation_and_resets():
    import mmap

    MiB = 2**20
    scoped = reset_peak_rss()
    start = peak_rss_bytes()
    # Fresh anonymous pages, touched (a malloc'd buffer may reuse freed pages that are still resident).
    buf = mmap.mmap(-1, 64 * MiB)
    buf.write(b"\1" * (64 * MiB))
    peak = peak_rss_bytes()
    assert peak >= 64 * MiB
    if scoped:  # Linux: the mark covers only what ran since the reset, so a row sees its own peak
        assert peak - start >= 60 * MiB
        buf.close()  # unmapped: the pages go back to the OS
        reset_peak_rss()
        assert peak_rss_bytes() <= peak - 30 * MiB


def test_machine_info_and_timing_import_no_torch():
    m = machine_info()
    assert m["logical_cpus"] == os.cpu_count() and m["cpu_model"]
    assert m["physical_cores"] is None or 1 <= m["physical_cores"] <= os.cpu_count()
    assert "numpy" in m["versions"] and isinstance(m["gpus"], list)
    code = "import sys, vfpt_deploy.runtime.timing as t; t.machine_info(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- end to end --------------------------------------------------------------------------------------
def test_bench_cli_end_to_end(run_pt, tmp_path):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    res = invoke("bench", run_pt, *FAST, "--report", out_json, "--csv", out_csv, "--plot", out_png)
    assert res.exit_code == 0, res.output
    assert "torch-folded" in res.output and "ort-cpu" in res.output and "p99" in res.output

    report = json.loads(out_json.read_text())
    assert report["format"] == "vfpt-deploy.bench"
    assert {"cpu_model", "physical_cores", "logical_cpus", "usable_cpus", "gpus", "versions"} <= set(report["machine"])
    assert {"torch", "onnxruntime-gpu"} & set(report["machine"]["versions"])
    measured = {(r["backend"], r["batch"]) for r in report["results"]}
    assert {(b, n) for b in ("torch", "torch-folded", "ort-cpu") for n in (1, 2)} <= measured
    for r in report["results"]:
        s = r["stats"]
        assert s["n"] == 3 and 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["throughput"] > 0 and r["peak_rss_mib"] > 10
    ort_row = next(r for r in report["results"] if r["backend"] == "ort-cpu")
    assert ort_row["providers"] == ["CPUExecutionProvider"] and ort_row["detail"]["fold"] == "kv"
    skipped = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "engine" in skipped["tensorrt"]
    if not gpu_present():  # the CPU onnxruntime has no CUDA; onnxruntime-gpu lists it but cannot use it here
        assert ("fell back" if CUDA_LISTED else "has no CUDAExecutionProvider") in skipped["ort-cuda"]
        assert "ort-cuda" not in {r["backend"] for r in report["results"]}  # skipped, not faked

    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report["results"])
    assert rows[0]["cpu_model"] == report["machine"]["cpu_model"] and float(rows[0]["p95_ms"]) > 0

    import matplotlib.image

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out_png).shape[0] > 100


def test_bench_onnx_artifact_by_duration(run_pt, tmp_path):
    from vfpt_deploy.artifacts.checkpoint import load_run
    from vfpt_deploy.exporters.onnx import export_onnx

    onnx_path = export_onnx(load_run(run_pt), tmp_path / "m.onnx", fold="tokens").path
    settings = BenchSettings(batches=(1, 3), loop=LoopSpec(warmup=None, warmup_s=0.02, iters=None, duration_s=0.05), e2e=True)
    report = run_bench(onnx=[onnx_path], backends=["ort-cpu"], settings=settings)
    assert [(r.backend, r.batch, r.timing) for r in report.results] == [("ort-cpu", 1, "host"), ("ort-cpu", 3, "host")]
    assert all(r.stats["n"] >= 3 for r in report.results)  # --e2e adds nothing on CPU: there are no copies
    assert report.results[0].detail["artifact"] == "m.onnx"


def test_json_report_is_strict(tmp_path):
    """A non-finite number (a zero-duration loop's throughput, say) is written as null, never as NaN."""
    stats = summarize([0.0, 0.0]).to_dict()
    assert math.isinf(stats["throughput"])
    stats["p99_ms"] = float("nan")
    report = BenchReport({"cpu_model": "x", "versions": {}}, {"threads": None},
                         [Result("ort-cpu", 1, "host", stats, 1.0, None, "cpu", detail={"x": float("inf")})])
    text = report.write_json(tmp_path / "r.json").read_text()

    def refuse(name):
        raise AssertionError(f"{name} written to strict JSON")

    data = json.loads(text, parse_constant=refuse)
    assert data["results"][0]["stats"]["throughput"] is None and data["results"][0]["stats"]["p99_ms"] is None
    with open(report.write_csv(tmp_path / "r.csv")) as f:
        assert json.loads(next(csv.DictReader(f))["detail"], parse_constant=refuse) == {"x": None}


@pytest.mark.skipif(gpu_present() or not CUDA_LISTED,
                    reason="needs onnxruntime-gpu on a machine without a usable GPU (CUDA falls back)")
def test_ort_cuda_fallback_is_reported_not_timed(run_pt, tmp_path):
    from vfpt_deploy.artifacts.checkpoint import load_run
    from vfpt_deploy.exporters.onnx import export_onnx

    onnx_path = export_onnx(load_run(run_pt), tmp_path / "m.onnx").path
    with pytest.raises(Unavailable, match="fell back to CPUExecutionProvider"):
        OrtBackend("ort-cuda", "ort-cuda", onnx_path, None, 0, {})


def test_torch_dtype_runs_a_copy_and_refuses_what_cannot_run(run_pt):
    """--dtype: the PyTorch backends run a converted copy (the run's own model stays float32 on the CPU, since
    it is exported and verified afterwards); the live FFT in half precision is skipped with the reason."""
    from vfpt_deploy.bench import TorchBackend
    from vfpt_deploy.artifacts.checkpoint import load_run
    from vfpt_deploy.folding import fold_model

    run = load_run(run_pt)
    folded = fold_model(run.model, "kv")
    b = TorchBackend("torch-folded", folded, (32, 32), "cpu", 0, {"fold": "kv"}, "bf16")
    assert b.runner(2, False)().dtype == torch.bfloat16 and b.detail == {"fold": "kv", "dtype": "bf16"}
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert {p.device.type for p in run.model.parameters()} == {"cpu"}
    with pytest.raises(Unavailable, match="torch cannot run in fp16 on cpu"):  # the CPU's FFT has no half precision
        TorchBackend("torch", run.model, (32, 32), "cpu", 0, {}, "fp16")
    report = run_bench(checkpoint=run_pt, backends=["torch-folded"],
                       settings=BenchSettings(batches=(1,), loop=LoopSpec(warmup=0, iters=2), device="cpu", dtype="bf16"))
    assert [r.detail["dtype"] for r in report.results] == ["bf16"]


def test_ort_cuda_graph_backend_is_skipped_without_cuda(run_pt, tmp_path):
    """ort-cuda-graph is a backend of its own (CUDA graphs on, IO binding); where CUDA cannot run it is
    reported as skipped with the reason, never timed on another provider."""
    from vfpt_deploy.artifacts.checkpoint import load_run
    from vfpt_deploy.exporters.onnx import export_onnx

    onnx_path = export_onnx(load_run(run_pt), tmp_path / "m.onnx").path
    settings = BenchSettings(batches=(1,), loop=LoopSpec(warmup=0, iters=2), threads=1)
    report = run_bench(onnx=[onnx_path], backends=["ort-cpu", "ort-cuda-graph"], settings=settings)
    measured = {r.backend for r in report.results}
    if gpu_present() and CUDA_LISTED:  # onnxruntime-gpu on a GPU: timed, or skipped with onnxruntime's reason
        why = [s.reason for s in report.skipped if s.backend == "ort-cuda-graph"]
        assert "ort-cuda-graph" in measured or any(re.search("CUDA.graph|fell back", w) for w in why), why
    else:
        assert measured == {"ort-cpu"}
        why = next(s.reason for s in report.skipped if s.backend == "ort-cuda-graph")
        assert ("fell back" if CUDA_LISTED else "has no CUDAExecutionProvider") in why


def flat(output: str) -> str:
    """CLI output on one line: rich's error box (borders, wrapping) removed."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


# words: a regex; range errors come from the library (">= 1") or from the CLI's own option ranges
@pytest.mark.parametrize("args, words", [
    (["--batch", "0"], "positive"),
    (["--batch", "1,x"], "comma-separated"),
    (["--iters", "5", "--duration", "1"], "not both"),
    (["--warmup", "2", "--warmup-time", "1"], "not both"),
    (["--iters", "0"], ">= 1|greater than or equal to 1"),
    (["--iters", "2000000"], "<= 1000000|less than or equal to 1000000"),
    (["--warmup", "2000000"], "<= 1000000|less than or equal to 1000000"),
    (["--duration", "inf"], "finite"),
    (["--warmup-time", "inf"], "finite"),  # refused at once, never an endless warm-up
    (["--duration", "nan"], "finite"),
    (["--duration", "-1"], "> 0"),
    (["--duration", "3601"], "<= 3600"),
    (["--batch", "4097"], "4096"),
    (["--threads", "0"], "threads"),
    (["--threads", "1025"], "threads"),
    (["--backend", "openvino"], "unknown backend"),
    (["--device", "tpu"], "device"),
    (["--dtype", "fp64"], "dtype must be one of fp32, fp16, bf16"),
])
def test_bad_arguments_are_rejected(run_pt, args, words):
    res = invoke("bench", run_pt, "--backend", "torch", *args) if "--backend" not in args else invoke("bench", run_pt, *args)
    assert res.exit_code in (1, 2) and isinstance(res.exception, SystemExit), res.output  # a one-line error, no crash
    assert re.search(words, flat(res.output)) and "Traceback" not in res.output, res.output
    assert "measuring" not in res.output  # refused before any backend ran


def test_bad_inputs_are_rejected(run_pt, tmp_path):
    for args, words in [((), "nothing to benchmark"),
                        (("--onnx", tmp_path / "missing.onnx"), "does not exist"),
                        (("--onnx", run_pt, "--backend", "torch"), "pass the run.pt"),
                        ((run_pt, "--backend", "tensorrt"), "engine"),
                        ((tmp_path / "nope.pt",), "does not exist")]:
        res = invoke("bench", *args)
        assert res.exit_code in (1, 2) and isinstance(res.exception, SystemExit), (args, res.output)
        assert words in res.output and "Traceback" not in res.output, (args, res.output)


def test_prompt_cost_script_tiny(tmp_path):
    """The prompt-cost benchmark end to end on a tiny ViT: three forms, ratios, JSON and PNG."""
    res = subprocess.run([sys.executable, "benchmarks/prompt_cost.py", "--model", "tiny", "--prompts", "0,4",
                          "--batches", "1,2", "--repeats", "2", "--iters", "2", "--out", tmp_path],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "prompt_cost_tiny.json").read_text())
    forms = {(r["form"], r["M"], r["batch"]) for r in data["summary"]}
    assert forms == {(f, m, b) for f, m in (("plain", 0), ("tokens", 4), ("kv", 4)) for b in (1, 2)}
    assert all(r["ratio"] > 0 for r in data["summary"])
    assert data["tokens_vs_kv_max_abs_diff"]["4"] < 1e-3  # the two folds compute the same logits
    assert (tmp_path / "prompt_cost_tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_runtime_cost_script_tiny(tmp_path):
    """The interleaved runtime/prompt-cost benchmark (the GPU check runs it on CUDA) on a tiny ViT on the CPU:
    torch and onnxruntime rows for plain and kv at each batch, ratios within repeats, CUDA graphs skipped
    with the reason."""
    res = subprocess.run([sys.executable, "benchmarks/runtime_cost.py", "--model", "tiny", "--device", "cpu",
                          "--dtype", "fp32", "--prompts", "4", "--batches", "1,2", "--repeats", "2", "--iters", "2",
                          "--warmup", "1", "--threads", "1", "--out", tmp_path],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "runtime_cost.json").read_text())
    cells = {(r["runtime"], r["form"], r["batch"]) for r in data["rows"]}
    assert cells == {(rt, f, b) for rt in ("torch", "ort") for f in ("plain", "kv") for b in (1, 2)}
    assert all(len(r["repeat_ms"]) == 2 and r["median_ms"] > 0 for r in data["rows"])
    whats = {(r["what"], r["batch"]) for r in data["ratios"]}
    assert {(w, b) for w in ("torch kv / plain", "ort kv / plain", "plain: ort / torch", "kv: ort / torch")
            for b in (1, 2)} == whats
    assert data["providers"] == {"ort:plain": ["CPUExecutionProvider"], "ort:kv": ["CPUExecutionProvider"]}
    assert {(s["runtime"], s["form"]) for s in data["skipped"]} == {("ort-graph", "plain"), ("ort-graph", "kv")}
    assert all("CUDA" in s["reason"] for s in data["skipped"])


# -- multi-task artifacts (issue 11): mixed-task and single-task streams ------------------------------------
from vfpt_deploy.bench import Stream, TensorRTBackend, stream_task_ids  # noqa: E402

TASKS = ["cars", "birds", "flat"]  # tasks_onnx's, in index order
QUICK = BenchSettings(batches=(1, 8), loop=LoopSpec(warmup=0, iters=2), threads=1)


def test_mixed_stream_mixes_every_batch():
    for batch in (2, 3, 7, 8, 32):
        ids = stream_task_ids(TASKS, Stream(), batch, seed=0)
        assert ids.dtype == np.int64 and ids.shape == (batch,) and set(ids) <= {0, 1, 2}
        counts = np.bincount(ids, minlength=3)
        assert (counts > 0).sum() == min(batch, 3) and counts.max() - counts.min() <= 1, (batch, counts)
        np.testing.assert_array_equal(ids, stream_task_ids(TASKS, Stream(), batch, seed=0))  # seeded
    # shuffled, not task after task; another seed gives another order
    assert len({tuple(stream_task_ids(TASKS, Stream(), 8, s)) for s in range(5)}) == 5
    # each sample's task is uniform: over 600 seeded batches of one, every task comes up about 200 times
    firsts = np.bincount([stream_task_ids(TASKS, Stream(), 1, s)[0] for s in range(600)], minlength=3)
    assert firsts.min() > 150, firsts
    np.testing.assert_array_equal(stream_task_ids(TASKS, Stream("birds"), 4, 0), [1, 1, 1, 1])


@pytest.fixture
def fed(monkeypatch):
    """The task indices every OnnxPredictor.infer call of the test received."""
    from vfpt_deploy.runtime.onnx_runner import OnnxPredictor

    calls, infer = [], OnnxPredictor.infer

    def spy(self, batch, task_ids=None):
        calls.append(None if task_ids is None else np.array(task_ids))
        return infer(self, batch, task_ids)

    monkeypatch.setattr(OnnxPredictor, "infer", spy)
    return calls


def test_multi_task_onnx_replays_a_mixed_stream(tasks_onnx, fed):
    report = run_bench(onnx=[tasks_onnx], backends=["ort-cpu"], settings=QUICK)
    assert [(r.batch, r.stream) for r in report.results] == [(1, "mixed"), (8, "mixed")]
    assert len(fed) == 4 and all(ids is not None for ids in fed)  # every call fed the `task` input
    assert {len(set(ids)) for ids in fed if len(ids) == 8} == {3}  # every batch of 8 holds every task
    counts = report.results[1].detail["task_counts"]
    assert set(counts) == set(TASKS) and sum(counts.values()) == 8
    assert report.settings["task"] is None


def test_task_adds_a_single_task_stream_on_the_same_session(tasks_onnx, fed):
    report = run_bench(onnx=[tasks_onnx], backends=["ort-cpu"], settings=BenchSettings(**{**vars(QUICK), "task": "birds"}))
    assert [(r.batch, r.stream) for r in report.results] == [(1, "mixed"), (1, "task:birds"), (8, "mixed"), (8, "task:birds")]
    single = [r for r in report.results if r.stream == "task:birds"]
    assert [r.detail["task_counts"] for r in single] == [{"birds": 1}, {"birds": 8}]
    # interleaved: 2 rounds of 1 call, the second starting with the other stream
    assert [ids.tolist() for ids in fed[:4]] == [fed[0].tolist(), [1], [1], fed[0].tolist()]
    assert [len(set(ids)) for ids in fed[4:]] == [3, 1, 1, 3] and fed[5][0] == fed[6][0] == 1  # batch 8: mixed holds all 3
    assert report.settings["task"] == "birds"


def test_single_task_rows_have_no_stream(exported_run):
    report = run_bench(onnx=[exported_run[1]], backends=["ort-cpu"], settings=QUICK)
    assert [r.stream for r in report.results] == [None, None] and "task_counts" not in report.results[0].detail


def test_multi_task_cli_json_table_and_csv(tasks_onnx, tmp_path):
    res = invoke("bench", "--onnx", tasks_onnx, "-b", "ort-cpu", *FAST, "--threads", "1", "--task", "flat", "--json",
                 "--csv", tmp_path / "r.csv")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):res.output.rindex("}") + 1])
    assert [(r["batch"], r["stream"]) for r in data["results"]] == [(1, "mixed"), (1, "task:flat"), (2, "mixed"),
                                                                    (2, "task:flat")]
    assert data["settings"]["task"] == "flat" and data["results"][3]["detail"]["task_counts"] == {"flat": 2}
    assert len(data["results"][2]["detail"]["task_counts"]) == 2  # a batch of 2 mixes two tasks
    with open(tmp_path / "r.csv") as f:
        assert [r["stream"] for r in csv.DictReader(f)] == ["mixed", "task:flat", "mixed", "task:flat"]
    res = invoke("bench", "--onnx", tasks_onnx, "-b", "ort-cpu", *FAST, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert re.search(r"ort-cpu\s+1\s+mixed\s+3\s", res.output) and "task:" not in res.output  # the stream column
    assert "3 tasks; streams: mixed" in flat(res.output)


def test_multi_task_usage_errors(tasks_onnx, exported_run, run_pt, tmp_path):
    engine = _fake_tasks_engine(tasks_onnx, tmp_path)
    for args, words in [(("--onnx", tasks_onnx, "--task", "nope"), "has no such task; it holds cars, birds, flat"),
                        (("--engine", engine, "--task", "nope"), "has no such task; it holds cars, birds, flat"),
                        (("--onnx", exported_run[1], "--task", "cars"), "holds a single task; drop --task"),
                        (("--onnx", tasks_onnx, "--onnx", exported_run[1], "--task", "cars"), "holds a single task"),
                        ((run_pt, "--task", "cars"), "a run.pt holds a single task")]:
        res = invoke("bench", *args, "-b", "ort-cpu", *FAST)
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (args, res.output)
        assert words in flat(res.output) and "Traceback" not in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "measuring" not in res.output, (args, res.output)


def _fake_tasks_engine(onnx_path, folder):
    """An engine file with the sidecar a build of onnx_path would write (bench reads the tasks from it
    before anything runs; TensorRT never sees the file)."""
    from vfpt_deploy.artifacts.files import file_sha256
    from vfpt_deploy.artifacts.schema import SIDECAR_FORMAT, SIDECAR_VERSION, read_graph

    engine = folder / "tasks.engine"
    engine.write_bytes(b"not a real engine")
    side = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "engine": {"sha256": file_sha256(engine)},
            "tensorrt": {"flavor": "trt-rtx", "module": "tensorrt_rtx", "version": "1.7.1"}, "build": {},
            "profile": {"input": "images", **{k: [4, 3, 32, 32] for k in ("min", "opt", "max")},
                        "task": {"input": "task", "dtype": "int64", "min": [4], "opt": [4], "max": [4]}},
            "metadata": read_graph(onnx_path).metadata}
    (folder / "tasks.engine.json").write_text(json.dumps(side))
    return engine


class FakeEngine:
    """What TensorRTBackend.runner uses of a TensorRTPredictor, recording the task indices it is given."""

    min_batch, profile_max = 1, 8

    def __init__(self):
        self.calls = []

    def infer(self, batch, task_ids=None):
        self.calls.append(("infer", task_ids))

    def load(self, batch, task_ids=None):
        self.calls.append(("load", task_ids))

    def execute(self):
        self.calls.append(("execute", None))


def test_tensorrt_backend_feeds_task_ids():
    backend = object.__new__(TensorRTBackend)  # no GPU here: the runner's half, on a stand-in predictor
    backend.predictor, backend.image_size, backend.seed = FakeEngine(), (32, 32), 0
    ids = stream_task_ids(TASKS, Stream(), 4, 0)
    backend.runner(4, True, ids)()
    backend.runner(4, False, ids)()
    calls = backend.predictor.calls
    assert [c[0] for c in calls] == ["infer", "load", "execute"] and calls[0][1] is ids and calls[1][1] is ids


# -- interleaving, skips once, load and ISA (issue 23) -------------------------------------------------------
class FakeBackend:
    """A backend whose calls write its name to a shared log; unavailable at the batch sizes in `refuse`."""

    device, providers, detail, tasks, image_size = "cpu", [], {}, [], (8, 8)

    def __init__(self, name, calls, refuse=()):
        self.name, self.calls, self.refuse = name, calls, refuse

    def runner(self, batch, e2e, task_ids=None):
        if batch in self.refuse:
            raise Unavailable("no CUDA here")
        return lambda: self.calls.append((self.name, batch))

    def timer(self, e2e):
        from vfpt_deploy.runtime.timing import PerfCounterTimer

        return PerfCounterTimer()

    cuda_peak_reset = close = lambda self: None
    cuda_peak_mib = lambda self: None  # noqa: E731


def test_backends_are_timed_round_robin_and_each_skip_is_recorded_once():
    from vfpt_deploy.bench import measure_backends, skip_lines

    calls = []
    backends = [FakeBackend("a", calls), FakeBackend("b", calls), FakeBackend("gpu", calls, refuse=(1, 8, 32)),
                FakeBackend("c", calls)]
    report = BenchReport({}, {})
    settings = BenchSettings(batches=(1, 8, 32), loop=LoopSpec(warmup=2, iters=10)).check()
    measure_backends(backends, settings, report)
    at1 = [name for name, batch in calls if batch == 1]
    assert at1[:6] == ["a"] * 2 + ["b"] * 2 + ["c"] * 2  # warm-up, 2 calls each
    chunks = [at1[i] for i in range(6, len(at1), 2)]  # 10 timed calls each, in 5 rounds of 2
    assert chunks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert [(r.backend, r.batch) for r in report.results] == [(n, b) for n in "abc" for b in (1, 8, 32)]
    assert all(r.stats["n"] == 10 and r.detail["rounds"] == 5 for r in report.results)
    assert [(s.backend, s.batches) for s in report.skipped] == [("gpu", [1, 8, 32])]
    assert skip_lines(report.skipped) == ["gpu at batches 1, 8, 32: no CUDA here"]
    report.skipped += [Skipped(n, "this onnxruntime build has no CUDAExecutionProvider") for n in ("ort-cuda", "ort-trt")]
    assert skip_lines(report.skipped)[1:] == ["ort-cuda, ort-trt: this onnxruntime build has no CUDAExecutionProvider"]


def test_bench_records_the_load_and_the_isa(run_pt, tmp_path):
    res = invoke("bench", run_pt, "--backend", "torch", "--backend", "torch-folded", *FAST, "--report",
                 tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    machine = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert len(machine["load_before"]) == 3 and len(machine["load_after"]) == 3
    from vfpt_deploy.runtime.hardware import cpu

    assert machine["isa"] == cpu()["isa"] and machine["arch"] == cpu()["arch"]
    assert "load " in res.output and "(1-min average, before -> after)" in res.output
    if cpu()["isa"]:
        assert f"ISA {' '.join(cpu()['isa'])}" in res.output
