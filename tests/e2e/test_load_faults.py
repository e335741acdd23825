"""Bounded load with faults on the real cpu-demo server: concurrent streaming
clients for a few rounds, a quarter of them hanging up mid-stream, then a
SIGTERM in the middle of a last round.

Every request must end with a complete stream, our own hang-up, a 503 refusal
while draining, or an error event (never silently cut); the engine must be
idle after each round; the API server's RSS must not grow from round 1 to the
last plain round; and the server must exit 0 after the drain.

The rounds themselves live in benchmarks/load_faults.py, which prints the
same table with longer rounds.
"""

from __future__ import annotations

import pytest

from benchmarks.load_faults import LoadConfig, access_log_posts, print_table, run_all
from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "sk-load-test"
DRAIN_TIMEOUT = 30
ROUNDS = 3
CONFIG = LoadConfig(clients=8, seconds=12, disconnect_fraction=0.25)
# Allocator noise and lazily built caches (first chat template use, tokenizer
# paths, metrics series) may add a little after round 1; a leak per request
# (hundreds of requests a round) would add more than this.
RSS_MARGIN_MIB = 24


@pytest.fixture(scope="module")
def server(demo_model_path, server_logs):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_API_KEY=API_KEY,
        LNARIZE_MAX_MODEL_LEN="512",
        LNARIZE_MAX_NUM_SEQS="4",
        LNARIZE_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
    )
    yield from running_server(env, server_logs / "load-faults-server.log")


def test_load_with_hang_ups_and_a_sigterm_loses_no_request(server):
    results, exit_code = run_all(server.url, server.process, API_KEY, CONFIG, ROUNDS, exit_timeout=DRAIN_TIMEOUT + 30)
    print()
    print_table(results)
    print(f"exit code after SIGTERM: {exit_code}")

    for result in results:
        assert result.outcomes["lost"] == 0, (result.name, result.details)
        assert result.outcomes["error"] == 0, (result.name, result.details)
    plain, last = results[:ROUNDS], results[ROUNDS]
    for result in plain:
        assert result.outcomes["completed"] > 0 and result.outcomes["client_abort"] > 0, result.outcomes
        assert result.outcomes["refused_503"] == 0, result.outcomes
        assert result.outcomes["unanswered"] == 0, (result.name, result.details)
        assert result.running_after == 0, result.name
    # The SIGTERM round: streams admitted before the signal completed (or were
    # hung up by us); later requests were refused while draining.
    assert last.outcomes["completed"] > 0 and last.outcomes["refused_503"] > 0, last.outcomes
    assert plain[-1].rss_mib - plain[0].rss_mib < RSS_MARGIN_MIB, [r.rss_mib for r in plain]
    assert exit_code == 0, server.log_tail()
    # Connections reset before any response (the SIGTERM round's accept-queue
    # race) never reached the server: it logged exactly the answered requests.
    assert access_log_posts(server.log_path) == sum(r.answered for r in results), [r.outcomes for r in results]
