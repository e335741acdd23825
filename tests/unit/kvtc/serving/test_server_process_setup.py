"""The server process's KVTC set-up runs no torch compute and never touches CUDA.

vLLM forks its engine core from the server process (its default on CUDA). A
child forked after the parent ran a parallel torch op inherits an OpenMP
thread pool whose threads did not survive the fork, and hangs at its own
first parallel op (on the GPU: vLLM's first pinned buffer); a parent that
initialised CUDA leaves the child unable to use it. So the server side of
KVTC (calibration source, conversion of a shipped file, validation, engine
arguments) must leave the process as it found it. Each case runs in a fresh
interpreter with:

- ``torch.cuda._lazy_init`` raising, and torch's CUDA queries raising when
  this project's code calls them (vLLM's own import-time probes are vLLM's);
- a dispatch mode counting every torch operator run during the set-up;
- then a fork whose child runs a parallel torch op (with a deadline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lnarize_serve.kvtc.format.calibration import Calibration, RotaryInfo
from lnarize_serve.kvtc.format.fit import random_layer_codec
from tests.unit.kvtc.format.test_calibration_files import HEAD_DIM, KV_HEADS, LAYERS, write_shipped

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent('''
    import os, sys, time, traceback
    from pathlib import Path
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def refuse(name):
        def call(*args, **kwargs):
            raise RuntimeError(f"CUDA touched in the server process: torch.cuda.{name}")
        return call

    def refuse_from_project(name, original):
        def call(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/lnarize_serve/" in caller:
                raise RuntimeError(f"torch.cuda.{name} called by lnarize_serve in the server process")
            return original(*args, **kwargs)
        return call

    torch.cuda._lazy_init = refuse("_lazy_init")
    torch.cuda.init = refuse("init")
    for name in ("is_available", "device_count", "current_device", "get_device_capability",
                 "get_device_properties", "get_device_name", "mem_get_info", "set_device",
                 "synchronize", "is_bf16_supported"):
        setattr(torch.cuda, name, refuse_from_project(name, getattr(torch.cuda, name)))

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    from lnarize_serve.engine import prepare_engine_args
    from lnarize_serve.settings import Settings

    model_dir, calibration, cache_dir = sys.argv[1:4]
    settings = Settings(model=model_dir, kvtc_enable=True, kvtc_calibration=calibration,
                        cache_dir=Path(cache_dir), quantization="auto", max_model_len=256)
    counter = CountOps()
    with counter:
        engine_args = prepare_engine_args(settings)
    assert engine_args.attention_backend == "CUSTOM", engine_args.attention_backend
    # the resolved settings travel in vLLM's config; the environment keeps only the switch
    runtime = engine_args.additional_config["lnarize_kvtc"]
    assert Path(runtime["calibration"]).is_file(), runtime
    assert (runtime["sink_tokens"], runtime["window_tokens"]) == (0, 128), runtime
    kvtc_vars = sorted(k for k in os.environ if k.startswith("LNARIZE_KVTC_"))
    assert kvtc_vars == ["LNARIZE_KVTC_ENABLE"], kvtc_vars
    assert not counter.ops, f"torch ops ran in the server process: {sorted(set(counter.ops))}"
    assert not torch.cuda.is_initialized()
    for module in ("lnarize_serve.kvtc.kernels", "lnarize_serve.kvtc.serving.vllm_backend"):
        assert module not in sys.modules, f"{module} imported in the server process"

    # what vLLM does next: fork the engine core, which runs parallel torch ops
    pid = os.fork()
    if pid == 0:
        torch.zeros(8_000_000).add_(1)
        os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert status == 0, status
            print("SERVER-SIDE SETUP CLEAN")
            sys.exit(0)
        time.sleep(0.1)
    os.kill(pid, 9)
    sys.exit("the forked child hung at its first parallel torch op")
''')


def _model_dir(tmp_path: Path) -> Path:
    """A hybrid model's config (full attention at every second layer); no
    weights: the server side reads config.json only."""
    model = tmp_path / "model"
    model.mkdir()
    config = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "num_hidden_layers": 2 * LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_size": 64,
        "rope_theta": 1e7, "partial_rotary_factor": 0.25,
        "layer_types": ["linear_attention", "full_attention"] * LAYERS,
    }
    (model / "config.json").write_text(json.dumps(config))
    return model


def _run_setup(model: Path, calibration: Path, cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LNARIZE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(calibration), str(cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "SERVER-SIDE SETUP CLEAN" in done.stdout, (
        done.stdout[-3000:] + done.stderr[-6000:])


@pytest.mark.slow  # a subprocess that imports vLLM (~10 s)
def test_setup_with_a_calibration_in_our_format(tmp_path):
    codecs = {i: random_layer_codec(KV_HEADS, HEAD_DIM, seed=i)[0] for i in (1, 3, 5)}
    path = Calibration("t", HEAD_DIM, KV_HEADS, 2 * LAYERS, codecs,
                       RotaryInfo(4, 1e7)).save(tmp_path / "kvtc.safetensors")
    _run_setup(_model_dir(tmp_path), path, tmp_path / "cache")


@pytest.mark.slow  # a subprocess that imports vLLM (~10 s)
def test_setup_converting_a_shipped_calibration(tmp_path):
    """The conversion (torch compute) runs in a spawned helper; its result is
    the cached file a second start uses."""
    path = tmp_path / "kvtc_calibration.pt"
    write_shipped(path)
    cache = tmp_path / "cache"
    _run_setup(_model_dir(tmp_path), path, cache)
    converted = list((cache / "kvtc").glob("kvtc-*.safetensors"))
    assert len(converted) == 1
    from lnarize_serve.kvtc.format.calibration import load_calibration

    assert load_calibration(converted[0]).layer_indices == [1, 3, 5]
