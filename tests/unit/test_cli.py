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
