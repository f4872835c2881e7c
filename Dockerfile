# syntax=docker/dockerfile:1
# The serving image: the service and ONNX Runtime, no PyTorch (the export step runs elsewhere).
#   docker build -t vit-serve:gpu .                            CUDA + cuDNN base, onnxruntime-gpu
#   docker build -t vit-serve:cpu --build-arg VARIANT=cpu .    plain Ubuntu base, onnxruntime
# The bundled model repository is baked in at /srv/model_repo; mount another one over it (or
# set VIT_SERVE_MODEL_REPO) to serve your own models.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

# Everything below is shared; the variants differ in the base image and the ONNX Runtime wheel.
# (base-gpu and base-cpu are the stages above, each a tagged image.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu's Python and certificates only; the distribution's own packages, not pinned: they
# change with the base image's tag, which is what pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS builder
ARG VARIANT
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# The project without extras: the `export` extra (PyTorch) never enters this image, and the
# last line fails the build if anything pulled torch in. The CPU variant swaps the GPU wheel
# of ONNX Runtime for the CPU one (the same `onnxruntime` module, a tenth of the size).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir . \
    && if [ "$VARIANT" = cpu ]; then \
         pip uninstall -y onnxruntime-gpu \
         && pip install --no-cache-dir "onnxruntime>=1.20"; \
       fi \
    && if pip show torch >/dev/null 2>&1; then echo "torch in the serving image" >&2; exit 1; fi

FROM base AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vit-serve
COPY --from=builder /opt/venv /opt/venv
COPY model_repo /srv/model_repo
ENV PATH=/opt/venv/bin:$PATH \
    VIT_SERVE_MODEL_REPO=/srv/model_repo \
    VIT_SERVE_HOST=0.0.0.0 \
    VIT_SERVE_PORT=8000 \
    VIT_SERVE_FORWARDED_ALLOW_IPS=* \
    VIT_SERVE_LOG_FORMAT=json
WORKDIR /srv
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001
EXPOSE 8000
# Ready: models loaded and warmed up, and not draining for shutdown.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-m", "app.probe", "/readyz"]
# SIGTERM: readiness off, in-flight requests finish, then exit (see app/server.py).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app.server"]
