"""vLLM is imported in one place: lnarize_serve/vllm_compat/, and by the KVTC
attention backend that runs inside vLLM (its module and the plugin that
registers it). Any other module that imports vLLM, at the top, in a function or
under TYPE_CHECKING, fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lnarize_serve"
BOUNDARY = ("vllm_compat/", "kvtc/serving/vllm_backend.py", "kvtc/serving/plugin.py")


def vllm_imports(source: str) -> list[int]:
    """Line numbers of every import of ``vllm`` or one of its modules."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "vllm" or name.startswith("vllm.") for name in names):
            lines.append(node.lineno)
    return lines


def test_the_finder_sees_every_kind_of_import():
    source = (
        "import vllm\n"
        "from vllm.config import VllmConfig\n"
        "def f():\n"
        "    import vllm.logger as vl\n"
        "if TYPE_CHECKING:\n"
        "    from vllm import SamplingParams\n"
        "import vllm_kvtc_ops\n"
        "from lnarize_serve.vllm_compat.engine import AsyncLLM\n"
        "NAME = 'vllm.entrypoints.launchers.api_server.entry'\n"
    )
    assert vllm_imports(source) == [1, 2, 4, 6]


def test_only_the_boundary_imports_vllm():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(BOUNDARY):
            continue
        offenders += [f"lnarize_serve/{relative}:{line}" for line in vllm_imports(path.read_text())]
    assert not offenders, (
        "vLLM imported outside lnarize_serve/vllm_compat/ (import it from there instead): " + ", ".join(offenders)
    )


def test_the_version_check_and_the_choices_import_no_vllm():
    # Settings run the version check and their vLLM-free first pass before
    # anything imports vLLM (importing it logs Triton and platform lines).
    script = (
        "import sys\n"
        "import lnarize_serve.settings, lnarize_serve.vllm_compat, lnarize_serve.vllm_compat.choices\n"
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
