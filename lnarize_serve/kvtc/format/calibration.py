"""Our calibration format: one safetensors file, tensors in the stacked layout
form plus JSON metadata in the safetensors header (key "kvtc").

Tensor names: ``layers.<model_layer>.<keys|values>.<mean|basis|bits|scale|zero|bit_offset>``.
The JSON records the model, the layer map, head geometry, rotary facts, the
per-entry bit allocation and byte sizes, so a file can be inspected and
validated against a model without loading tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.codec import KINDS, LAYOUT_VERSION, KindCodec, LayerCodec

FORMAT_NAME = "lnarize-kvtc"
FORMAT_VERSION = 1
_FIELDS = ("mean", "basis", "bits", "scale", "zero", "bit_offset")


class CalibrationError(ValueError):
    """A calibration file is unreadable, inconsistent, or does not fit the model."""


@dataclass
class RotaryInfo:
    """How the model rotates keys. Keys in this format are always post-RoPE."""

    rotary_dim: int
    rope_theta: float


@dataclass
class Calibration:
    """KVTC calibration of a model: one LayerCodec per full-attention layer."""

    model_id: str
    head_dim: int
    num_kv_heads: int
    num_model_layers: int
    layers: dict[int, LayerCodec]  # model layer index -> codec
    rotary: RotaryInfo
    sink_tokens: int = 0
    window_tokens: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # provenance: fitter, corpus, converter
    # exact K/V of position 0 (the attention sink) per layer, [H, d] each, valid
    # for sequences whose first token is sink_token_id (see docs/kvtc-layout.md)
    sink_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    sink_values: dict[int, torch.Tensor] = field(default_factory=dict)
    sink_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise CalibrationError("a calibration needs at least one layer")
        sizes = {(c.key_bytes, c.value_bytes) for c in self.layers.values()}
        if len(sizes) != 1:
            raise CalibrationError(f"layers disagree on (key_bytes, value_bytes): {sorted(sizes)}")
        for index, codec in self.layers.items():
            if (codec.num_kv_heads, codec.head_dim) != (self.num_kv_heads, self.head_dim):
                raise CalibrationError(
                    f"layer {index} has {codec.num_kv_heads} KV heads of dim {codec.head_dim}, "
                    f"expected {self.num_kv_heads} x {self.head_dim}")
            if not 0 <= index < self.num_model_layers:
                raise CalibrationError(f"layer index {index} outside 0..{self.num_model_layers - 1}")
        if self.sink_keys or self.sink_values:
            if set(self.sink_keys) != set(self.layers) or set(self.sink_values) != set(self.layers):
                raise CalibrationError("sink K/V must cover exactly the calibrated layers")
            for tensor in (*self.sink_keys.values(), *self.sink_values.values()):
                if tuple(tensor.shape) != (self.num_kv_heads, self.head_dim):
                    raise CalibrationError(f"sink K/V shape {tuple(tensor.shape)} != "
                                           f"({self.num_kv_heads}, {self.head_dim})")
            if self.sink_token_id is None:
                raise CalibrationError("sink K/V need the sink_token_id they were captured for")

    @property
    def key_bytes(self) -> int:
        return next(iter(self.layers.values())).key_bytes

    @property
    def value_bytes(self) -> int:
        return next(iter(self.layers.values())).value_bytes

    @property
    def slot_bytes(self) -> int:
        return next(iter(self.layers.values())).slot_bytes

    @property
    def layer_indices(self) -> list[int]:
        return sorted(self.layers)

    @property
    def has_sink_constants(self) -> bool:
        return bool(self.sink_keys)

    def metadata(self) -> dict[str, Any]:
        allocation = {
            str(index): {kind: [[int(b) for b in row if b > 0]
                                for row in codec.kind(kind).bits.tolist()] for kind in KINDS}
            for index, codec in sorted(self.layers.items())}
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "layout_version": LAYOUT_VERSION, "model_id": self.model_id,
            "head_dim": self.head_dim, "num_kv_heads": self.num_kv_heads,
            "num_model_layers": self.num_model_layers, "layer_map": self.layer_indices,
            "key_domain": "post_rope",
            "rotary": {"rotary_dim": self.rotary.rotary_dim, "rope_theta": self.rotary.rope_theta},
            "key_bytes": self.key_bytes, "value_bytes": self.value_bytes,
            "slot_bytes": self.slot_bytes,
            "sink_tokens": self.sink_tokens, "window_tokens": self.window_tokens,
            "sink_token_id": self.sink_token_id, "has_sink_kv": bool(self.sink_keys),
            "bit_allocation": allocation, "source": self.source,
        }

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for index, codec in self.layers.items():
            for kind in KINDS:
                part = codec.kind(kind)
                for name in _FIELDS:
                    tensors[f"layers.{index}.{kind}.{name}"] = getattr(part, name).cpu().clone()
            if self.sink_keys:
                tensors[f"layers.{index}.sink.keys"] = self.sink_keys[index].float().cpu().clone()
                tensors[f"layers.{index}.sink.values"] = (
                    self.sink_values[index].float().cpu().clone())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"kvtc": json.dumps(self.metadata())})
        return path

    def to(self, device: torch.device | str) -> "Calibration":
        layers = {i: c.to(device) for i, c in self.layers.items()}
        return Calibration(self.model_id, self.head_dim, self.num_kv_heads, self.num_model_layers,
                           layers, self.rotary, self.sink_tokens, self.window_tokens, self.source,
                           {i: t.to(device) for i, t in self.sink_keys.items()},
                           {i: t.to(device) for i, t in self.sink_values.items()},
                           self.sink_token_id)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of one of our files (no tensors read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CalibrationError(f"{path}: not a safetensors file ({exc})") from exc
    if "kvtc" not in header:
        raise CalibrationError(f"{path}: safetensors file without KVTC metadata")
    meta = json.loads(header["kvtc"])
    if meta.get("format") != FORMAT_NAME:
        raise CalibrationError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{path}: format version {meta.get('format_version')} "
                               f"unsupported (this build reads {FORMAT_VERSION})")
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise CalibrationError(f"{path}: slot layout version {meta.get('layout_version')} "
                               f"does not match this build's {LAYOUT_VERSION}")
    return meta


@dataclass(frozen=True)
class CalibrationSummary:
    """What the server needs of a calibration file, from its metadata alone:
    no tensor is loaded and no torch op runs (the server process must stay
    free of torch compute and CUDA before vLLM forks its engine)."""

    head_dim: int
    num_kv_heads: int
    num_model_layers: int
    layer_indices: list[int]
    slot_bytes: int
    has_sink_constants: bool

    @classmethod
    def read(cls, path: str | Path) -> "CalibrationSummary":
        meta = read_metadata(path)
        try:
            return cls(int(meta["head_dim"]), int(meta["num_kv_heads"]),
                       int(meta["num_model_layers"]), sorted(int(i) for i in meta["layer_map"]),
                       int(meta["slot_bytes"]), bool(meta.get("has_sink_kv")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{path}: incomplete KVTC metadata ({exc})") from None


def load_calibration(path: str | Path, device: str | torch.device = "cpu") -> Calibration:
    """Load one of our safetensors calibration files."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    tensors = load_file(str(path), device=str(device))
    layers = {}
    for index in meta["layer_map"]:
        parts = {}
        for kind in KINDS:
            prefix = f"layers.{index}.{kind}."
            try:
                values = {name: tensors[prefix + name] for name in _FIELDS}
            except KeyError as exc:
                raise CalibrationError(f"{path}: missing tensor {exc.args[0]}") from None
            num_bytes = meta["key_bytes"] if kind == "keys" else meta["value_bytes"]
            try:
                parts[kind] = KindCodec(num_bytes=num_bytes, **values)
            except ValueError as exc:
                raise CalibrationError(f"{path}: layer {index} {kind}: {exc}") from None
        layers[int(index)] = LayerCodec(parts["keys"], parts["values"])
    rotary = RotaryInfo(**meta["rotary"])
    sink_keys, sink_values = {}, {}
    if meta.get("has_sink_kv"):
        for index in meta["layer_map"]:
            try:
                sink_keys[int(index)] = tensors[f"layers.{index}.sink.keys"]
                sink_values[int(index)] = tensors[f"layers.{index}.sink.values"]
            except KeyError as exc:
                raise CalibrationError(f"{path}: missing tensor {exc.args[0]}") from None
    return Calibration(meta["model_id"], meta["head_dim"], meta["num_kv_heads"],
                       meta["num_model_layers"], layers, rotary, meta.get("sink_tokens", 0),
                       meta.get("window_tokens", 0), meta.get("source", {}), sink_keys,
                       sink_values, meta.get("sink_token_id"))


# -- the model a calibration is for ----------------------------------------

def validate_against_model(calibration: Calibration | CalibrationSummary,
                           geometry: AttentionGeometry) -> None:
    """Raise CalibrationError naming the first mismatch with the model."""
    problems = []
    if calibration.head_dim != geometry.head_dim:
        problems.append(f"head_dim {calibration.head_dim} != model's {geometry.head_dim}")
    if calibration.num_kv_heads != geometry.num_kv_heads:
        problems.append(f"{calibration.num_kv_heads} KV heads != model's {geometry.num_kv_heads}")
    if calibration.num_model_layers != geometry.num_layers:
        problems.append(f"made for {calibration.num_model_layers} layers, "
                        f"model has {geometry.num_layers}")
    wanted = set(geometry.full_attention_layers)
    have = set(calibration.layer_indices)
    if have != wanted:
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        problems.append(f"layer map mismatch: missing full-attention layers {missing}, "
                        f"not full-attention in the model {extra}")
    if problems:
        raise CalibrationError("calibration does not fit the model: " + "; ".join(problems))
