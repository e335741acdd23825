"""Run the app under uvicorn with our own signal handling (drain on SIGTERM, exit 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator

import uvicorn

from lnarize_serve.app import create_app
from lnarize_serve.engine import check_kvtc_supported
from lnarize_serve.log_filters import install_engine_dead_filter
from lnarize_serve.runtime import EXIT_ENGINE_DIED, ServerRuntime
from lnarize_serve.settings import ConfigError, Settings

logger = logging.getLogger("lnarize_serve.server")

# After the drain, connections still open (idle keep-alives, requests past the
# drain timeout) get this long before uvicorn cancels them.
FINAL_CLOSE_SECONDS = 3.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT start a drain instead of an immediate stop.

    While draining, SIGINT (Ctrl-C again) stops at once; a repeated SIGTERM is
    logged and changes nothing: supervisors escalate with SIGKILL, and a
    duplicate SIGTERM (a wrapper forwarding what the group also got) must not
    cut the requests the first one promised to finish. uvicorn's own handler
    would also re-raise the signal after shutdown, turning a clean drain into
    exit status 143; ours never re-raises.
    """

    def __init__(self, config: uvicorn.Config, runtime: ServerRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        runtime.request_server_exit = self._request_exit
        self._draining = False

    def _request_exit(self) -> None:
        self.should_exit = True

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._draining:
            self._draining = True
            logger.info("received %s: draining (up to %.0f s)", sig.name, self.runtime.settings.drain_timeout)
            self.runtime.begin_drain()
        elif sig == signal.SIGINT:
            logger.warning("received SIGINT while draining: stopping now")
            self.should_exit = True
            self.force_exit = True
        else:
            logger.warning(
                "received %s again while draining: ignored (the drain ends within LNARIZE_DRAIN_TIMEOUT, %.0f s; "
                "SIGINT or SIGKILL stops at once)",
                sig.name, self.runtime.settings.drain_timeout,
            )

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT)
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)


def _terminate_engine_processes_and_exit(exit_code: int, reason: str) -> None:
    """Terminate the engine processes we spawned and leave at once.

    Used when a normal interpreter exit would wait on vLLM: stopped while the
    engine build (an uninterruptible call in a worker thread) is still running,
    or after the engine died (tearing down its half-dead process tree took
    10-17 s more).
    """
    import os

    import psutil  # a vLLM dependency

    logger.info("%s; terminating engine processes and exiting with code %d", reason, exit_code)
    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    # Short grace: multiprocessing's resource tracker ignores SIGTERM by design.
    _, still_running = psutil.wait_procs(descendants, timeout=2)
    for process in still_running:
        with contextlib.suppress(psutil.Error):
            process.kill()
    logging.shutdown()
    os._exit(exit_code)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("lnarize_serve").setLevel(level.upper())
    # vLLM configures its own "vllm" logger when first imported; follow our level.
    logging.getLogger("vllm").setLevel(level.upper())


def serve(settings: Settings) -> int:
    """Run until drained, dead or failed; returns the process exit code."""
    configure_logging(settings.log_level)
    try:
        check_kvtc_supported(settings)
    except ConfigError as exc:
        print(f"lnarize-serve: configuration error\n{exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    runtime: ServerRuntime = app.state.runtime
    install_engine_dead_filter(shutdown_expected=lambda: runtime.stopping)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=FINAL_CLOSE_SECONDS,
        # Our AccessLogMiddleware writes the access log (with request ids).
        access_log=False,
    )
    server = DrainingServer(config, runtime)
    runtime.on_stop_during_engine_build = lambda: _terminate_engine_processes_and_exit(
        runtime.exit_code, "stopping while the engine was still loading"
    )
    logger.info("listening on http://%s:%d (profile %s)", settings.host, settings.port, settings.profile)
    # The loop `vllm serve` runs on (uvloop when installed, via uvicorn's
    # loop="auto"); plain asyncio.run() cost ~15% more API-process CPU per
    # streamed request (measured with `lnarize-serve bench compare`).
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve())
    if runtime.exit_code == EXIT_ENGINE_DIED:
        # A dead engine has nothing left to flush: leave now so the supervisor restarts us.
        _terminate_engine_processes_and_exit(runtime.exit_code, "the engine died")
    return runtime.exit_code
