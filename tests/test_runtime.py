"""The onnxruntime predictor (provider fallback, onnxruntime's own noise, threads, close), the timing loop's
option checks, and bench's refusal of an input batch that cannot fit memory."""
import gc
import math
import weakref

import numpy as np
import onnxruntime as ort
import pytest

import vfpt_deploy.bench.backends as bench_backends
import vfpt_deploy.bench.settings as bench_settings
from vfpt_deploy.bench import BenchSettings, make_input, run_bench
from vfpt_deploy.artifacts.checkpoint import BackboneInfo, load_run, save_run
from vfpt_deploy.errors import ArtifactError, RuntimeSetupError, UsageError
from vfpt_deploy.exporters.onnx import export_onnx
from vfpt_deploy.runtime.onnx_runner import GPU_PROVIDERS, OnnxPredictor, gpu_present, make_session
from vfpt_deploy.runtime.preprocess import Preprocess
from vfpt_deploy.runtime.timing import LoopSpec

from conftest import TINY, TINY_KWARGS, tiny_model

CPU_ONLY = pytest.mark.skipif(gpu_present() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                              reason="needs onnxruntime-gpu on a machine without a usable GPU (CUDA falls back)")
FALLBACK = "asked for CUDAExecutionProvider but onnxruntime fell back to CPU"


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    model = tiny_model(num_prompts=4, alpha=0.5, scale=10.0)
    save_run(folder / "run.pt", model, BackboneInfo(TINY, TINY_KWARGS), [str(i) for i in range(5)],
             Preprocess(resize=[32, 32]))
    return export_onnx(load_run(folder / "run.pt"), folder / "m.onnx", fold="tokens").path


def batch(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32)


# -- provider fallback and onnxruntime's noise -------------------------------------------------------
@CPU_ONLY
@pytest.mark.parametrize("providers", [["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                       ["tensorrt", "cuda", "cpu"]])
def test_gpu_provider_fallback_is_refused_in_one_line(onnx_path, providers, capfd):
    with pytest.raises(RuntimeSetupError) as e:
        OnnxPredictor(onnx_path, providers)
    msg = str(e.value)
    assert "fell back to CPU" in msg and "--providers cpu" in msg and "--allow-fallback" in msg
    assert "\n" not in msg
    if providers == ["cuda"]:
        assert msg.startswith(FALLBACK)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # no library load errors, no 'EP Error' banner


@CPU_ONLY
def test_gpu_provider_fallback_accepted_when_allowed(onnx_path, capfd):
    with OnnxPredictor(onnx_path, ["tensorrt", "cuda"], allow_fallback=True) as p:
        assert p.providers == ["CPUExecutionProvider"]
        assert p.infer(batch()).shape == (2, 5)
    session = make_session(onnx_path, ["cuda"], allow_fallback=True)
    assert session.get_providers() == ["CPUExecutionProvider"]
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


@CPU_ONLY
def test_onnxruntime_logging_is_restored_after_the_session(onnx_path, capfd):
    """The quiet logger level lasts only while our session is made: onnxruntime's own sessions log again."""
    OnnxPredictor(onnx_path, ["cuda"], allow_fallback=True)
    assert capfd.readouterr() == ("", "")
    ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    out, err = capfd.readouterr()
    assert "CUDAExecutionProvider" in out + err


def test_cpu_provider_is_not_a_fallback(onnx_path, capfd):
    p = OnnxPredictor(onnx_path, ["cpu"])
    assert p.providers == ["CPUExecutionProvider"]
    assert capfd.readouterr() == ("", "")


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2", 1025])
def test_threads_must_be_a_positive_integer(onnx_path, threads):
    with pytest.raises(UsageError, match="threads must be an integer"):
        OnnxPredictor(onnx_path, ["cpu"], threads=threads)


def test_threads_and_provider_options(onnx_path):
    assert OnnxPredictor(onnx_path, ["cpu"], threads=1).infer(batch(1)).shape == (1, 5)
    with pytest.raises(UsageError, match="not among the providers"):
        make_session(onnx_path, ["cpu"], provider_options={"cuda": {"device_id": 0}})
    with pytest.raises(UsageError, match="optimization"):
        make_session(onnx_path, ["cpu"], optimization="fastest")


# -- close ------------------------------------------------------------------------------------------
def test_close_releases_the_session(onnx_path):
    p = OnnxPredictor(onnx_path, ["cpu"])
    ref = weakref.ref(p.session)
    p.close()
    gc.collect()
    assert p.session is None and ref() is None and p.providers == []
    with pytest.raises(RuntimeSetupError, match="closed"):
        p.infer(batch())
    p.close()  # twice is fine


def test_with_block_closes(onnx_path):
    with OnnxPredictor(onnx_path, ["cpu"]) as p:
        logits = p.infer(batch())
        assert logits.shape == (2, 5) and np.isfinite(logits).all()
    assert p.session is None
    with pytest.raises(RuntimeSetupError, match="closed"):
        p.infer(batch())


# -- the timing loop's options ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(warmup=None, warmup_s=math.inf), "finite"),
    (dict(warmup=None, warmup_s=math.nan), "finite"),
    (dict(warmup=None, warmup_s=-1.0), "> 0"),
    (dict(warmup=None, warmup_s=3600.5), "<= 3600"),
    (dict(iters=None, duration_s=math.inf), "finite"),
    (dict(iters=None, duration_s=-math.inf), "finite"),
    (dict(iters=None, duration_s=math.nan), "finite"),
    (dict(iters=None, duration_s=-0.5), "> 0"),
    (dict(iters=None, duration_s=1e9), "<= 3600"),
    (dict(iters=None, duration_s=True), "finite"),
    (dict(iters=1_000_001), "<= 1000000"),
    (dict(iters=2.5), "integer"),
    (dict(warmup=1_000_001), "<= 1000000"),
    (dict(warmup=-3), ">= 0"),
    (dict(min_iters=0), ">= 1"),
])
def test_loop_spec_rejects_non_finite_negative_and_huge(kwargs, words):
    with pytest.raises(UsageError, match=words) as e:
        LoopSpec(**kwargs).check()
    assert "\n" not in str(e.value)


def test_loop_spec_accepts_the_limits():
    LoopSpec(warmup=None, warmup_s=3600, iters=None, duration_s=3600.0).check()
    LoopSpec(warmup=1_000_000, iters=1_000_000).check()
    LoopSpec(warmup=0, iters=1).check()


# -- bench settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(batches=(0,)), "positive"), (dict(batches=(4097,)), "4096"), (dict(batches=(1, 1)), "repeat"),
    (dict(batches=()), "at least one"), (dict(threads=0), "threads"), (dict(threads=1025), "threads"),
    (dict(fold="fourier"), "fold"),
])
def test_bench_settings_reject(kwargs, words):
    with pytest.raises(UsageError, match=words):
        BenchSettings(**kwargs).check()


def test_input_that_cannot_fit_memory_is_refused_before_allocating():
    # 4096 x 3 x 8192 x 8192 float32 is 3 TiB: without the check numpy would try (and fail differently).
    with pytest.raises(UsageError, match="use smaller --batch"):
        make_input(4096, (8192, 8192), 0)


def test_bench_batch_too_large_is_refused_before_any_row(onnx_path, monkeypatch):
    one = 3 * 32 * 32 * 4  # bytes of one 32x32 input image
    monkeypatch.setattr(bench_settings, "physical_memory_bytes", lambda: 4 * 16 * one)  # a quarter fits 16 images
    made = []
    real_make_input = bench_backends.make_input
    monkeypatch.setattr(bench_backends, "make_input", lambda *a: made.append(a) or real_make_input(*a))
    rows = []
    settings = BenchSettings(batches=(1, 17), loop=LoopSpec(warmup=0, iters=1))
    with pytest.raises(UsageError, match="batch 17 of 32x32 images") as e:
        run_bench(onnx=[onnx_path], backends=["ort-cpu"], settings=settings, on_row=rows.append)
    assert "\n" not in str(e.value)
    assert rows == [] and made == []  # refused before batch 1 ran, and before any input was allocated
    settings = BenchSettings(batches=(1, 16), loop=LoopSpec(warmup=0, iters=1))
    report = run_bench(onnx=[onnx_path], backends=["ort-cpu"], settings=settings)
    assert [r.batch for r in report.results] == [1, 16]


def test_concurrent_sessions_leave_the_terminal_streams_alone(onnx_path):
    """Session creation silences onnxruntime by swapping sys.stdout/stderr; threads that overlap (serve
    loads models concurrently) must not leave another thread's swap in place."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    before = sys.stdout, sys.stderr
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: make_session(onnx_path, ["cpu"]), range(32)))
    assert (sys.stdout, sys.stderr) == before


# Whichever onnxruntime build is installed (CI's is the CPU one, where the tests above skip), and on a
# machine with a usable GPU too, where onnxruntime-gpu really runs CUDA and nothing is refused or falls back.
def test_gpu_provider_missing_or_unusable_is_refused_in_one_line(onnx_path, capfd):
    try:
        p = OnnxPredictor(onnx_path, ["cuda"])
    except RuntimeSetupError as e:
        msg = str(e)
        assert "\n" not in msg and "--providers cpu" in msg and "--allow-fallback" in msg
    else:  # accepted only where CUDA really runs
        assert gpu_present() and p.providers[0] == "CUDAExecutionProvider", p.providers
    assert capfd.readouterr() == ("", "")


def test_allow_fallback_runs_on_the_cpu_whichever_onnxruntime(onnx_path, capfd):
    with OnnxPredictor(onnx_path, ["tensorrt", "cuda"], allow_fallback=True) as p:
        if p.providers != ["CPUExecutionProvider"]:  # a usable GPU: TensorRT or CUDA first, the CPU behind
            assert gpu_present() and p.providers[0] in GPU_PROVIDERS and p.providers[-1] == "CPUExecutionProvider"
        assert p.infer(batch()).shape == (2, 5)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("asked, used, refused", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], True),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
    (["CPUExecutionProvider"], ["CPUExecutionProvider"], False),
    (["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
])
def test_fallback_rule(asked, used, refused):
    from vfpt_deploy.runtime.onnx_runner import check_fallback

    if refused:
        with pytest.raises(RuntimeSetupError, match="fell back to CPU"):
            check_fallback(asked, used)
    else:
        check_fallback(asked, used)


def test_fixed_dims_give_a_session_for_one_batch_size(onnx_path):
    """make_session(fixed_dims=...): onnxruntime's free-dimension override (what the CUDA-graph benchmark
    uses): the session's input has that batch, runs it, and refuses another; bad values are one-line errors."""
    free = make_session(onnx_path, ["cpu"])
    assert free.get_inputs()[0].shape[0] == "batch"
    with OnnxPredictor(onnx_path, ["cpu"], fixed_dims={"batch": 3}) as p:
        assert p.session.get_inputs()[0].shape == [3, 3, 32, 32]
        assert p.infer(batch(3)).shape == (3, 5)
        with pytest.raises(ArtifactError, match="batch of 2"):
            p.infer(batch(2))
    for bad in ({"batch": 0}, {"batch": 1.5}, {"": 2}, {"batch": True}):
        with pytest.raises(UsageError, match="fixed dimensions"):
            make_session(onnx_path, ["cpu"], fixed_dims=bad)
