# syntax=docker/dockerfile:1
# vfpt-deploy images (docs/tensorrt.md has the commands).
#
#   export  GPU image on NVIDIA's PyTorch container (CUDA, cuDNN, torch and TensorRT come with it):
#           fold a run.pt, export ONNX, build a TensorRT engine ON THE GPU IT WILL RUN ON, verify it.
#   serve   slim serving image: the lean install (onnxruntime, no torch) + MLServer, running
#           `vfpt-deploy serve` (the default target).
#
# Jetson (L4T, JetPack 6): build the export image from the iGPU flavour of the same container,
#   --build-arg BASE=nvcr.io/nvidia/pytorch:24.08-py3-igpu
# The serve image builds for arm64 as is (python:3.11-slim is multi-arch; onnxruntime runs on the CPU).

ARG BASE=nvcr.io/nvidia/pytorch:24.08-py3
ARG SERVE_BASE=python:3.11-slim

# ----------------------------------------------------------------------------------------------- export
FROM ${BASE} AS export
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/vfpt-deploy
COPY pyproject.toml README.md ./
COPY vfpt_deploy vfpt_deploy
COPY exporters exporters
COPY runtime runtime
# The container's own CUDA builds of torch/torchvision and its TensorRT are pinned as constraints, so pip
# never replaces them with PyPI wheels (the PyPI 'tensorrt' names are shims that download elsewhere).
# cuda-python (major version = the container's CUDA) gives the engine runner its device buffers. [export]
# brings timm and the ONNX tooling; onnxruntime (CPU) verifies the ONNX, TensorRT the engine.
RUN python -m pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt)==' > /tmp/keep.txt \
 && python -c "import tensorrt, torch; print('TensorRT', tensorrt.__version__, '| torch', torch.__version__)" \
 && python -m pip install -c /tmp/keep.txt ".[export]" "cuda-python>=12,<13" \
 && python -c "import vfpt_deploy.extras as e; e.check_one_onnxruntime()" \
 && vfpt-deploy --help > /dev/null
WORKDIR /work
ENTRYPOINT ["vfpt-deploy"]
CMD ["--help"]

# ------------------------------------------------------------------------------------------------ serve
FROM ${SERVE_BASE} AS serve
# The base install's onnxruntime is the CPU build. ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]" (x86-64) swaps
# in the CUDA build: uninstall one, then install the other, since both write the same 'onnxruntime' module
# and must never be installed together.
ARG ORT_PACKAGE=onnxruntime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/vfpt-deploy
COPY pyproject.toml README.md ./
COPY vfpt_deploy vfpt_deploy
COPY exporters exporters
COPY runtime runtime
# The lean install plus MLServer: no torch. The checks: one onnxruntime flavour, and the CLI and the runtime
# load no torch.
RUN pip install "./[serve]" \
 && if [ "${ORT_PACKAGE}" != "onnxruntime" ]; then \
        pip uninstall -y onnxruntime && pip install "${ORT_PACKAGE}>=1.18"; \
    fi \
 && python -c "import sys, vfpt_deploy.cli, vfpt_deploy.runtime, vfpt_deploy.extras as e; e.check_one_onnxruntime(); assert 'torch' not in sys.modules" \
 && vfpt-deploy serve --help > /dev/null \
 && useradd --create-home --uid 10001 vfpt
USER 10001
WORKDIR /models
# V2 / Open Inference Protocol: REST, gRPC, Prometheus metrics (vfpt-deploy serve --port/--grpc-port/--metrics-port).
EXPOSE 8080 8081 8082
ENTRYPOINT ["vfpt-deploy"]
# Mount the exported model at /models/model.onnx, or give other arguments (serve A.onnx B.onnx, predict ...).
CMD ["serve", "/models/model.onnx", "--host", "0.0.0.0"]
