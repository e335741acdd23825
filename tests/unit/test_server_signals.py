"""Signal rules of the HTTP server: the first SIGTERM or SIGINT starts the
drain; while draining, SIGINT stops at once and a repeated SIGTERM changes
nothing (the drain timeout bounds it; supervisors escalate with SIGKILL)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import uvicorn

from lnarize_serve.server import DrainingServer


class RecordingRuntime:
    """Just what DrainingServer uses of ServerRuntime: the drain switch."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(drain_timeout=30.0)
        self.drains_begun = 0
        self.request_server_exit = None

    def begin_drain(self) -> None:
        self.drains_begun += 1


def make_server() -> tuple[DrainingServer, RecordingRuntime]:
    runtime = RecordingRuntime()
    return DrainingServer(uvicorn.Config(app=lambda scope, receive, send: None), runtime), runtime


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_starts_the_drain_and_keeps_serving(first):
    server, runtime = make_server()
    server._on_signal(first)
    assert runtime.drains_begun == 1
    assert not server.should_exit and not server.force_exit


def test_repeated_sigterm_does_not_cut_the_drain(caplog):
    server, runtime = make_server()
    server._on_signal(signal.SIGTERM)
    with caplog.at_level("WARNING", logger="lnarize_serve.server"):
        server._on_signal(signal.SIGTERM)
        server._on_signal(signal.SIGTERM)
    assert runtime.drains_begun == 1
    assert not server.should_exit and not server.force_exit
    assert "received SIGTERM again while draining: ignored" in caplog.text


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_sigint_while_draining_stops_at_once(first):
    server, runtime = make_server()
    server._on_signal(first)
    server._on_signal(signal.SIGINT)
    assert runtime.drains_begun == 1
    assert server.should_exit and server.force_exit


def test_drain_end_asks_the_server_to_exit():
    server, runtime = make_server()
    runtime.request_server_exit()
    assert server.should_exit and not server.force_exit
