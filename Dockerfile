# syntax=docker/dockerfile:1
#
# lnarize-serve on top of the official vLLM OpenAI image.
#
#   docker build -t lnarize-serve:0.1.0 .
#
# The base tag must name the vLLM version pyproject.toml pins (extra `gpu`);
# the install step below fails the build if it does not. To pin by digest
# instead of tag (reproducible rebuilds), look the digest up once with
#   docker buildx imagetools inspect vllm/vllm-openai:v0.32.0
# and build with
#   docker build --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0@sha256:<digest> .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# Re-declared: an ARG before FROM is not visible after it (used in a label).
ARG VLLM_IMAGE
# Numeric ids so Kubernetes can verify runAsNonRoot; keep in step with
# config/k8s/deployment.yaml (runAsUser, fsGroup).
ARG APP_UID=10001
ARG APP_GID=10001
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="lnarize-serve" \
      org.opencontainers.image.description="OpenAI-compatible vLLM server for the Qwen3.6-27B LNARIZE NVFP4 model family" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${VLLM_IMAGE}" \
      org.opencontainers.image.documentation="SERVE.md"

# Caches live on volumes (see VOLUME below): model downloads under HF_HOME,
# vLLM's torch.compile cache under VLLM_CACHE_ROOT so a second start skips
# compilation; Triton's and other JIT caches ride on the same volume.
ENV HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/vllm/triton \
    XDG_CACHE_HOME=/cache/vllm/xdg \
    HOME=/home/lnarize \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1

# The directories exist in the image owned by the app user, so a fresh Docker
# named volume mounted on them is created with that owner.
RUN groupadd --gid "${APP_GID}" lnarize \
    && useradd --uid "${APP_UID}" --gid "${APP_GID}" --create-home --home-dir /home/lnarize \
       --shell /usr/sbin/nologin lnarize \
    && mkdir -p /cache/huggingface /cache/vllm/triton /cache/vllm/xdg \
    && chown -R "${APP_UID}:${APP_GID}" /cache /home/lnarize

COPY pyproject.toml README.md /tmp/lnarize-src/
COPY lnarize_serve /tmp/lnarize-src/lnarize_serve
COPY config/profiles /tmp/lnarize-src/config/profiles

# Install without re-resolving vLLM or torch: every package the base image
# already has is pinned to its installed version through a constraints file
# built from the image's own `pip list`. pip then adds only what is missing
# (e.g. pydantic-settings) and fails the build, rather than up- or downgrading
# anything, if this package's requirements disagree with the image; the
# `[gpu]` extra (vllm==0.32.0) makes a mismatched base tag fail here too.
# Chosen over `--no-deps`, which would also skip the check that the image
# satisfies our dependency ranges. The import check at the end runs as root, so
# it gets throw-away cache dirs: root-owned files must not land in /cache.
RUN python3 -m pip list --format=freeze > /tmp/image-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
       --constraint /tmp/image-constraints.txt "/tmp/lnarize-src[gpu]" \
    && rm -rf /tmp/lnarize-src /tmp/image-constraints.txt \
    && HOME=/tmp/import-check XDG_CACHE_HOME=/tmp/import-check HF_HOME=/tmp/import-check/hf \
       VLLM_CACHE_ROOT=/tmp/import-check/vllm TRITON_CACHE_DIR=/tmp/import-check/triton \
       lnarize-serve version \
    && rm -rf /tmp/import-check

COPY --chmod=0755 entrypoint.sh /usr/local/bin/entrypoint.sh

USER ${APP_UID}:${APP_GID}
WORKDIR /home/lnarize
VOLUME ["/cache/huggingface", "/cache/vllm"]
EXPOSE 9000

# Ready = the engine answered a real one-token generation. The start period
# covers a first ~20 GB download plus torch.compile (sizing: SERVE.md and
# docker-compose.yml); failures inside it do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=40m --start-interval=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('LNARIZE_PORT', '9000'), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["serve"]
