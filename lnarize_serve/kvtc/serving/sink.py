"""The position-0 attention sink, served exactly by the compressed cache.

Position 0 attends only to itself, so its K/V in every layer are a function
of the first token alone: constants of the model for sequences that start
with the calibration's ``sink_token_id`` (BOS / the chat template's first
token). The calibration records them (docs/kvtc-layout.md). Compressing the
sink is what breaks long-context attention, keeping it costs no cache bytes:

- write: a token whose K/V are within ``SINK_TOLERANCE`` of the layer's
  constants (relative L2, every head) is stored as the constants themselves,
  so its slot holds one fixed byte pattern (the constants' encoding);
- read: a sequence whose position-0 slot holds that pattern attends to the
  exact constants there instead of the decoded slot.

The test is on content, not on token ids or request state, so it holds under
prefix caching (a cached first block carries its pattern), preemption and
chunked prefill. A false match elsewhere only stores a token as constants
within the tolerance of its own K/V; a first token that is not the sink
token fails the test and is read compressed like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lnarize_serve.kvtc.format.calibration import Calibration

# Relative distance accepted as "this is the sink": measured on SmolLM2, the
# engine's bf16 position-0 K/V sit within 0.033 of the fp32 constants in every
# layer, the nearest other token (the template's next <|im_start|>, layer 0)
# at 0.59.
SINK_TOLERANCE = 0.125


@dataclass
class SinkConstants:
    """One layer's exact position-0 K/V ([H, d] each, in the model's dtype
    and on the cache's device), the slot bytes they encode to ([H, SLOT]),
    and fp32 copies for the merge."""

    keys: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor

    def __post_init__(self) -> None:
        self.keys_f32 = self.keys.float()
        self.values_f32 = self.values.float()

    @classmethod
    def for_layer(cls, calibration: Calibration, layer_index: int, write, dtype: torch.dtype,
                  device: torch.device) -> "SinkConstants | None":
        """The layer's sink, or None when the calibration has no constants for it."""
        if layer_index not in calibration.sink_keys:
            return None
        return cls.encoded(calibration.sink_keys[layer_index],
                           calibration.sink_values[layer_index], calibration.slot_bytes,
                           write, dtype, device)

    @classmethod
    def encoded(cls, keys: torch.Tensor, values: torch.Tensor, slot_bytes: int, write,
                dtype: torch.dtype, device: torch.device) -> "SinkConstants":
        """``write(key, value, cache, slot_mapping)`` is the device's own
        write op, so the pattern is exactly what that op stores."""
        keys = keys.to(device=device, dtype=dtype)
        values = values.to(device=device, dtype=dtype)
        scratch = torch.zeros(1, keys.shape[0], 16, slot_bytes, dtype=torch.uint8, device=device)
        write(keys[None], values[None], scratch, torch.zeros(1, dtype=torch.int64, device=device))
        return cls(keys, values, scratch[0, :, 0].clone())


def snap_to_sink(key: torch.Tensor, value: torch.Tensor,
                 sink: SinkConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """key/value [T, H, d]: tokens within the tolerance become the constants."""
    near = (_relative_distance(key, sink.keys) < SINK_TOLERANCE) & (
        _relative_distance(value, sink.values) < SINK_TOLERANCE)
    near = near[:, None, None]
    return torch.where(near, sink.keys, key), torch.where(near, sink.values, value)


def _relative_distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Worst head's ||x - reference|| / ||reference||, per token ([T])."""
    ref = reference.float()
    distance = (x.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    return distance.amax(dim=-1)


def sink_flags(cache: torch.Tensor, block_table: torch.Tensor,
               sink: SinkConstants) -> torch.Tensor:
    """[B] bool: sequence b's position-0 slot holds the sink pattern."""
    first_slots = cache[block_table[:, 0].long(), :, 0]  # [B, H, SLOT]
    return (first_slots == sink.slot).flatten(1).all(dim=1)
