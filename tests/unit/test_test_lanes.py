"""The quick lane's vLLM guard (tests/conftest.py), run on small test files in
a fresh pytest process with that same conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import conftest as lanes

QUICK_LANE = "not e2e and not engine and not slow and not vllm"
REPO = Path(__file__).resolve().parents[2]

OFFENDERS = '''
import sys
import types


def test_imports_nothing():
    pass


def test_swallows_the_refused_import():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass


def test_puts_vllm_in_sys_modules():
    sys.modules["vllm"] = types.ModuleType("vllm")
'''


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No plugin autoload: the guard needs none, and the installed ones cost seconds.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", *args],
        cwd=directory, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    vllm: imports vLLM\n")
    (tmp_path / "test_offenders.py").write_text(OFFENDERS)
    (tmp_path / "test_top_import.py").write_text("import vllm  # noqa: F401\n\n\ndef test_never_runs():\n    pass\n")
    return tmp_path


def test_the_quick_lane_fails_each_test_that_imports_vllm_and_names_it(suite: Path) -> None:
    result = run_pytest(suite, "-m", QUICK_LANE, "--continue-on-collection-errors")
    out = result.stdout
    assert result.returncode == 1, out
    assert "3 errors" in out, out  # the collection error and the two offenders' teardowns
    assert "test_imports_nothing" not in out, out
    # a refused import the test swallowed, and vLLM found in sys.modules after a test
    for name in ("test_swallows_the_refused_import", "test_puts_vllm_in_sys_modules"):
        assert f"ERROR test_offenders.py::{name}" in out, out
        assert f"test_offenders.py::{name} imported vLLM" in out, out
    assert "mark it `@pytest.mark.vllm`" in out
    # a module that imports vLLM at the top cannot even be collected
    assert "ERROR test_top_import.py" in out and "vLLM import refused" in out, out


def test_a_run_that_keeps_vllm_tests_has_no_guard(suite: Path) -> None:
    result = run_pytest(suite, "-m", "not e2e", "test_offenders.py", "-k", "not swallows")
    assert result.returncode == 0, result.stdout
    assert "2 passed" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("expression", "guarded"),
    [
        (QUICK_LANE, True),
        ("not vllm", True),
        ("", False),
        ("not e2e and not engine", False),
        ("e2e", False),
        ("vllm", False),
    ],
)
def test_the_guard_is_on_exactly_when_the_expression_leaves_vllm_tests_out(expression: str, guarded: bool) -> None:
    config = SimpleNamespace(getoption=lambda name: expression)
    assert lanes._without_vllm(config) is guarded
