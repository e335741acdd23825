"""vLLM loads the KVTC plugin in process 0, the engine core and every worker of
every engine in the environment. With KVTC off, loading it and calling
register() must import neither the codec, the offline tools, the backend, nor
the heavy libraries they need (torch alone costs seconds per process).

Runs in a fresh interpreter: this test process has long imported all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]

# Measured: with KVTC off, plugin + register() import 5 lnarize_serve modules and
# only the standard library (0.2 s); an eager kvtc/__init__ pulled torch and numpy
# through the codec (5 s).
FORBIDDEN_PREFIXES = (
    "lnarize_serve.kvtc.format",
    "lnarize_serve.kvtc.kernels",
    "lnarize_serve.kvtc.serving.vllm_backend",
    "lnarize_serve.kvtc.serving.kvtc_ops",
    "lnarize_serve.kvtc_tools",
    "torch",
    "numpy",
    "scipy",
    "triton",
    "transformers",
    "vllm",
)

_PROBE = """
import json, sys
before = set(sys.modules)
from lnarize_serve.kvtc.serving import plugin
plugin.register()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_plugin_with_kvtc_off_imports_nothing_heavy():
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LNARIZE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True)
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    print("imported by plugin + register() with KVTC off:", imported)

    assert "lnarize_serve.kvtc.serving.plugin" in imported  # the probe measured a fresh import
    heavy = [name for name in imported
             if any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PREFIXES)]
    assert heavy == []
