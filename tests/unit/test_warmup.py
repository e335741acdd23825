"""The warm-up request the server sends before it reports ready."""

import pytest

from lnarize_serve.runtime import WARMUP_DECODE_STEPS, warmup_max_tokens, warmup_sampling_params
from lnarize_serve.settings import Settings


@pytest.mark.parametrize("speculative_tokens", [0, 1, 3])
@pytest.mark.vllm  # vLLM's SamplingParams
def test_warm_up_runs_decode_and_verify_steps_even_if_every_draft_is_accepted(speculative_tokens):
    params = warmup_sampling_params(Settings(speculative_tokens=speculative_tokens))
    assert params.ignore_eos and params.temperature == 0.0
    # the prefill gives one token; each later step gives at most 1 + n tokens
    # (all drafts accepted), so max_tokens - 1 tokens need at least this many steps
    decode_steps = -(-(params.max_tokens - 1) // (speculative_tokens + 1))
    assert decode_steps >= WARMUP_DECODE_STEPS >= 2
    assert params.max_tokens >= speculative_tokens + 2


def test_mtp_three_warms_up_with_nine_tokens():
    assert warmup_max_tokens(3) == 9
    assert warmup_max_tokens(0) == 3
