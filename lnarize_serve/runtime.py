"""Owns the engine for one app: background load, warm-up, watchdog, drain, shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from lnarize_serve.engine import EngineHandle, prepare_launch, start_engine
from lnarize_serve.lifecycle import FATAL_PHASES, Lifecycle, Phase
from lnarize_serve.metrics import ServerMetrics
from lnarize_serve.errors import ENGINE_DEAD_MESSAGE
from lnarize_serve.middleware import CUT_UNWIND_SECONDS
from lnarize_serve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs

logger = logging.getLogger("lnarize_serve.runtime")

# Exit codes the supervisor (Docker, Kubernetes) sees.
EXIT_OK = 0
EXIT_ENGINE_FAILED_TO_START = 1
EXIT_ENGINE_DIED = 3
# Let probes observe "dead" before the process goes away.
DEAD_GRACE_SECONDS = 1.0
WATCHDOG_INTERVAL_SECONDS = 0.25

EngineStarter = Callable[["AsyncEngineArgs"], EngineHandle]

# Decode steps the warm-up runs after its prefill (with MTP each one verifies
# a draft), so kernels compiled on first use (decode attention, KVTC's decode,
# MTP verification) compile before the first user request.
WARMUP_DECODE_STEPS = 2


def warmup_max_tokens(speculative_tokens: int) -> int:
    """Tokens the warm-up asks for: the prefill's token plus enough for
    WARMUP_DECODE_STEPS decode steps even if every draft is accepted."""
    return 1 + WARMUP_DECODE_STEPS * (speculative_tokens + 1)


def warmup_sampling_params(settings: Settings):
    from lnarize_serve.vllm_compat.engine import SamplingParams

    return SamplingParams(max_tokens=warmup_max_tokens(settings.speculative_tokens),
                          temperature=0.0, ignore_eos=True)


class ServerRuntime:
    def __init__(
        self,
        settings: Settings,
        lifecycle: Lifecycle,
        metrics: ServerMetrics,
        engine_starter: EngineStarter = start_engine,
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.engine_starter = engine_starter
        self.engine = None
        self.exit_code = EXIT_OK
        self.stopping = False
        # Set by the HTTP server so the runtime can ask it to stop.
        self.request_server_exit: Callable[[], None] = lambda: None
        self._drain_task: asyncio.Task | None = None
        # True while vLLM builds the engine in a worker thread (not interruptible).
        self.engine_build_in_progress = False
        self.on_stop_during_engine_build: Callable[[], None] | None = None

    def _enter(self, phase: Phase, detail: str = "") -> None:
        self.lifecycle.enter(phase, detail)
        self.metrics.set_phase(phase)
        logger.info("phase=%s %s", phase.value, detail)

    # Start-up ---------------------------------------------------------------------

    async def load(self, app: FastAPI) -> None:
        """Build the engine off the event loop (HTTP keeps answering), install
        vLLM's serving classes, then prove a real generation works."""
        from lnarize_serve.serving import install_openai_serving

        try:
            self._enter(Phase.LOADING, "preparing the model")
            served_settings, engine_args = await asyncio.to_thread(prepare_launch, self.settings)
            self._enter(Phase.LOADING, f"building the vLLM engine for {engine_args.model}")
            handle = await asyncio.to_thread(self._build_engine, engine_args)
            self.engine = handle.engine
            if self.stopping:
                return
            self.metrics.engine_load_seconds.set(handle.load_seconds)
            self.metrics.kvtc.record_engine(self.engine.vllm_config)
            logger.info("engine built in %.1f s", handle.load_seconds)
            await install_openai_serving(app.state, self.engine, served_settings, engine_args)
            self._enter(
                Phase.WARMING,
                f"running a {warmup_max_tokens(served_settings.speculative_tokens)}-token warm-up "
                "generation (prefill, decode and MTP verify steps)",
            )
            warmup_seconds = await self._warm_up(served_settings)
            self.metrics.warmup_seconds.set(warmup_seconds)
            if self.lifecycle.phase is Phase.WARMING:
                self._enter(Phase.READY, f"engine {handle.load_seconds:.1f} s, warm-up {warmup_seconds:.2f} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure to start is fatal and must be visible
            logger.exception("engine failed to start")
            self._enter(Phase.FAILED, f"{type(exc).__name__}: {exc}")
            self.exit_code = EXIT_ENGINE_FAILED_TO_START
            self.request_server_exit()

    def _build_engine(self, engine_args: AsyncEngineArgs) -> EngineHandle:
        # The flag is cleared by the thread itself: cancelling the awaiting
        # task does not stop this call.
        self.engine_build_in_progress = True
        try:
            return self.engine_starter(engine_args)
        finally:
            self.engine_build_in_progress = False

    async def _warm_up(self, served_settings: Settings) -> float:
        # The adapted settings: a preset may lower the MTP depth the warm-up must cover.
        started = time.monotonic()
        params = warmup_sampling_params(served_settings)
        produced = 0
        async for output in self.engine.generate("Hello", params, request_id=f"lnarize-warmup-{uuid.uuid4().hex}"):
            produced = len(output.outputs[0].token_ids)
        if produced < params.max_tokens:
            raise RuntimeError(
                f"warm-up generation produced {produced} of {params.max_tokens} tokens"
            )
        return time.monotonic() - started

    # Engine watchdog --------------------------------------------------------------

    async def watch_engine(self) -> None:
        """If the engine dies: liveness -> 503, then exit non-zero so the supervisor restarts us."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_SECONDS)
            engine = self.engine
            if engine is None or self.stopping or self.lifecycle.phase in FATAL_PHASES:
                continue
            if engine.errored:
                self._enter(Phase.DEAD, "the vLLM engine process died")
                logger.error(
                    "vLLM engine died with %d request(s) in flight; exiting with code %d",
                    self.lifecycle.in_flight, EXIT_ENGINE_DIED,
                )
                self.exit_code = EXIT_ENGINE_DIED
                self.lifecycle.cut_open_responses("engine died", ENGINE_DEAD_MESSAGE)
                await asyncio.sleep(DEAD_GRACE_SECONDS)
                self.request_server_exit()
                return

    # Shutdown ---------------------------------------------------------------------

    def begin_drain(self) -> None:
        """SIGTERM: stop admitting at once, let in-flight requests finish, then stop."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        if self.lifecycle.phase not in FATAL_PHASES:
            self._enter(Phase.DRAINING, f"draining {self.lifecycle.in_flight} in-flight request(s)")
        timeout = self.settings.drain_timeout
        if await self.lifecycle.wait_idle(timeout):
            logger.info("drained; stopping")
        else:
            logger.warning(
                "drain timeout (%.0f s) hit with %d request(s) in flight; ending each with a 503",
                timeout, self.lifecycle.in_flight,
            )
            self.lifecycle.cut_open_responses(
                "drain timeout",
                f"The server is shutting down: the drain timeout ({timeout:.0f} s) ended this response "
                "before it finished; retry the request.",
            )
            await self.lifecycle.wait_idle(CUT_UNWIND_SECONDS + 1)
        self.request_server_exit()

    @property
    def engine_dead(self) -> bool:
        engine = self.engine
        return engine is not None and engine.errored

    def stop_during_engine_build(self) -> None:
        """Called at shutdown: if vLLM is still building the engine (an
        uninterruptible call in a worker thread), run the hook the process
        owner installed (server.py: terminate the engine processes and exit).
        Without a hook (tests, embedding) nothing happens here."""
        if self.engine_build_in_progress and self.on_stop_during_engine_build is not None:
            self.on_stop_during_engine_build()

    def shutdown_engine(self) -> None:
        self.stopping = True
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
