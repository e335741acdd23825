"""Exact-length benchmark prompts with the real SmolLM2 tokenizer (the demo model folder)."""

from __future__ import annotations

import pytest

from lnarize_serve.bench.workload import PromptTooShort, TokenizerPrompts, load_tokenizer


@pytest.fixture(scope="module")
def prompts() -> TokenizerPrompts:
    from lnarize_serve.demo_model import ensure_demo_model

    folder = ensure_demo_model()
    return TokenizerPrompts(load_tokenizer(str(folder)), source=str(folder))


@pytest.mark.parametrize("length", [40, 128, 1024, 3000])
def test_rendered_chat_prompt_has_exactly_the_requested_tokens(prompts, length):
    for seed in range(3):
        messages = prompts.messages(length, seed)
        assert prompts.rendered_length(messages[0]["content"]) == length


def test_seeds_give_distinct_openings_and_are_reproducible(prompts):
    # Distinct first words defeat prefix caching; equal seeds give A and B the same request.
    first = {prompts.messages(128, seed)[0]["content"][:40] for seed in range(20)}
    assert len(first) == 20
    assert prompts.messages(128, 7) == prompts.messages(128, 7)


def test_a_length_below_the_chat_template_is_refused(prompts):
    with pytest.raises(PromptTooShort, match="chat template alone"):
        prompts.messages(5, 0)
