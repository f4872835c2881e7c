# syntax=docker/dockerfile:1
# The serving image: the service and ONNX Runtime, no PyTorch (the export step runs elsewhere).
#   docker build -t vit-serve:gpu .                            CUDA 13 + cuDNN 9 + TensorRT 10
#   docker build -t vit-serve:cpu --build-arg VARIANT=cpu .    Debian bookworm-slim, CPU only
# The bundled model repository is baked in at /srv/model_repo; mount another one over it (or
# set VIT_SERVE_MODEL_REPO) to serve your own models.
#
# The two variants differ in exactly two things, the build args below: the base image and the
# wheels that bring ONNX Runtime (the GPU one also brings the TensorRT libraries its TensorRT
# provider links against). Every instruction after them is shared.

ARG VARIANT=gpu

# Each variant installs one of the lock's exported files (scripts/lock), with --require-hashes:
# the versions every other install of the project uses, the same on every build.
# GPU: onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9 (its build_and_package_info.py;
# its CUDA provider needs libcublas.so.13 and libcudart.so.13), which this base provides, so it
# installs the service's lock (onnxruntime-gpu without CUDA's wheels) with the GPU decoder's
# wheels (nvImageCodec, nvJPEG, CV-CUDA for CUDA 13: VIT_SERVE_DECODE). Its TensorRT provider
# needs libnvinfer.so.10 and libnvonnxparser.so.10: TensorRT 10, pinned (an unpinned
# tensorrt-cu13-libs brings TensorRT 11, libnvinfer.so.11). NVIDIA serves those wheels from its
# own index (the one on PyPI only points there), so they cannot be locked with the rest: the one
# requirement installed by exact version without a hash.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG GPU_LOCK=requirements/image-gpu.txt
ARG GPU_WHEELS="tensorrt-cu13-libs==10.16.1.11"
# CPU: the ONNX Runtime CPU wheel, installed directly (never the GPU wheel, then swapped). On
# Debian's slim image: the same distribution a test here builds it on (scripts/container-base).
ARG CPU_IMAGE=debian:bookworm-slim
ARG CPU_LOCK=requirements/image-cpu.txt

FROM ${CUDA_IMAGE} AS base-gpu
FROM ${CPU_IMAGE} AS base-cpu

# Everything below is shared.
# (base-gpu and base-cpu are the stages above, each a tagged image.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The distribution's Python and certificates; its own packages, not pinned: they change with
# the base image's tag, which is what pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS builder
ARG VARIANT
ARG GPU_LOCK
ARG GPU_WHEELS
ARG CPU_LOCK
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The variant's locked dependencies (one layer, rebuilt only when the lock changes). The
# `export` extra (PyTorch) is in neither file. ($wheels is GPU_WHEELS, pinned by exact version.)
COPY requirements ./requirements
# hadolint ignore=DL3013
RUN case "$VARIANT" in gpu) lock=$GPU_LOCK wheels=$GPU_WHEELS ;; cpu) lock=$CPU_LOCK wheels="" ;; \
      *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; esac \
    && pip install --no-cache-dir --require-hashes -r "$lock" \
    && if [ -n "$wheels" ]; then pip install --no-cache-dir --no-deps $wheels; fi
# Then the project, without its dependencies, built by the locked setuptools. The build fails
# if anything pulled torch in or left more than one ONNX Runtime; pip and setuptools are not
# needed to serve.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && if pip show torch >/dev/null 2>&1; then echo "torch in the serving image" >&2; exit 1; fi \
    && if [ "$(pip list --format=freeze | grep -c '^onnxruntime')" != 1 ]; then \
         echo "not exactly one ONNX Runtime in the serving image" >&2; exit 1; fi \
    && pip uninstall -y pip setuptools
# Shared libraries that wheels bring beside their Python packages (TensorRT's, in the GPU
# variant), for the dynamic loader: ONNX Runtime's providers link against them by SONAME.
RUN python -c 'import pathlib, sysconfig; site = pathlib.Path(sysconfig.get_paths()["purelib"]); print("\n".join(str(p) for p in sorted(site.glob("tensorrt_libs"))))' >/opt/venv/ld.so.conf

FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin vit-serve \
    && ln -s /opt/venv/ld.so.conf /etc/ld.so.conf.d/zz-vit-serve-wheels.conf \
    && ldconfig
COPY model_repo /srv/model_repo
ENV PATH=/opt/venv/bin:$PATH \
    VIT_SERVE_MODEL_REPO=/srv/model_repo \
    VIT_SERVE_HOST=0.0.0.0 \
    VIT_SERVE_PORT=8000 \
    VIT_SERVE_FORWARDED_ALLOW_IPS=* \
    VIT_SERVE_LOG_FORMAT=json
# ONNX Runtime's own telemetry off: a server has no business phoning home, and its one line
# about the device ID it cannot keep (the user has no home) is the only one not in JSON.
ENV ORT_DISABLE_TELEMETRY=1
WORKDIR /srv
# Numeric, so Kubernetes' runAsNonRoot can check it. The root filesystem may be read-only:
# the service writes only below /tmp (TensorRT's engine cache), which should then be a tmpfs.
USER 10001
EXPOSE 8000
# Ready: models loaded and warmed up, and not draining for shutdown.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-m", "app.probe", "/readyz"]
# SIGTERM: readiness off, in-flight requests finish, then exit (see app/server.py).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app.server"]
