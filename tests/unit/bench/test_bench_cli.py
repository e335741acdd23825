"""`lnarize-serve bench` command line: argument checks and a clean failure when no server listens."""

from __future__ import annotations

import argparse
import socket
import sys

import pytest

from lnarize_serve.bench.cli import int_list
from lnarize_serve.bench.client import normalize_base_url
from lnarize_serve.cli import main


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_is_one_clear_line_and_exit_1(capsys):
    code = main(["bench", "--base-url", f"http://127.0.0.1:{closed_port()}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "server unreachable" in err and "cannot connect" in err
    assert "Traceback" not in err


def test_base_url_is_required_and_checked(capsys):
    assert main(["bench"]) == 2
    assert "--base-url is required" in capsys.readouterr().err
    assert main(["bench", "--base-url", "localhost:9000"]) == 2
    assert "http://host:port/v1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:9000", "http://h:9000/v1"),
        ("http://h:9000/", "http://h:9000/v1"),
        ("http://h:9000/v1/", "http://h:9000/v1"),
        ("https://h/proxy/v1", "https://h/proxy/v1"),
    ],
)
def test_base_url_normalisation(given, expected):
    assert normalize_base_url(given) == expected


def test_grid_lists():
    assert int_list("1,4,16") == [1, 4, 16]
    for bad in ("", "1,x", "0,4"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)


def test_compare_is_a_subcommand_with_its_own_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "compare", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--rounds" in out and "--set" in out and "--concurrency" in out


@pytest.mark.parametrize("command", [["bench"], ["bench", "compare"]])
def test_plot_without_matplotlib_stops_before_measuring(command, monkeypatch, capsys, tmp_path):
    # An installation without the bench extra: `import matplotlib` fails.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main([*command, "--base-url", f"http://127.0.0.1:{closed_port()}", "--no-progress",
                 "--plot", str(tmp_path / "p.png")] if command == ["bench"]
                else [*command, "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().endswith("pip install 'lnarize-serve[bench]'"), err
    assert "unreachable" not in err and "engine arguments" not in err
