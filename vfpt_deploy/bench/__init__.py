"""Latency benchmarks of a VFPT model across runtimes: what `vfpt-deploy bench` calls. settings.py (what a
run is asked), backends.py (each way of running the model), loop.py (the batch sweep and its statistics),
report.py (JSON, CSV, plot, table).

Backends (each measured over a batch sweep, or skipped with the reason):
  torch          PyTorch eager, the unfolded model (live FFT): the reference
  torch-folded   PyTorch eager, prompts folded to constants (fold_model)
  ort-cpu        onnxruntime, CPU execution provider
  ort-cuda       onnxruntime, CUDA EP -- only when a session really runs on it (session.get_providers())
  ort-cuda-graph the same with onnxruntime's CUDA graphs (enable_cuda_graph): each batch size is captured
                 once on IO-bound device buffers and replayed; Unavailable when onnxruntime refuses the graph
  ort-trt        onnxruntime, TensorRT EP -- likewise
  tensorrt       a TensorRT engine file (needs the tensorrt module and a CUDA GPU)

Interleaving: every backend is loaded first; then at each batch size every row is warmed up and timed
round-robin (loop.ROUNDS rounds, each starting one row later), as the scripts in benchmarks/ do, so a change
in a shared machine's load falls on every backend alike. The report records the load average before and
after, and the CPU's ISA flags (runtime.hardware); each skip is recorded and printed once.

Timing: perf_counter around each call on CPU; on GPU CUDA events on the stream the work runs on, with
inputs and outputs already on the device (onnxruntime IO binding) so copies are not timed. `e2e` adds
end-to-end rows on GPU backends that time host->device copy, inference and device->host copy with
perf_counter. Statistics and machine facts come from vfpt_deploy.runtime.timing.

The ort-* and tensorrt backends run the runtime's own predictors (OnnxPredictor, TensorRTPredictor)
through their public API; a run.pt is exported to ONNX by the one export pipeline (pipeline.export_run),
verified against PyTorch like any export. Option values are checked here (one-line UsageError): loop
lengths by LoopSpec, batch sizes 1..4096 and, once a model's image size is known, an input batch of at
most a quarter of physical RAM, before anything is allocated.

Multi-task artifacts (an ONNX or engine whose metadata lists `tasks`) take a task index per image. By
default each batch replays a mixed-task stream: every sample's task is drawn uniformly at random (seeded)
from the artifact's tasks, balanced so that a batch of b images holds min(b, T) different tasks. With
`task` set (`--task NAME`), each batch size is also measured on a single-task stream of that task, right
after the mixed one on the same session, so the two compare in one run. Every row says its stream.

The GPU paths (CUDA events, IO binding, TensorRT engines) follow the documented torch / onnxruntime /
TensorRT APIs; they run only where a GPU is present.
"""

from vfpt_deploy.bench.backends import (ORT_PROVIDERS, Backend, CudaEventTimer, CudartEventTimer,  # noqa: F401
                                        OrtBackend, TensorRTBackend, TorchBackend, make_input, torch_dtype)
from vfpt_deploy.bench.loop import (ROUNDS, Stream, add_skip, check_request, check_task_request, measure_backend,  # noqa: F401
                                    measure_backends, run_bench, split_loop, stream_task_ids, streams)
from vfpt_deploy.bench.report import (BenchReport, Result, Skipped, machine_line, results_table, skip_lines,  # noqa: F401
                                      table_width)
from vfpt_deploy.bench.settings import (BACKENDS, DTYPES, FOLDS, FORMAT, MAX_BATCH, VERSION, BenchSettings,  # noqa: F401
                                        check_batches, check_input_memory, parse_batches)
from vfpt_deploy.errors import Unavailable  # noqa: F401
