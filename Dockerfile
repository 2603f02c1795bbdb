# syntax=docker/dockerfile:1
# vlmflow images. Targets:
#   app (the default)  topics, streams, replay, lag and offsets tools (no inference engine)
#   gpu                the inference worker: vLLM on CUDA (the project's `gpu` extra); the checkpoint is mounted
# Both run as an unprivileged user. Nothing secret is read at build time: credentials come at run time from
# VLMFLOW_* variables or from secret files in VLMFLOW_SECRETS_DIR (see docs/deployment.md).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# NOTE: a devel image, as vLLM's own: FlashInfer and Triton compile kernels at run time and need nvcc and gcc.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04

# The project's sources, once, for both builders.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY schemas/ /src/schemas/
COPY vlmflow/ /src/vlmflow/
COPY workers/ /src/workers/
COPY streams/ /src/streams/

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=source /src /src
RUN python -m venv /opt/vlmflow \
    && /opt/vlmflow/bin/pip install --no-cache-dir /src

FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=source /src /src
RUN python3 -m venv /opt/vlmflow \
    && /opt/vlmflow/bin/pip install --no-cache-dir "/src[gpu]"

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
