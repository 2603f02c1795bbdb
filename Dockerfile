# syntax=docker/dockerfile:1
# vlmflow images. Targets:
#   app (the default)  topics, streams, replay, lag and offsets tools (no inference engine)
#   gpu                the inference worker: vLLM on CUDA from requirements/gpu.lock; the checkpoint is mounted
# Both run as an unprivileged user. Nothing secret is read at build time: credentials come at run time from
# VLMFLOW_* variables or from secret files in VLMFLOW_SECRETS_DIR (see docs/deployment.md).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# NOTE: a devel image, as vLLM's own: FlashInfer and Triton compile kernels at run time and need nvcc and gcc.
# CUDA 13.0 because the lock's torch 2.13.0 is PyPI's CUDA 13.0 build (nvidia-cuda-runtime 13.0.96 = 13.0.2);
# Ubuntu 24.04's python3 is the 3.12 the lock was resolved for (scripts/gpu-lock.sh).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04

# The project's sources, once, for both builders.
FROM scratch AS source
COPY pyproject.toml setup.py README.md /src/
COPY schemas/ /src/schemas/
COPY vlmflow/ /src/vlmflow/
COPY workers/ /src/workers/
COPY streams/ /src/streams/
COPY requirements/gpu.lock /src/requirements/

FROM ${PYTHON_IMAGE} AS build
# NOTE: the flywheel's screening compiled by mypyc (setup.py), which needs a C compiler here and nothing at run
# time; the last line refuses an image that would screen in pure Python.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLMFLOW_COMPILE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=source /src /src
RUN python -m venv /opt/vlmflow \
    && /opt/vlmflow/bin/pip install --no-cache-dir /src \
    && /opt/vlmflow/bin/python -c "from streams.flywheel.screening import compiled; assert compiled()"

FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=source /src /src
# NOTE: nothing is resolved here. First the lock, every package pinned and hashed, without faust-streaming (the
# worker does not use it, and its click<8.4 cannot sit beside vLLM's huggingface_hub); then vlmflow itself with
# --no-deps, built with the lock's setuptools. The last line checks that the worker imports without faust.
RUN python3 -m venv /opt/vlmflow \
    && /opt/vlmflow/bin/pip install --no-cache-dir --no-deps --require-hashes -r /src/requirements/gpu.lock \
    && /opt/vlmflow/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/vlmflow/bin/python -c "import vllm, torchvision, transformers, workers.worker, vlmflow.cli"

FROM gpu-base AS gpu
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/vlmflow vlmflow
COPY --from=gpu-build /opt/vlmflow /opt/vlmflow
ENV PATH=/opt/vlmflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VLMFLOW_STATE_DIR=/var/lib/vlmflow
WORKDIR /var/lib/vlmflow
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["vlmflow"]
CMD ["worker"]

FROM ${PYTHON_IMAGE} AS app
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/vlmflow vlmflow
COPY --from=build /opt/vlmflow /opt/vlmflow
ENV PATH=/opt/vlmflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VLMFLOW_STATE_DIR=/var/lib/vlmflow
WORKDIR /var/lib/vlmflow
USER 10001:10001
ENTRYPOINT ["vlmflow"]
CMD ["--help"]
