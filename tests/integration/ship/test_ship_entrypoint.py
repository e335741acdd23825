"""entrypoint.sh run for real: token handling, environment checks and their fixes, exec into lnarize-serve."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shipfiles import REPO_ROOT, VENV_BIN, clean_lnarize_environ

ENTRYPOINT = REPO_ROOT / "entrypoint.sh"
TOKEN = "hf_shipTestToken0123456789abcdef"


def gpu_visible_here() -> bool:
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


@pytest.fixture
def cache_env(tmp_path) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # lnarize-serve and python3 resolve from this test environment, as they do from the image's PATH.
    full_env = clean_lnarize_environ({"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **env})
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def write_token(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hf_token"
    path.write_text(text)
    return path


@pytest.mark.slow  # a subprocess that imports vLLM (~10 s)
def test_env_reaches_the_settings_and_the_token_file_is_never_echoed(tmp_path, cache_env) -> None:
    token_file = write_token(tmp_path, TOKEN + "\n")
    env = {
        **cache_env,
        "HF_TOKEN_PATH": str(token_file),
        "LNARIZE_PROFILE": "long-context",
        "LNARIZE_MAX_NUM_SEQS": "2",
        "LNARIZE_API_KEY": "sk-ship-test-key",
    }
    result = run_entrypoint("config", "--json", env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    settings = config["settings"]
    assert settings["LNARIZE_PROFILE"] == "long-context"
    assert settings["LNARIZE_MAX_MODEL_LEN"] == 262144  # from the preset
    assert settings["LNARIZE_MAX_NUM_SEQS"] == 2  # env overrides the preset
    assert settings["LNARIZE_API_KEY"] == "****"
    assert config["vllm_engine_args"]["max_num_seqs"] == 2
    assert f"read from {token_file}" in result.stderr
    for secret in (TOKEN, "sk-ship-test-key"):
        assert secret not in result.stdout + result.stderr


def test_token_file_is_exported_to_the_server_process_without_whitespace(tmp_path, cache_env) -> None:
    token_file = write_token(tmp_path, f"  {TOKEN}\r\n")
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    check = "import hashlib, os; print(hashlib.sha256(os.environ['HF_TOKEN'].encode()).hexdigest())"
    result = run_entrypoint("python3", "-c", check, env={**cache_env, "HF_TOKEN_PATH": str(token_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == digest
    assert TOKEN not in result.stdout + result.stderr


def test_hf_token_env_wins_and_is_not_echoed(tmp_path, cache_env) -> None:
    token_file = write_token(tmp_path, "hf_fromTheFile")
    env = {**cache_env, "HF_TOKEN": TOKEN, "HF_TOKEN_PATH": str(token_file)}
    result = run_entrypoint("python3", "-c", "import os; print(os.environ['HF_TOKEN'] == 'hf_shipTestToken0123456789abcdef')", env=env)
    assert result.stdout.strip() == "True"
    assert "taken from HF_TOKEN" in result.stderr and TOKEN not in result.stderr


def test_missing_explicit_token_file_fails_with_the_fix(tmp_path, cache_env) -> None:
    result = run_entrypoint("version", env={**cache_env, "HF_TOKEN_PATH": str(tmp_path / "absent")})
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Fix:" in result.stderr


def test_empty_explicit_token_file_fails_with_the_fix(tmp_path, cache_env) -> None:
    empty = write_token(tmp_path, "\n")
    result = run_entrypoint("version", env={**cache_env, "HF_TOKEN_PATH": str(empty)})
    assert result.returncode == 1 and "is empty" in result.stderr and "Fix:" in result.stderr


@pytest.mark.skipif(Path("/run/secrets/hf_token").exists(), reason="this machine has a token at the default path")
def test_no_token_configured_means_no_token_and_says_so(cache_env) -> None:
    result = run_entrypoint("python3", "-c", "import os; print('HF_TOKEN' in os.environ)", env=cache_env)
    assert result.returncode == 0 and result.stdout.strip() == "False"
    assert "Hugging Face token: none (public models only" in result.stderr


@pytest.mark.skipif(gpu_visible_here(), reason="a GPU is visible on this machine")
def test_serving_without_a_visible_gpu_fails_with_the_fix_and_the_skip_switch(cache_env) -> None:
    result = run_entrypoint("serve", env=cache_env, timeout=30)
    assert result.returncode == 1
    assert "no NVIDIA GPU is visible" in result.stderr
    assert "NVIDIA Container Toolkit" in result.stderr and "--gpus all" in result.stderr
    assert "ENTRYPOINT_SKIP_GPU_CHECK=1" in result.stderr
    # Flags alone also mean `serve`, so they are checked too.
    assert run_entrypoint("--port", "9001", env=cache_env, timeout=30).returncode == 1


def test_hidden_gpus_are_named_in_the_message(cache_env) -> None:
    result = run_entrypoint("serve", env={**cache_env, "CUDA_VISIBLE_DEVICES": ""}, timeout=30)
    assert result.returncode == 1 and "CUDA_VISIBLE_DEVICES='' hides GPUs" in result.stderr


def test_skip_switch_passes_the_gpu_check_and_execs_the_server_cli(cache_env) -> None:
    result = run_entrypoint("serve", "--help", env={**cache_env, "ENTRYPOINT_SKIP_GPU_CHECK": "1"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "GPU check skipped (ENTRYPOINT_SKIP_GPU_CHECK=1)" in result.stderr
    assert "usage: lnarize-serve serve" in result.stdout


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_gpu_reported_by_nvidia_smi_passes_the_check_and_is_logged(tmp_path, cache_env) -> None:
    # Fake nvidia-smi: this machine has no GPU, so the real one cannot show this path.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(
        bin_dir,
        "nvidia-smi",
        'case "$1" in\n'
        '  -L) echo "GPU 0: NVIDIA B200 (UUID: GPU-0000)";;\n'
        '  *) echo "NVIDIA B200, 183359 MiB, 580.65";;\n'
        "esac\n",
    )
    env = {**cache_env, "PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    result = run_entrypoint("serve", "--help", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "entrypoint: GPU: NVIDIA B200, 183359 MiB, 580.65" in result.stderr
    # nvidia-smi present but listing no GPU: refused.
    fake_tool(bin_dir, "nvidia-smi", "echo 'No devices were found'; exit 6\n")
    result = run_entrypoint("serve", "--help", env=env, timeout=60)
    assert result.returncode == 1 and "no NVIDIA GPU is visible" in result.stderr


def test_small_shm_is_warned_about_with_the_fix(tmp_path, cache_env) -> None:
    # Fake df reporting Docker's default 64 MiB /dev/shm: this machine's is larger.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "df", 'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"; echo "shm 65536 0 65536 0% /dev/shm"\n')
    env = {
        **cache_env,
        "ENTRYPOINT_SKIP_GPU_CHECK": "1",
        "PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    result = run_entrypoint("serve", "--help", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "WARNING: /dev/shm is only 64 MiB" in result.stderr and "ipc: host" in result.stderr


@pytest.mark.parametrize("variable", ["HF_HOME", "VLLM_CACHE_ROOT", "LNARIZE_CACHE_DIR"])
def test_unwritable_cache_dir_fails_with_the_fix(tmp_path, cache_env, variable) -> None:
    # Root may write anywhere, so "not writable" is produced by a path under a regular file.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**cache_env, variable: str(blocker / "cache"), "ENTRYPOINT_SKIP_GPU_CHECK": "1"}
    result = run_entrypoint("serve", env=env, timeout=30)
    assert result.returncode == 1
    assert f"cache directory {variable}={blocker / 'cache'} is not writable by uid {os.getuid()}" in result.stderr
    assert "Fix:" in result.stderr and "docker compose down -v" in result.stderr and "fsGroup" in result.stderr


def test_subcommands_and_their_arguments_pass_through_without_the_gpu_check(cache_env) -> None:
    result = run_entrypoint("config", "--help", env=cache_env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: lnarize-serve config" in result.stdout and "--json" in result.stdout
    assert "GPU" not in result.stderr


def test_is_posix_sh_with_errexit_and_nounset() -> None:
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text
    assert os.access(ENTRYPOINT, os.X_OK)
    assert "exec lnarize-serve \"$@\"" in text
    assert "set -x" not in text  # would echo the token
    assert sys.platform != "win32"


def test_unset_cache_vars_are_checked_at_their_library_defaults(tmp_path) -> None:
    # HF_HOME and VLLM_CACHE_ROOT unset: huggingface_hub and vLLM fall back to $XDG_CACHE_HOME/...
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"XDG_CACHE_HOME": str(blocker), "ENTRYPOINT_SKIP_GPU_CHECK": "1"}
    result = run_entrypoint("serve", env=env, timeout=30)
    assert result.returncode == 1
    assert f"cache directory HF_HOME={blocker}/huggingface is not writable" in result.stderr
