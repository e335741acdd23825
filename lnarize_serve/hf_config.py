"""The attention facts of a Hugging Face model config, read in one place.

The capacity planner (:mod:`lnarize_serve.plan`) and KVTC (a calibration must
match the model's layers, heads and rotary) read the same config.json fields.
Multimodal configs keep them under ``text_config``; hybrid models mark their
full-attention layers with ``layer_types`` or ``full_attention_interval``.
No torch, no transformers: the planner runs without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def text_config(config: Any) -> dict[str, Any]:
    """The language model's part of a config.json dict or transformers config object."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    return cfg.get("text_config") or cfg


def layer_types(text: dict[str, Any]) -> tuple[str, ...]:
    """Each decoder layer's kind ("full_attention", "linear_attention", ...)."""
    num_layers = int(text["num_hidden_layers"])
    if text.get("layer_types"):
        return tuple(text["layer_types"])
    if text.get("full_attention_interval"):
        interval = int(text["full_attention_interval"])
        return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(num_layers))
    return ("full_attention",) * num_layers


@dataclass(frozen=True)
class AttentionGeometry:
    """The full-attention layers of a model and the shape of their KV heads."""

    num_layers: int
    full_attention_layers: tuple[int, ...]
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    linear_attention_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> AttentionGeometry:
        """From a config.json dict or a transformers config object."""
        text = text_config(config)
        kinds = layer_types(text)
        num_q_heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // num_q_heads)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = text.get("rope_theta") or rope.get("rope_theta") or 10000.0
        factor = text.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        return cls(
            num_layers=int(text["num_hidden_layers"]),
            full_attention_layers=tuple(i for i, t in enumerate(kinds) if t == "full_attention"),
            num_kv_heads=int(text.get("num_key_value_heads") or num_q_heads),
            num_q_heads=num_q_heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * factor),
            rope_theta=float(theta),
            linear_attention_layers=tuple(i for i, t in enumerate(kinds) if t == "linear_attention"),
        )
