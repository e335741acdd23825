"""The server's life phases and in-flight request accounting (one instance per app)."""

from __future__ import annotations

import asyncio
import enum
import time


class Phase(str, enum.Enum):
    LOADING = "loading"  # HTTP is up, the engine is being built
    WARMING = "warming"  # engine built, the warm-up generation is running
    READY = "ready"  # a real generation succeeded; serving traffic
    DRAINING = "draining"  # SIGTERM received: no new work, in-flight requests finish
    DEAD = "dead"  # the engine died after it was ready
    FAILED = "failed"  # the engine could not be built or warmed up


# Phases in which the process should be restarted by its supervisor.
FATAL_PHASES = frozenset({Phase.DEAD, Phase.FAILED})


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self._detail = "starting the engine"
        self.started_at = time.monotonic()
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set once: every open response ends now with this message (drain
        # timeout, dead engine); see middleware.ResponseCutMiddleware.
        self.cut_requested = asyncio.Event()
        self.cut_message = ""
        self.cut_reason = ""

    # Phase -------------------------------------------------------------------

    def enter(self, phase: Phase, detail: str = "") -> None:
        self.phase = phase
        self._detail = detail

    @property
    def detail(self) -> str:
        # Live while draining: the count falls as requests finish.
        if self.phase is Phase.DRAINING:
            return f"draining {self.in_flight} in-flight request(s)"
        return self._detail

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def alive(self) -> bool:
        return self.phase not in FATAL_PHASES

    # In-flight accounting (requests admitted to /v1/*) -----------------------

    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every admitted request finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return True
        except TimeoutError:
            return False

    def cut_open_responses(self, reason: str, message: str) -> None:
        """End every open (and later) /v1 response with a 503 saying ``message``;
        ``reason`` is the short cause the log names."""
        if not self.cut_requested.is_set():
            self.cut_reason = reason
            self.cut_message = message
            self.cut_requested.set()
