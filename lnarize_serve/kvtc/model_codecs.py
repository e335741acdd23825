"""All full-attention layers' codecs of one model, as the vLLM backend uses them.

A calibration gives one :class:`LayerCodec` per full-attention layer, indexed by
its ordinal among the model's full-attention layers (0..n-1, the shipped
file's convention; Qwen3.6 has them at layers 3, 7, ..., 63). This module maps
vLLM layer names to those ordinals, checks a calibration against the model,
and stores the kernel-ready tensors as safetensors (the form the serving
processes load quickly; calibration formats and conversion live in the codec).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lnarize_serve.kvtc.codec import LAYOUT_VERSION, KindCodec, LayerCodec

FORMAT_NAME = "lnarize-kvtc-model-codecs"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CalibrationMismatch(ValueError):
    """The calibration does not fit the served model (message says how)."""


@dataclass(frozen=True)
class ModelCodecs:
    layers: tuple[LayerCodec, ...]
    model_id: str = ""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a calibration needs at least one layer")
        first = self.layers[0]
        for i, layer in enumerate(self.layers):
            if (layer.key_bytes, layer.value_bytes) != (first.key_bytes, first.value_bytes):
                raise ValueError(
                    f"layer {i} packs {layer.key_bytes}+{layer.value_bytes} bytes, layer 0 "
                    f"{first.key_bytes}+{first.value_bytes}: vLLM needs one page size"
                )
            if (layer.num_kv_heads, layer.head_dim) != (first.num_kv_heads, first.head_dim):
                raise ValueError(f"layer {i} has a different KV head count or head_dim")

    @property
    def slot_bytes(self) -> int:
        return self.layers[0].slot_bytes

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    @property
    def bytes_per_token_per_head(self) -> int:
        return self.slot_bytes

    def ratio_vs_bf16(self) -> float:
        return 4 * self.head_dim / self.slot_bytes


def full_attention_layer_indices(hf_text_config: Any) -> list[int]:
    """Absolute indices of the full-attention layers of a HF (text) config."""
    num_layers = int(hf_text_config.num_hidden_layers)
    layer_types = getattr(hf_text_config, "layer_types", None)
    if layer_types is None and getattr(hf_text_config, "full_attention_interval", None):
        interval = int(hf_text_config.full_attention_interval)
        return [i for i in range(num_layers) if (i + 1) % interval == 0]
    if layer_types is None:
        return list(range(num_layers))
    return [i for i, kind in enumerate(layer_types) if kind == "full_attention"]


def layer_ordinal(layer_name: str, full_attention_layers: list[int]) -> int:
    """The calibration ordinal of a vLLM attention layer.

    Target layers map to their position among the full-attention layers. A
    draft (MTP) layer sits past the target's layers (or under an ``mtp.``
    prefix) and has no calibration of its own: it reuses the target's last
    full-attention layer. That only changes how often drafts are accepted,
    never the output, because the target model verifies every draft token.
    """
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise CalibrationMismatch(f"cannot find a layer index in {layer_name!r}")
    index = int(match.group(1))
    if layer_name.startswith("mtp") or ".mtp." in layer_name:
        return len(full_attention_layers) - 1
    if index in full_attention_layers:
        return full_attention_layers.index(index)
    if index > max(full_attention_layers):
        return len(full_attention_layers) - 1
    raise CalibrationMismatch(f"layer {layer_name!r} is not a full-attention layer")


def check_against_model(
    codecs: ModelCodecs, num_full_attention_layers: int, num_kv_heads: int, head_dim: int
) -> None:
    """Raise CalibrationMismatch naming every disagreement with the model."""
    problems = []
    if len(codecs.layers) != num_full_attention_layers:
        problems.append(
            f"{len(codecs.layers)} calibrated layers, the model has "
            f"{num_full_attention_layers} full-attention layers"
        )
    if codecs.num_kv_heads != num_kv_heads:
        problems.append(f"{codecs.num_kv_heads} KV heads, the model has {num_kv_heads}")
    if codecs.head_dim != head_dim:
        problems.append(f"head_dim {codecs.head_dim}, the model has {head_dim}")
    if problems:
        raise CalibrationMismatch("KVTC calibration does not match the model: " + "; ".join(problems))


def save_model_codecs(codecs: ModelCodecs, path: str | Path) -> None:
    from safetensors.torch import save_file

    # Every field of the codec's KindCodec is stored by name: tensors as
    # tensors, the rest (byte counts) in the JSON metadata.
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for i, layer in enumerate(codecs.layers):
        for kind in ("keys", "values"):
            part = layer.kind(kind)
            for field in dataclasses.fields(part):
                value = getattr(part, field.name)
                key = f"layers.{i}.{kind}.{field.name}"
                if isinstance(value, torch.Tensor):
                    tensors[key] = value.contiguous().cpu()
                else:
                    scalars[key] = value
    metadata = {
        "format": FORMAT_NAME,
        "layout_version": str(LAYOUT_VERSION),
        "model_id": codecs.model_id,
        "num_layers": str(len(codecs.layers)),
        "scalars": json.dumps(scalars),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_model_codecs(path: str | Path) -> ModelCodecs:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise CalibrationMismatch(f"{path}: not a {FORMAT_NAME} file")
        if metadata.get("layout_version") != str(LAYOUT_VERSION):
            raise CalibrationMismatch(
                f"{path}: slot layout version {metadata.get('layout_version')}, this build "
                f"reads {LAYOUT_VERSION}"
            )
        scalars = json.loads(metadata["scalars"])
        names = set(handle.keys())
        layers = []
        for i in range(int(metadata["num_layers"])):
            parts = {}
            for kind in ("keys", "values"):
                values = {}
                for field in dataclasses.fields(KindCodec):
                    key = f"layers.{i}.{kind}.{field.name}"
                    if key in names:
                        values[field.name] = handle.get_tensor(key)
                    elif key in scalars:
                        values[field.name] = scalars[key]
                parts[kind] = KindCodec(**values)
            layers.append(LayerCodec(parts["keys"], parts["values"]))
    return ModelCodecs(tuple(layers), metadata.get("model_id", ""))


@lru_cache(maxsize=4)
def load_model_codecs_cached(path: str) -> ModelCodecs:
    """One load per process and file (customize_spec and every layer ask)."""
    return load_calibration_file(path)


def load_calibration_file(path: str | Path) -> ModelCodecs:
    """Any calibration file the server accepts, as model codecs."""
    return load_model_codecs(path)
