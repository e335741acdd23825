"""Preflight: GPU present, architecture vs weights, driver, memory plan; one line each, exit 2.

This machine has no GPU: the GPU facts are faked through the probe that
`resolve_launch` takes (or the patched `lnarize_serve.gpu.probe_gpu` in the
CLI tests), and `gpu_expected` is patched where the CPU build of vLLM would
otherwise skip the GPU checks.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lnarize_serve import cli
from lnarize_serve.bench.process import without_lnarize_settings
from lnarize_serve.engine import resolve_launch
from lnarize_serve.family import detect_checkpoint
from lnarize_serve.gpu import GpuFacts
from lnarize_serve.launch import plan_launch
from lnarize_serve.plan import GIB, QWEN36_27B
from lnarize_serve.preflight import preflight_problems, run_preflight
from lnarize_serve.settings import load_settings
from tests.fixtures import family_configs

REPO = Path(__file__).resolve().parents[2]
H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, (12, 8))
RTX_PRO_6000 = GpuFacts("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0), 96 * 10**9, (12, 9))
RTX_4090 = GpuFacts("NVIDIA GeForce RTX 4090", (8, 9), 24 * GIB, (12, 8))
T4_48 = GpuFacts("Quadro RTX 8000", (7, 5), 48 * GIB, (12, 8))


@pytest.fixture(autouse=True)
def offline_cache(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("LNARIZE_CACHE_DIR", str(tmp_path))
    # No network here. huggingface_hub reads HF_HUB_OFFLINE once, at import:
    # patch its constant first, so a first import happens under the real
    # environment and the value restored after the test is the real one.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def problems_for(gpu, weights=QWEN36_27B.weights_bytes, checkpoint=None, runtime_cuda=(12, 9)):
    launch = plan_launch(load_settings(), checkpoint, gpu)
    return preflight_problems(launch, True, QWEN36_27B, weights, runtime_cuda)


def test_the_interactive_preset_passes_on_the_gpus_it_was_sized_for():
    assert problems_for(RTX_PRO_6000) == []
    assert problems_for(H100) == []


def test_too_small_gpu_is_one_line_with_the_numbers():
    (line,) = problems_for(RTX_4090)
    assert "NVIDIA GeForce RTX 4090" in line and "too small" in line
    assert "20.4 GiB at LNARIZE_GPU_MEM_UTIL=0.85" in line and "20.0 GiB of weights" in line


def test_too_old_architecture_is_one_line():
    (line,) = problems_for(T4_48)
    assert "SM 7.5" in line and "cannot run NVFP4 weights: they need SM >= 8.0" in line


def test_bf16_checkpoint_on_turing_asks_for_float16(monkeypatch):
    (line,) = problems_for(T4_48, checkpoint=detect_checkpoint(family_configs.vlm_bf16()))
    assert "no bfloat16" in line and "LNARIZE_DTYPE=float16" in line
    monkeypatch.setenv("LNARIZE_DTYPE", "float16")
    problems = problems_for(T4_48, weights=20 * GIB, checkpoint=detect_checkpoint(family_configs.vlm_bf16()))
    assert not any("bfloat16" in p or "SM" in p.split(":")[0] for p in problems)


def test_the_long_context_preset_fits_its_gpus_with_its_fp8_kv_cache(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    assert problems_for(H100) == []
    assert problems_for(RTX_PRO_6000) == []


def test_the_three_long_context_variables_fit_on_top_of_the_default_preset(monkeypatch):
    # SERVE.md's second way into long-context mode (interactive's 0.85 memory use).
    for name, value in (("LNARIZE_MAX_MODEL_LEN", "262144"), ("LNARIZE_MAX_NUM_SEQS", "4"),
                        ("LNARIZE_KV_CACHE_DTYPE", "fp8")):
        monkeypatch.setenv(name, value)
    assert problems_for(H100) == []
    assert problems_for(RTX_PRO_6000) == []


def test_impossible_long_context_plan_names_the_numbers_and_what_would_fit(monkeypatch):
    # The long-context preset (4 x 262144) with bf16 KV on an 80 GB H100:
    # vLLM's arithmetic gives 2.79 sequences of 256K.
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "auto")
    (line,) = problems_for(H100)
    assert line.startswith("memory plan: 4 x 262,144 tokens = 1,048,576 tokens of KV do not fit on NVIDIA H100")
    assert "73.6 GiB at LNARIZE_GPU_MEM_UTIL=0.92 - 20.0 GiB weights - 4 GiB overhead = 49.6 GiB" in line
    assert "(2.79 sequences of 262,144)" in line
    assert "LNARIZE_KV_CACHE_DTYPE=fp8" in line and "LNARIZE_KVTC_ENABLE=true" in line
    assert "LNARIZE_MAX_NUM_SEQS=2" in line and "LNARIZE_MAX_MODEL_LEN=179200" in line
    # The suggested shorter context does fit.
    suggested = int(line.rsplit("LNARIZE_MAX_MODEL_LEN=", 1)[1].split()[0])
    monkeypatch.setenv("LNARIZE_MAX_MODEL_LEN", str(suggested))
    assert problems_for(H100) == []
    monkeypatch.setenv("LNARIZE_MAX_MODEL_LEN", "262144")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "fp8")
    assert problems_for(H100) == []


def test_a_plan_nothing_rescues_says_so(monkeypatch):
    monkeypatch.setenv("LNARIZE_MAX_MODEL_LEN", "1048576")
    monkeypatch.setenv("LNARIZE_MAX_NUM_SEQS", "64")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "fp8")
    (line,) = problems_for(GpuFacts("NVIDIA GeForce RTX 5090", (12, 0), 32 * GIB, (12, 9)))
    # Not even one sequence of 1M fits, nor 64 shorter ones: one sequence, shorter.
    assert line.endswith("would fit: LNARIZE_MAX_NUM_SEQS=1 with LNARIZE_MAX_MODEL_LEN=" + line.rsplit("=", 1)[1])
    assert int(line.rsplit("=", 1)[1]) > 16384


def test_int4_autoround_runs_on_turing_in_float16():
    # The int4 card's --dtype half (applied by the family) and vLLM's INC minimum SM 6.0.
    problems = problems_for(T4_48, weights=18 * GIB, checkpoint=detect_checkpoint(family_configs.vlm_int4_autoround_mtp()))
    assert not any("SM >=" in p or "bfloat16" in p for p in problems), problems


def test_no_gpu_and_an_old_driver_are_one_line_each():
    (line,) = problems_for(None)
    assert line.startswith("no NVIDIA GPU found") and "cpu-demo" in line
    (line,) = problems_for(GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, (11, 8)), runtime_cuda=(12, 9))
    assert "CUDA 11.8, older than this image's CUDA 12.9" in line


def test_cpu_demo_skips_the_gpu_checks(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    settings = load_settings()
    launch = resolve_launch(settings, "/nonexistent", online=False, probe=lambda: None)
    assert run_preflight(launch, "/nonexistent", online=False) == []


def test_preflight_takes_well_under_a_second(monkeypatch):
    monkeypatch.setattr("lnarize_serve.preflight.gpu_expected", lambda settings: True)
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "auto")  # so the memory plan has something to refuse
    settings = load_settings()
    started = time.perf_counter()
    launch = resolve_launch(settings, settings.model, online=True, probe=lambda: H100)
    problems = run_preflight(launch, settings.model, online=True)
    assert time.perf_counter() - started < 1.0
    assert len(problems) == 1


def test_warn_mode_lets_the_start_go_on(monkeypatch, capsys):
    monkeypatch.setattr("lnarize_serve.preflight.gpu_expected", lambda settings: True)
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: RTX_4090)
    monkeypatch.setattr("lnarize_serve.server.serve", lambda settings: 0)
    monkeypatch.setenv("LNARIZE_PREFLIGHT", "warn")
    assert cli.main(["serve"]) == 0
    assert "preflight warning (LNARIZE_PREFLIGHT=warn): NVIDIA GeForce RTX 4090" in capsys.readouterr().err


def test_contradicting_explicit_setting_stops_serve_with_exit_2(monkeypatch, tmp_path, capsys):
    import json

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(family_configs.vlm_int4_autoround_mtp()))
    monkeypatch.setenv("LNARIZE_MODEL", str(tmp_path / "ckpt"))
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "modelopt_fp4")
    monkeypatch.setattr("lnarize_serve.server.serve", lambda settings: pytest.fail("the server must not start"))
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2
    assert "LNARIZE_QUANTIZATION=modelopt_fp4 contradicts the checkpoint" in capsys.readouterr().err


# The CLI path end to end, in a subprocess: the probe and the CPU-build check
# are patched in the child (no GPU here), everything else is the real command.
CHILD = """
import sys
from lnarize_serve.gpu import GpuFacts
import lnarize_serve.gpu, lnarize_serve.preflight, lnarize_serve.server
lnarize_serve.gpu.probe_gpu = lambda: GpuFacts(*{gpu!r})
lnarize_serve.preflight.gpu_expected = lambda settings: True
lnarize_serve.server.serve = lambda settings: sys.exit("the server must not start")
from lnarize_serve import cli
sys.exit(cli.main(["serve"]))
"""


@pytest.mark.slow  # a subprocess that imports vLLM (~10 s)
@pytest.mark.parametrize(
    ("gpu", "profile", "expected"),
    [
        (("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, (12, 8)), "long-context-bf16", "memory plan: 4 x 262,144 tokens"),
        (("Quadro RTX 8000", (7, 5), 48 * GIB, (12, 8)), "interactive", "need SM >= 8.0"),
        (("NVIDIA GeForce RTX 4090", (8, 9), 24 * GIB, (12, 8)), "interactive", "is too small"),
    ],
)
def test_serve_refuses_in_one_line_and_exit_2(gpu, profile, expected, tmp_path):
    env = without_lnarize_settings()
    if profile == "long-context-bf16":
        profile, env["LNARIZE_KV_CACHE_DTYPE"] = "long-context", "auto"
    env.update(
        PYTHONPATH=str(REPO), LNARIZE_PROFILE=profile, LNARIZE_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1"
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(gpu=gpu)], env=env, capture_output=True, text=True, timeout=120
    )
    ours = [line for line in result.stderr.splitlines() if line.startswith("lnarize-serve")]
    assert result.returncode == 2, result.stderr
    assert len(ours) == 1 and ours[0].startswith("lnarize-serve: preflight: ") and expected in ours[0], ours


def test_serve_md_quotes_the_preflight_line_and_lists_every_gpu_preset(monkeypatch):
    from lnarize_serve.gpu import GPU_PROFILES

    serve_md = (REPO / "SERVE.md").read_text()
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "auto")
    (line,) = problems_for(H100)
    assert f"lnarize-serve: preflight: {line}" in serve_md
    section = serve_md.split("| GPU (`LNARIZE_GPU_PROFILE`) |", 1)[1].split("\n\n", 1)[0]
    rows = [row.split("|")[1].strip().strip("`") for row in section.splitlines()[2:]]
    assert rows == list(GPU_PROFILES)
