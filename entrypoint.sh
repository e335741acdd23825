#!/bin/sh
# Container entrypoint for lnarize-serve.
#
# 1. Loads the Hugging Face token from HF_TOKEN or from a file (HF_TOKEN_PATH,
#    default /run/secrets/hf_token) without ever printing it.
# 2. Before serving, checks what would otherwise fail minutes later and
#    obscurely: the cache directories are writable and an NVIDIA GPU is visible.
#    Every failure prints the fix to apply.
# 3. execs lnarize-serve (PID 1's child under `init: true`), so SIGTERM reaches
#    the server itself and its drain logic runs. Arguments pass through:
#      (none) / serve / --flags  -> lnarize-serve [serve] ...    (checks run)
#      config / version / ...    -> lnarize-serve <subcommand>  (no GPU check)
#      an executable (bash, python3, ...) -> run as given, e.g. a debug shell
#
# ENTRYPOINT_SKIP_GPU_CHECK=1 skips the GPU check (CPU builds, tests). It is not
# an LNARIZE_* name on purpose: the server rejects unknown LNARIZE_* variables.
set -eu

log() {
    printf 'entrypoint: %s\n' "$*" >&2
}

fail() {
    printf 'entrypoint: ERROR: %s\n' "$*" >&2
    exit 1
}

load_hf_token() {
    if [ -n "${HF_TOKEN:-}" ]; then
        log "Hugging Face token: taken from HF_TOKEN (value not shown)"
        return 0
    fi
    token_path=${HF_TOKEN_PATH:-/run/secrets/hf_token}
    if [ ! -e "$token_path" ]; then
        if [ -n "${HF_TOKEN_PATH:-}" ]; then
            fail "HF_TOKEN_PATH=$token_path does not exist. Fix: mount the token file there (compose secret, Kubernetes Secret volume) or unset HF_TOKEN_PATH."
        fi
        log "Hugging Face token: none (public models only; set HF_TOKEN or mount $token_path for gated/private ones)"
        return 0
    fi
    if [ ! -r "$token_path" ]; then
        fail "Hugging Face token file $token_path is not readable by uid $(id -u). Fix: make it readable for that user (Kubernetes: defaultMode 0440 plus fsGroup; host file: chmod 0444) or pass HF_TOKEN instead."
    fi
    # Whitespace (a trailing newline from `echo`) is never part of a token.
    token=$(tr -d ' \t\r\n' <"$token_path")
    if [ -z "$token" ]; then
        if [ -n "${HF_TOKEN_PATH:-}" ]; then
            fail "HF token file HF_TOKEN_PATH=$token_path is empty. Fix: write the token into it, or unset HF_TOKEN_PATH for public models."
        fi
        # The compose file mounts /dev/null here when no token file is given.
        log "Hugging Face token: $token_path is empty, so no token is used (public models only)"
        return 0
    fi
    HF_TOKEN=$token
    export HF_TOKEN
    unset token
    log "Hugging Face token: read from $token_path (value not shown)"
}

check_writable_dir() {
    # $1: the variable that names the directory, $2: the directory.
    probe="$2/.lnarize-write-probe.$$"
    if mkdir -p "$2" 2>/dev/null && : >"$probe" 2>/dev/null; then
        rm -f "$probe"
        return 0
    fi
    fail "cache directory $1=$2 is not writable by uid $(id -u) gid $(id -g). Fix: give that user the directory. Docker named volume: \`docker compose down -v\` to recreate it from the image, or \`docker run --rm -v VOLUME:/c --user 0 IMAGE chown -R $(id -u):$(id -g) /c\`; bind mount: \`sudo chown -R $(id -u):$(id -g) HOST_DIR\`; Kubernetes: securityContext.fsGroup: $(id -g)."
}

check_cache_dirs() {
    # Defaults as huggingface_hub and vLLM compute them when unset.
    xdg_cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}
    check_writable_dir HF_HOME "${HF_HOME:-$xdg_cache/huggingface}"
    check_writable_dir VLLM_CACHE_ROOT "${VLLM_CACHE_ROOT:-$xdg_cache/vllm}"
    if [ -n "${HF_HUB_CACHE:-}" ]; then
        check_writable_dir HF_HUB_CACHE "$HF_HUB_CACHE"
    fi
    if [ -n "${LNARIZE_CACHE_DIR:-}" ]; then
        check_writable_dir LNARIZE_CACHE_DIR "$LNARIZE_CACHE_DIR"
    fi
}

gpu_visible() {
    if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || [ "${CUDA_VISIBLE_DEVICES:-}" = "-1" ]; then
        return 1
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -q '^GPU '
        return
    fi
    # Without nvidia-smi (toolkit configured without the utility capability)
    # the device nodes are the evidence.
    for device in /dev/nvidia[0-9]*; do
        if [ -e "$device" ]; then
            return 0
        fi
    done
    return 1
}

check_gpu() {
    if [ "${ENTRYPOINT_SKIP_GPU_CHECK:-0}" = "1" ]; then
        log "GPU check skipped (ENTRYPOINT_SKIP_GPU_CHECK=1)"
        return 0
    fi
    if ! gpu_visible; then
        hidden_by=""
        if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
            hidden_by=" (CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides GPUs: unset it or name a device)"
        fi
        fail "no NVIDIA GPU is visible in this container$hidden_by. Fix: install the NVIDIA Container Toolkit on the host (\`nvidia-smi\` must work there), then start with \`docker compose up\` (the compose file reserves one GPU) or \`docker run --gpus all ...\`; in Kubernetes request nvidia.com/gpu: 1. To run without a GPU on purpose (CPU build, tests) set ENTRYPOINT_SKIP_GPU_CHECK=1."
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
    fi
}

warn_small_shm() {
    # vLLM passes tensors between its processes through /dev/shm; Docker's
    # default 64 MiB is too small (compose uses ipc: host, Kubernetes an emptyDir).
    shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 }')
    if [ -n "${shm_kib:-}" ] && [ "$shm_kib" -lt 1048576 ]; then
        log "WARNING: /dev/shm is only $((shm_kib / 1024)) MiB. Fix: ipc: host or shm_size: 16gb (compose), --ipc=host (docker run), a memory emptyDir on /dev/shm (Kubernetes)."
    fi
}

is_executable_command() {
    # A path or a program on PATH (not a shell builtin, which would shadow
    # lnarize-serve subcommands such as `test`).
    case $(command -v "$1" 2>/dev/null || true) in
        */*) return 0 ;;
        *) return 1 ;;
    esac
}

load_hf_token

if [ "$#" -eq 0 ] || [ "$1" = serve ] || [ "${1#-}" != "$1" ]; then
    check_cache_dirs
    check_gpu
    warn_small_shm
    exec lnarize-serve "$@"
fi

if is_executable_command "$1"; then
    exec "$@"
fi

exec lnarize-serve "$@"
