"""Benchmark prompts of a requested length in tokens.

A "prompt length" here is the number of prompt tokens the *server* counts for
the chat request (``usage.prompt_tokens``): the chat template, its default
system prompt and the user text together. Two ways to build one:

* ``TokenizerPrompts`` (exact): the model's own tokenizer renders the chat
  template; the user text is cut token by token until the rendered prompt
  has exactly the requested length.
* ``CalibratedPrompts`` (approximate): no tokenizer could be loaded, so one
  probe request per length asks the server how many tokens a known text
  costs (``usage.prompt_tokens``) and the text is scaled by that ratio.
  Lengths typically land within a few tokens; the report shows the counts
  the server actually saw, so nothing is hidden.

Every prompt starts with different random words (seeded), so prefix caching
never reuses an earlier prompt's KV cache; the same seed gives the same text,
which is how `bench compare` sends identical requests to both servers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Plain words: most BPE vocabularies hold them as one or two tokens, so cuts
# land close to the target and nothing looks like an instruction to the model.
_WORDS = (
    "river mountain garden window silver paper orange winter summer market "
    "little forest bridge candle harbor meadow pencil thunder valley rocket "
    "basket blanket castle desert engine feather island jacket kettle ladder "
    "marble needle ocean pillow quartz saddle tunnel violin wagon yellow "
    "anchor bottle carpet dragon empire falcon ginger helmet insect jungle "
    "kingdom lemon mirror number orbit planet rabbit shadow ticket umbrella "
    "velvet whistle animal butter circle doctor energy finger guitar hammer "
    "iron journey kitchen letter machine nature office people question reason "
    "season travel useful village weather answer beauty camera dinner evening "
    "family friend golden history idea keyboard lesson moment north object "
    "picture quiet record simple table uncle visit water yesterday zebra "
    "apple branch cloud danger eagle flower green honey ice jelly kite lamp "
    "music night open pepper queen road stone tiger under voice wheel young "
    "across before common during either follow heavy inside large middle "
    "nothing outside perhaps rather several through toward usually whether"
).split()


def random_text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class PromptSource(Protocol):
    """Builds the messages of one benchmark request."""

    exact: bool
    description: str

    def messages(self, prompt_tokens: int, seed: int) -> list[dict[str, str]]: ...


class PromptTooShort(ValueError):
    """The chat template alone is longer than the requested prompt."""


@dataclass
class TokenizerPrompts:
    """Exact lengths: the model's tokenizer renders the chat template."""

    tokenizer: Any
    source: str
    exact: bool = True

    @property
    def description(self) -> str:
        return f"exact, tokenizer from {self.source}"

    def rendered_length(self, text: str) -> int:
        ids = self.tokenizer.apply_chat_template(chat_messages(text), add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding-like mapping, 4.x a list.
        if hasattr(ids, "keys") and "input_ids" in ids:
            ids = ids["input_ids"]
        return len(ids)

    def messages(self, prompt_tokens: int, seed: int) -> list[dict[str, str]]:
        overhead = self.rendered_length("")
        if prompt_tokens <= overhead:
            raise PromptTooShort(
                f"the chat template alone is {overhead} tokens; ask for prompts longer than that"
            )
        # Words cost 1-2 tokens each: draw more than enough, then cut by token.
        ids = self.tokenizer.encode(random_text(seed, prompt_tokens + 16), add_special_tokens=False)
        keep = prompt_tokens - overhead
        # Decoding a cut and re-encoding it inside the template may merge or
        # split a token at the seams; a few corrections converge.
        for _ in range(8):
            text = self.tokenizer.decode(ids[:keep]).strip()
            length = self.rendered_length(text)
            if length == prompt_tokens:
                return chat_messages(text)
            keep += prompt_tokens - length
        raise RuntimeError(f"could not build a prompt of exactly {prompt_tokens} tokens (seed {seed})")


@dataclass
class CalibratedPrompts:
    """Approximate lengths from a words-per-token ratio measured on the server."""

    overhead_tokens: int
    tokens_per_word: float
    exact: bool = False

    @property
    def description(self) -> str:
        return (
            f"approximate (no tokenizer): server-calibrated at {self.tokens_per_word:.2f} tokens/word, "
            f"template {self.overhead_tokens} tokens"
        )

    def messages(self, prompt_tokens: int, seed: int) -> list[dict[str, str]]:
        budget = prompt_tokens - self.overhead_tokens
        if budget <= 0:
            raise PromptTooShort(
                f"the chat template alone is ~{self.overhead_tokens} tokens; ask for prompts longer than that"
            )
        return chat_messages(random_text(seed, max(1, round(budget / self.tokens_per_word))))


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer via transformers; raises when it cannot be had."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {name_or_path!r} has no chat template")
    return tokenizer


# Counts the prompt tokens the server sees for given messages (a max_tokens=1 probe).
PromptTokenCounter = Callable[[list[dict[str, str]]], Awaitable[int | None]]


async def calibrate(count_prompt_tokens: PromptTokenCounter, probe_words: int = 400) -> CalibratedPrompts:
    """Measure the template overhead and tokens per word with two probe requests."""
    empty = await count_prompt_tokens(chat_messages(""))
    full = await count_prompt_tokens(chat_messages(random_text(-1, probe_words)))
    if empty is None or full is None:
        raise RuntimeError(
            "no tokenizer and the server reports no usage.prompt_tokens, so prompt lengths cannot be "
            "calibrated; pass --tokenizer (a local folder or a Hugging Face id)"
        )
    return CalibratedPrompts(overhead_tokens=empty, tokens_per_word=(full - empty) / probe_words)
