"""Route a transformers model's attention through our own function.

transformers calls the attention implementation with post-RoPE queries and
keys ([B, H, T, d]), whatever the rotary fraction (Qwen3.5/3.6 rotate only a
quarter of each head), and only full-attention layers go through it (linear-
attention layers of hybrid models have their own path). That is exactly the
view a paged KV cache gets, so collection and evaluation hook in here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

AttentionFn = Callable[..., tuple[torch.Tensor, Any]]
_names = itertools.count()


@contextlib.contextmanager
def attention_override(model: Any, handler: AttentionFn) -> Iterator[None]:
    """Within the block, every attention call of ``model`` goes to ``handler``
    (signature of transformers' attention functions: module, query, key, value,
    attention_mask, scaling=..., dropout=..., **kwargs -> (output [B, T, Hq, d], weights))."""
    from transformers import AttentionInterface

    name = f"lnarize_kvtc_{next(_names)}"
    AttentionInterface.register(name, handler)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_layers(model: Any) -> list[tuple[int, Any]]:
    """(layer index, attention module) of the full-attention layers."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj") and hasattr(module, "k_proj"):
            found.append((int(module.layer_idx), module))
    return sorted(found, key=lambda item: item[0])
