"""Shared fixtures of the KVTC-in-vLLM integration tests: calibrations fitted
on the spot (so CI needs no downloaded calibration) and the engine settings.

Engines are vLLM ``LLM`` objects built in the test process; their engine core
and worker are spawned processes, which load the KVTC plugin when
LNARIZE_KVTC_ENABLE is on in the environment they inherit and read the
backend's settings from the engine's additional_config (what the server does),
so these tests cover the plugin in every process. Engines are small: VLLM_CPU_KVCACHE_SPACE=1,
eager mode, one per module.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def small_cpu_kv_cache():
    saved = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    yield
    if saved is None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


@pytest.fixture(scope="session")
def smol_model_dir():
    demo_model = pytest.importorskip("lnarize_serve.demo_model")
    return str(demo_model.ensure_demo_model())


@pytest.fixture(scope="session")
def smol_calibration(smol_model_dir):
    from tests.fixtures.kvtc_calibrations import smollm2_calibration

    return str(smollm2_calibration())
