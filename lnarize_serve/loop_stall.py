"""Notice when the API process's event loop stands still.

Every request, health probes included, waits while one callback blocks the
loop, so a blocked loop looks like a hung server from outside (probes time
out, Kubernetes restarts the pod). When a tick comes back later than the
threshold, the log gets one warning saying how long the loop stood still;
faulthandler's watchdog thread, which runs while the loop is blocked, has
already written the stacks of every thread at that moment just above it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import time
from typing import TextIO

logger = logging.getLogger("lnarize_serve.loop_stall")

TICK_SECONDS = 0.5
STALL_SECONDS = 5.0


async def watch_event_loop(
    stall_s: float = STALL_SECONDS, tick_s: float = TICK_SECONDS, stacks_to: TextIO | None = None
) -> None:
    """Run as a task for the life of the server."""
    stacks_to = stacks_to if stacks_to is not None else sys.stderr
    dump_stacks = True
    try:
        while True:
            if dump_stacks:
                # Re-armed every tick: it fires only if the loop misses ticks for stall_s.
                try:
                    faulthandler.dump_traceback_later(stall_s, file=stacks_to)
                except (RuntimeError, ValueError, OSError, AttributeError) as exc:
                    # No file descriptor to write to (stderr closed): the warning alone.
                    logger.info("event-loop stall stacks disabled: %s", exc)
                    dump_stacks = False
            started = time.monotonic()
            await asyncio.sleep(tick_s)
            late = time.monotonic() - started - tick_s
            if late >= stall_s:
                logger.warning(
                    "the event loop stood still for %.1f s: every request waited meanwhile%s",
                    late, " (the stacks of all threads at that moment are logged just above)" if dump_stacks else "",
                )
    finally:
        faulthandler.cancel_dump_traceback_later()
