"""Server-wide defaults for request fields vLLM has no server default for.

vLLM reads sampling defaults from the generation config (LNARIZE_SAMPLING_DEFAULTS)
and chat-template defaults from its frontend arguments (LNARIZE_THINKING_DEFAULT),
but ``thinking_token_budget`` only from the request: it is filled in here,
on vLLM's parsed request, unless the request sent its own.
"""

from __future__ import annotations

from typing import Any


def apply_request_defaults(request: Any, thinking_token_budget: int | None) -> None:
    """Give ``request`` (chat or completion) the server's thinking budget unless
    it names one itself (-1, vLLM's "unlimited", included)."""
    if thinking_token_budget is None or "thinking_token_budget" in request.model_fields_set:
        return
    request.thinking_token_budget = thinking_token_budget


def thinking_budget_problem(settings: Any, reasoning_config: Any) -> str | None:
    """Why the engine cannot count a server-wide budget, or None.

    vLLM refuses every request with a budget when its reasoning config did not
    get the parser's think markers as token ids; that is a start-up error here.
    """
    if settings.thinking_token_budget is None:
        return None
    if reasoning_config is not None and reasoning_config.enabled:
        return None
    return (
        f"LNARIZE_THINKING_TOKEN_BUDGET={settings.thinking_token_budget}: vLLM could not take the think markers of "
        f"LNARIZE_REASONING_PARSER={settings.reasoning_parser} from this model's tokenizer, so it cannot count "
        "reasoning tokens; use a reasoning parser with start/end markers or unset the budget"
    )
