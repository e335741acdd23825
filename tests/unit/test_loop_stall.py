from __future__ import annotations

import asyncio
import logging
import time

from lnarize_serve.loop_stall import watch_event_loop


def blocking_callback_in_the_loop(seconds: float) -> None:
    time.sleep(seconds)


async def run_watch(tmp_path, caplog, block_s: float) -> str:
    stacks = (tmp_path / "stacks.txt").open("w+")
    watch = asyncio.create_task(watch_event_loop(stall_s=0.3, tick_s=0.05, stacks_to=stacks))
    await asyncio.sleep(0.2)
    if block_s:
        blocking_callback_in_the_loop(block_s)
    await asyncio.sleep(0.2)
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    stacks.seek(0)
    return stacks.read()


def test_a_blocked_loop_is_logged_with_the_stack_that_blocked_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lnarize_serve.loop_stall"):
        stacks = asyncio.run(run_watch(tmp_path, caplog, block_s=0.8))
    warnings = [r.getMessage() for r in caplog.records if "stood still" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    stood_still = float(warnings[0].split("stood still for ")[1].split(" s")[0])
    assert 0.5 <= stood_still <= 1.5, warnings
    assert "blocking_callback_in_the_loop" in stacks, stacks


def test_a_turning_loop_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lnarize_serve.loop_stall"):
        stacks = asyncio.run(run_watch(tmp_path, caplog, block_s=0))
    assert "stood still" not in caplog.text
    assert stacks == ""


class NoFileDescriptor:
    def fileno(self) -> int:
        raise OSError("closed")


def test_without_a_stream_for_the_stacks_the_warning_still_comes(caplog):
    async def watch_a_blocked_loop() -> None:
        watch = asyncio.create_task(watch_event_loop(stall_s=0.3, tick_s=0.05, stacks_to=NoFileDescriptor()))
        await asyncio.sleep(0.2)
        blocking_callback_in_the_loop(0.8)
        await asyncio.sleep(0.2)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="lnarize_serve.loop_stall"):
        asyncio.run(watch_a_blocked_loop())
    assert "stacks disabled" in caplog.text
    assert "stood still" in caplog.text and "logged just above" not in caplog.text
