"""Latency benchmarks of a VFPT model across runtimes: what `vfpt-deploy bench` calls (backends.py)."""
from vfpt_deploy.bench.backends import *  # noqa: F401,F403
from vfpt_deploy.bench.backends import (BenchReport, BenchSettings, OrtBackend, Result, Stream,  # noqa: F401
                                        TensorRTBackend, Unavailable, make_input, parse_batches, results_table,
                                        run_bench, stream_task_ids, table_width)
