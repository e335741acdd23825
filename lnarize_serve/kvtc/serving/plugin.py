"""vLLM general plugin: installs the KVTC attention backend when KVTC is on.

Entry point ``vllm.general_plugins: lnarize_kvtc`` (pyproject.toml), so vLLM
calls :func:`register` in process 0, the engine core and every worker. With
``LNARIZE_KVTC_ENABLE`` off it does nothing: plain vLLM engines in the same
environment are untouched.

- CUDA (and any platform that honours a selection): registered as vLLM's
  ``CUSTOM`` backend, which the server selects with
  ``attention_backend="CUSTOM"``.
- CPU: vLLM's CPU platform always returns ``CPU_ATTN`` for non-MLA models, so
  the backend is registered over that slot (the registry is consulted by
  ``AttentionBackendEnum.CPU_ATTN.get_path()``).
"""

from __future__ import annotations

import logging

from lnarize_serve.kvtc.serving.runtime_config import kvtc_enabled

BACKEND_PATH = "lnarize_serve.kvtc.serving.vllm_backend.KVTCAttentionBackend"

logger = logging.getLogger(__name__)


def register() -> bool:
    """Install the backend if KVTC is enabled here; return whether it did.

    Idempotent: vLLM may load plugins more than once per process, and the
    server calls this directly too (process 0 may have loaded plugins before
    the KVTC settings were exported).
    """
    if not kvtc_enabled():
        return False
    from lnarize_serve.vllm_compat import check_vllm_version

    check_vllm_version()  # the backend subclasses vLLM internals of one series
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    logger.info("KVTC attention backend installed (%s)", current_platform.device_name)
    return True


def installed_backend_path() -> str | None:
    """The path vLLM will resolve for this platform's attention, if it is KVTC."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum.CPU_ATTN if current_platform.is_cpu() else AttentionBackendEnum.CUSTOM
    try:
        path = member.get_path()
    except ValueError:
        return None
    return path if path == BACKEND_PATH else None
