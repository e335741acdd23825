"""Lifecycle: phase details and in-flight accounting."""

from lnarize_serve.lifecycle import Lifecycle, Phase


def test_draining_detail_counts_requests_as_they_finish():
    lifecycle = Lifecycle()
    lifecycle.enter(Phase.READY, "warm")
    lifecycle.request_started()
    lifecycle.request_started()
    lifecycle.enter(Phase.DRAINING, "draining 2 in-flight request(s)")
    assert lifecycle.detail == "draining 2 in-flight request(s)"
    lifecycle.request_finished()
    assert lifecycle.detail == "draining 1 in-flight request(s)"
    lifecycle.request_finished()
    assert lifecycle.detail == "draining 0 in-flight request(s)"


def test_other_phases_keep_their_detail():
    lifecycle = Lifecycle()
    lifecycle.enter(Phase.DEAD, "the vLLM engine process died")
    lifecycle.request_started()
    assert lifecycle.detail == "the vLLM engine process died"
