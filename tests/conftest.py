"""Test lanes. Every test under these folders gets its lane's marker, so
`scripts/test --fast` (`-m "not e2e and not engine and not slow and not vllm"`)
runs what needs neither a server nor an engine nor a long computation nor vLLM:

- e2e: a real server subprocess on the CPU engine (tests/e2e; marked there);
- engine: a vLLM engine or a model built and run in the test process;
- slow: long pure computations (the Triton interpreter, a calibration fit) and
  subprocesses that import vLLM (about 10 s each; marked on the test);
- vllm: imports vLLM in the test process (checked against vLLM's own lists,
  classes or parser); marked on the test, or here for modules that import
  vLLM at the top.

Tests not marked `vllm` (nor engine, e2e) run with settings' vLLM lookups off
(`without_lookups`).
A run whose -m expression leaves `vllm` tests out refuses any import of vLLM
and fails the test that tried, so the quick lane stays free of it.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

_HERE = Path(__file__).parent
LANES = {
    "engine": ("integration/vllm_kvtc", "integration/test_model",
               "integration/kvtc_tools/test_calibration_real_model.py"),
    "slow": ("integration/kvtc/kernels/test_triton_kernels.py",
             "integration/bench/test_kvtc_decode_variants.py"),
    # Modules whose every test needs vLLM (most import it at the top: in a run
    # without `vllm` tests they are not even collected, as that imports it).
    "vllm": ("unit/test_engine_args.py", "unit/test_launch.py", "unit/test_log_filters.py",
             "unit/test_nvfp4_writer.py", "unit/test_request_checks.py",
             "unit/test_sampling_defaults.py", "unit/test_thinking_budget.py",
             "unit/test_tool_parsers.py", "unit/test_app.py", "unit/test_serving.py",
             "integration/bench/test_bench_vllm_flags.py"),
}

VLLM_GUARD_HINT = (
    "this run leaves `vllm` tests out (the quick lane), so it must not import vLLM; "
    "if the test needs vLLM's own lists, classes or parser, mark it `@pytest.mark.vllm` "
    "(or list its module under LANES['vllm'] in tests/conftest.py if it imports vLLM at the top); "
    "otherwise import nothing from vLLM (settings lookups are off in unmarked tests)"
)


def _lane_markers(path: Path) -> set[str]:
    try:
        relative = path.resolve().relative_to(_HERE.resolve()).as_posix()
    except ValueError:
        return set()
    return {marker for marker, prefixes in LANES.items() if relative.startswith(prefixes)}


def _selects(config: pytest.Config, markers: set[str]) -> bool:
    """Whether the run's -m expression selects a test carrying exactly ``markers``."""
    expression = config.getoption("markexpr")
    if not expression:
        return True
    return Expression.compile(expression).evaluate(lambda name, **_: name in markers)


def _without_vllm(config: pytest.Config) -> bool:
    """The -m expression runs an unmarked test but leaves it out once marked `vllm`."""
    return _selects(config, set()) and not _selects(config, {"vllm"})


class _RefuseVllm(importlib.abc.MetaPathFinder):
    """Refuses `import vllm` and remembers it, so a test that swallows the
    ImportError still fails."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "vllm":
            self.attempts.append(name)
            raise ImportError(f"vLLM import refused: {VLLM_GUARD_HINT}", name=name)
        return None


_refuse_vllm = _RefuseVllm()


def pytest_configure(config: pytest.Config) -> None:
    if _without_vllm(config):
        if "vllm" in sys.modules:
            raise pytest.UsageError(f"vLLM was imported before the tests started; {VLLM_GUARD_HINT}")
        sys.meta_path.insert(0, _refuse_vllm)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _refuse_vllm in sys.meta_path:
        sys.meta_path.remove(_refuse_vllm)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Deselection by marker comes after collection; a module that imports vLLM
    # at the top must not be imported at all when its lane is left out.
    markers = _lane_markers(collection_path)
    if markers and not _selects(config, markers):
        return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    del _refuse_vllm.attempts[:]  # a module refused at collection is a collection error already


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in _lane_markers(Path(item.fspath)):
            item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(autouse=True)
def _vllm_lookups(request: pytest.FixtureRequest):
    """Tests outside the vLLM lanes check settings logic with vLLM's lists left
    alone; a test that a value is refused against vLLM's own list carries the
    `vllm` marker (engine and e2e tests load vLLM anyway and keep the lookups)."""
    from lnarize_serve.vllm_compat.choices import without_lookups

    if any(request.node.get_closest_marker(name) for name in ("vllm", "engine", "e2e")):
        yield
        return
    with without_lookups():
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    del _refuse_vllm.attempts[:]  # from here on, an attempt is this test's (its fixtures' included)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    guarded = _refuse_vllm in sys.meta_path
    if call.when == "teardown" and guarded and (_refuse_vllm.attempts or "vllm" in sys.modules):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} imported vLLM: {VLLM_GUARD_HINT}"
    return report


@pytest.fixture
def clean_env(monkeypatch):
    """No LNARIZE_* variable of the caller's shell reaches the settings under test."""
    for key in list(os.environ):
        if key.upper().startswith("LNARIZE_"):
            monkeypatch.delenv(key)
