"""Test lanes. Every test under these folders gets its lane's marker, so
`scripts/test --fast` (`-m "not e2e and not engine and not slow"`) runs what
needs neither a server nor an engine nor a long computation:

- e2e: a real server subprocess on the CPU engine (tests/e2e; marked there);
- engine: a vLLM engine or a model built and run in the test process;
- slow: long pure computations (the Triton interpreter, a calibration fit) and
  subprocesses that import vLLM (about 10 s each; marked on the test).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
LANES = {
    "engine": ("integration/vllm_kvtc", "integration/test_model",
               "integration/kvtc_tools/test_calibration_real_model.py"),
    "slow": ("integration/kvtc/kernels/test_triton_kernels.py",
             "integration/bench/test_kvtc_decode_variants.py"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            relative = Path(item.fspath).resolve().relative_to(_HERE.resolve()).as_posix()
        except ValueError:
            continue
        for marker, prefixes in LANES.items():
            if relative.startswith(prefixes):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture
def clean_env(monkeypatch):
    """No LNARIZE_* variable of the caller's shell reaches the settings under test."""
    for key in list(os.environ):
        if key.upper().startswith("LNARIZE_"):
            monkeypatch.delenv(key)
