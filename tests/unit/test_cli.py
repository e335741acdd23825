"""The lnarize-serve command line: subcommands, generated flags, config output."""

import json

import pytest

from lnarize_serve import cli
from lnarize_serve.bench.process import without_lnarize_settings
from lnarize_serve.settings import Settings


pytestmark = pytest.mark.usefixtures("clean_env")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_with_no_env_shows_the_production_engine(capsys):
    code, out, _ = run_cli(capsys, "config", "--json")
    assert code == 0
    config = json.loads(out)
    engine = config["vllm_engine_args"]
    assert engine["quantization"] == "modelopt_fp4"
    assert engine["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 3}
    assert engine["enforce_eager"] is False
    assert config["engine"]["cuda_graphs"] == "on"
    assert config["settings"]["LNARIZE_PROFILE"] == "interactive"


def test_config_text_masks_the_api_key(capsys, monkeypatch):
    monkeypatch.setenv("LNARIZE_API_KEY", "sk-secret-value")
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    assert "LNARIZE_API_KEY=****" in out
    assert "sk-secret-value" not in out
    assert "LNARIZE_ENFORCE_EAGER=false" in out


def test_flags_override_env_and_are_validated(capsys, monkeypatch):
    monkeypatch.setenv("LNARIZE_MAX_NUM_SEQS", "8")
    code, out, _ = run_cli(capsys, "config", "--json", "--max-num-seqs", "3", "--no-enable-prefix-caching")
    config = json.loads(out)
    assert config["vllm_engine_args"]["max_num_seqs"] == 3
    assert config["vllm_engine_args"]["enable_prefix_caching"] is False
    with pytest.raises(SystemExit) as caught:
        cli.main(["config", "--max-num-seqs", "0"])
    assert caught.value.code == 2
    assert "LNARIZE_MAX_NUM_SEQS" in capsys.readouterr().err


def test_every_setting_has_a_flag_with_its_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text, name
        assert f"env LNARIZE_{name.upper()}" in help_text, name


def test_kvtc_config_shows_the_backend_and_refuses_what_it_cannot_honour(capsys, monkeypatch):
    monkeypatch.setenv("LNARIZE_KVTC_ENABLE", "1")
    code, out, _ = run_cli(capsys, "config")
    assert code == 0 and "CUSTOM" in out and "lnarize_kvtc" in out
    monkeypatch.setenv("LNARIZE_KVTC_SINK_TOKENS", "4")
    code, _, err = run_cli(capsys, "config")
    assert code == 2 and "LNARIZE_KVTC_SINK_TOKENS=4" in err


def _local_model_with_sink_calibration(tmp_path):
    """A local model folder (config only) and a calibration with the position-0
    sink constants, beside it (vLLM would load a *.safetensors inside as weights)."""
    import torch

    from lnarize_serve.kvtc.format.calibration import Calibration, RotaryInfo
    from lnarize_serve.kvtc.format.fit import random_layer_codec

    heads, head_dim, layers = 2, 64, 2
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": heads,
        "hidden_size": 4 * head_dim, "head_dim": head_dim, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "vocab_size": 256,
    }))
    codecs = {i: random_layer_codec(heads, head_dim, seed=i)[0] for i in range(layers)}
    sink = {i: torch.zeros(heads, head_dim) for i in range(layers)}
    calibration = Calibration("t", head_dim, heads, layers, codecs, RotaryInfo(head_dim, 10000.0),
                              sink_keys=sink, sink_values=sink, sink_token_id=1)
    return model, calibration.save(tmp_path / "kvtc.safetensors")


def test_kvtc_config_shows_the_settings_the_workers_will_use(capsys, monkeypatch, tmp_path):
    model, calibration = _local_model_with_sink_calibration(tmp_path)
    monkeypatch.setenv("LNARIZE_MODEL", str(model))
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "auto")
    monkeypatch.setenv("LNARIZE_KVTC_ENABLE", "1")
    monkeypatch.setenv("LNARIZE_KVTC_CALIBRATION", str(calibration))
    code, out, err = run_cli(capsys, "config", "--json")
    assert code == 0, err
    resolved = {"calibration": str(calibration.resolve()), "sink_tokens": 1, "window_tokens": 128}
    # the sink setting is unset; the calibration's constants make it 1
    assert json.loads(out)["settings"]["LNARIZE_KVTC_SINK_TOKENS"] is None
    assert json.loads(out)["kvtc"]["runtime"] == resolved
    assert json.loads(out)["vllm_engine_args"]["additional_config"]["lnarize_kvtc"] == resolved
    code, out, _ = run_cli(capsys, "config")
    assert code == 0 and "\nsink_tokens: 1\n" in out


def test_kvtc_config_says_in_words_what_it_cannot_resolve_offline(capsys, monkeypatch):
    # the production model is not in this machine's Hugging Face cache
    monkeypatch.setenv("LNARIZE_KVTC_ENABLE", "1")
    monkeypatch.setenv("LNARIZE_CACHE_DIR", "/nonexistent-lnarize-cache")
    code, out, err = run_cli(capsys, "config")
    assert code == 0, err
    assert ("not resolved offline: LNARIZE_KVTC_CALIBRATION='kvtc_calibration.pt' is not a local "
            "file and not in the Hugging Face cache") in out
    assert '"lnarize_kvtc": "resolved at start-up: ' in out
    assert "null" not in out.split("# KVTC", 1)[1].split("# vLLM", 1)[0]


@pytest.mark.vllm  # the version of the vLLM it imports
def test_version_and_help_and_unknown(capsys):
    code, out, _ = run_cli(capsys, "version")
    assert code == 0 and "lnarize-serve" in out and "vllm 0.32.0" in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in cli.SUBCOMMANDS)
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "unknown subcommand" in err


def test_registry_entries_resolve():
    for name in cli.SUBCOMMANDS:
        parser = cli.build_parser(name)
        assert parser.prog == f"lnarize-serve {name}"


def test_readme_settings_table_lists_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` | `LNARIZE_{name.upper()}` |" in readme, name


def config_in_a_fresh_process(**settings: str):
    # A fresh process: an import of vLLM earlier in this test session would
    # hide its import-time log lines (Triton, platform) from these checks.
    import subprocess
    import sys

    env = without_lnarize_settings()
    env.update(settings)
    return subprocess.run(
        [sys.executable, "-m", "lnarize_serve", "config"],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_bad_setting_prints_only_the_error_line():
    result = config_in_a_fresh_process(LNARIZE_MAX_NUM_SEQS="abc")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "lnarize-serve: configuration error",
        "invalid setting LNARIZE_MAX_NUM_SEQS='abc': Input should be a valid integer, "
        "unable to parse string as an integer (allowed: >= 1 and <= 1024)",
    ], result.stderr


@pytest.mark.slow  # a subprocess that imports vLLM (~10 s)
def test_setting_outside_vllms_choices_prints_only_the_error_line():
    result = config_in_a_fresh_process(LNARIZE_KV_CACHE_DTYPE="bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "lnarize-serve: configuration error", result.stderr
    assert len(lines) == 2 and lines[1].startswith(
        "invalid setting LNARIZE_KV_CACHE_DTYPE='bogus': unknown KV cache dtype 'bogus'; allowed: auto"
    ), result.stderr


def test_closed_standard_fds_get_dev_null_before_anything_else_opens_one():
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys\n"
        "from lnarize_serve.cli import ensure_standard_fds\n"
        "before = []\n"
        "for fd in (0, 2):\n"
        "    try:\n"
        "        os.fstat(fd); before.append('open')\n"
        "    except OSError:\n"
        "        before.append('closed')\n"
        "ensure_standard_fds()\n"
        "print(before, os.readlink('/proc/self/fd/0'), os.readlink('/proc/self/fd/2'))\n"
    )

    def close_stdin_and_stderr():
        os.close(0)
        os.close(2)

    completed = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True,
                               preexec_fn=close_stdin_and_stderr, timeout=60)
    assert completed.returncode == 0
    assert completed.stdout.split() == ["['closed',", "'closed']", os.devnull, os.devnull]
