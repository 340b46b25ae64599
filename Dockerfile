# dynfuse images.
#
#   docker build -t dynfuse .                          # CPU image (the default target, "cpu")
#   docker build -t dynfuse:gpu --target gpu .         # NVIDIA image: ONNX Runtime's CUDA provider
#   docker run --rm -p 8000:8000 -p 8001:8001 dynfuse
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 dynfuse:gpu
#
# Port 8000 serves HTTP (/v1, /v2, /metrics, the playground), 8001 the Open Inference Protocol over
# gRPC (tritonclient.grpc, KServe's gRPC client): Triton's ports. -e DYNFUSE_GRPC_PORT= turns gRPC off.
#
# The model store: both images carry the default model the repository ships ("shapes",
# store/shapes/1, ONNX files with its provenance) at /opt/dynfuse/store (DYNFUSE_STORE); nothing
# is trained while an image is built. To serve your own model instead, mount a store written by
# `dynfuse export` (STORE/<name>/<version>/model.json + component files) over that path, read-only:
#
#   docker run --rm -p 8000:8000 -v /abs/path/to/store:/opt/dynfuse/store:ro dynfuse
#
# and pick the model with -e DYNFUSE_MODEL=<name> when the store holds more than one. A store
# mounted elsewhere works too with -e DYNFUSE_STORE=/that/path. Runtime images hold no torch, so
# they serve the ONNX backend; the TorchScript backend needs torch (see GPU_TORCH below).
#
# Stages: requirements (dependency lists from pyproject.toml) -> wheel (the project) -> gpu, cpu.
# "cpu" is last, so it is the default target. Dependencies are installed before the project's
# source reaches a stage, so editing the source rebuilds only the wheel and the last layers of
# each image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9: keep the base image and the
# ORT_GPU_VERSION below in step.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG ORT_GPU_VERSION=1.31.1

# --- requirements: the dependency lists, read from pyproject.toml alone (cache-friendly) --------
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
# serve.txt: the serving core; serve-gpu.txt: the same without onnxruntime (onnxruntime-gpu
# replaces it; the two must not be installed side by side); train.txt: the train extra.
RUN python -c 'import re, tomllib; from pathlib import Path; \
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]; \
    serve, train = project["dependencies"], project["optional-dependencies"]["train"]; \
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group().lower().replace("_", "-"); \
    out = Path("/requirements"); out.mkdir(); \
    (out / "serve.txt").write_text("\n".join(serve) + "\n"); \
    (out / "serve-gpu.txt").write_text("\n".join(r for r in serve if name(r) != "onnxruntime") + "\n"); \
    (out / "train.txt").write_text("\n".join(train) + "\n")'

# --- wheel: the project itself (pure Python) ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models/ models/
COPY export/ export/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- gpu: CUDA + cuDNN runtime, ONNX Runtime with the CUDA execution provider -------------------
FROM ${CUDA_IMAGE} AS gpu
ARG TORCH_VERSION
ARG ORT_GPU_VERSION
# GPU_TORCH=1 adds CUDA torch (TorchScript backend on the GPU); the ONNX backend needs none.
ARG GPU_TORCH=0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu 24.04's python3 is 3.12 (onnxruntime-gpu 1.31 needs >= 3.11); a venv, as PEP 668 asks.
# DL3008 ignored: the pinned base image already fixes the Ubuntu release and so python3's minor
# version; exact Ubuntu package revisions vanish from the archive and would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=requirements /requirements/ /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/serve-gpu.txt "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && if [ "${GPU_TORCH}" = 1 ]; then \
        pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"; \
    fi \
    && rm -rf /tmp/requirements
COPY --from=wheel /wheels/ /tmp/wheels/
# --no-deps: the wheel asks for onnxruntime, which onnxruntime-gpu provides.
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 dynfuse \
    && useradd --system --uid 10001 --gid dynfuse --create-home --home-dir /home/dynfuse \
        --shell /usr/sbin/nologin dynfuse
# The shipped default model; mount your own store over this path (see the top of this file).
COPY store/shapes/1 /opt/dynfuse/store/shapes/1
ENV DYNFUSE_STORE=/opt/dynfuse/store \
    DYNFUSE_BACKEND=onnx \
    DYNFUSE_DEVICE=cuda \
    DYNFUSE_GRPC_PORT=8001
USER 10001:10001
WORKDIR /home/dynfuse
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["dynfuse", "serve", "--host", "0.0.0.0", "--port", "8000"]

# --- cpu (default): the serving core only, no torch ----------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=requirements /requirements/ /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/serve.txt \
    && rm -rf /tmp/requirements
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --system --gid 10001 dynfuse \
    && useradd --system --uid 10001 --gid dynfuse --create-home --home-dir /home/dynfuse \
        --shell /usr/sbin/nologin dynfuse
# The shipped default model; mount your own store over this path (see the top of this file).
COPY store/shapes/1 /opt/dynfuse/store/shapes/1
ENV DYNFUSE_STORE=/opt/dynfuse/store \
    DYNFUSE_BACKEND=onnx \
    DYNFUSE_DEVICE=cpu \
    DYNFUSE_GRPC_PORT=8001
USER 10001:10001
WORKDIR /home/dynfuse
EXPOSE 8000 8001
# /readyz answers 503 until the model is loaded and warm; urlopen raises on it (exit 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["dynfuse", "serve", "--host", "0.0.0.0", "--port", "8000"]
