# syntax=docker/dockerfile:1
# vfpt-deploy images (docs/tensorrt.md has the commands).
#
#   export  GPU image on NVIDIA's PyTorch container (CUDA, cuDNN, torch and TensorRT come with it):
#           fold a run.pt, export ONNX, build a TensorRT engine ON THE GPU IT WILL RUN ON, verify it.
#   serve   slim serving image: onnxruntime + numpy + Pillow, no torch (the default target).
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
# cuda-python (major version = the container's CUDA) gives the engine runner its device buffers.
RUN python -m pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt)==' > /tmp/keep.txt \
 && python -c "import tensorrt, torch; print('TensorRT', tensorrt.__version__, '| torch', torch.__version__)" \
 && python -m pip install -c /tmp/keep.txt . "cuda-python>=12,<13" \
 && vfpt-deploy --help > /dev/null
WORKDIR /work
ENTRYPOINT ["vfpt-deploy"]
CMD ["--help"]

# ------------------------------------------------------------------------------------------------ serve
FROM ${SERVE_BASE} AS serve
# onnxruntime for the CPU; "onnxruntime-gpu[cuda,cudnn]" for the CUDA execution provider on x86-64.
ARG ORT_PACKAGE=onnxruntime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/vfpt-deploy
COPY pyproject.toml README.md ./
COPY vfpt_deploy vfpt_deploy
COPY exporters exporters
COPY runtime runtime
# --no-deps: the package declares torch/timm for training and export; serving needs only these. The last
# command proves the serving path imports no torch.
RUN pip install --no-deps . \
 && pip install "numpy>=1.24" "pillow>=10" "typer>=0.12" "rich>=13" "${ORT_PACKAGE}>=1.18" \
 && python -c "import sys, vfpt_deploy.cli, vfpt_deploy.runtime; assert 'torch' not in sys.modules" \
 && useradd --create-home --uid 10001 vfpt
USER 10001
WORKDIR /models
ENTRYPOINT ["vfpt-deploy"]
CMD ["--help"]
