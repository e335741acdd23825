"""Which codec serves which vLLM attention layer, and loading it per process.

A calibration (:class:`lnarize_serve.kvtc.format.calibration.Calibration`, the
codec's format) holds one LayerCodec per full-attention layer, keyed by the
model's layer index. vLLM names attention layers ``...layers.<i>.self_attn.attn``.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lnarize_serve.kvtc.format.calibration import Calibration, CalibrationError, load_calibration

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index_for(layer_name: str, calibrated_layers: list[int], num_model_layers: int) -> int:
    """The calibration entry (model layer index) that serves a vLLM layer.

    Target layers use their own entry. A draft (MTP) layer sits past the
    target's layers (or under an ``mtp.`` prefix) and has no calibration of
    its own: it reuses the target's last full-attention layer. That changes
    how often drafts are accepted, never the output: the target model
    verifies every draft token against its own (compressed) cache.
    """
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise CalibrationError(f"cannot find a layer index in vLLM layer {layer_name!r}")
    index = int(match.group(1))
    is_draft = layer_name.startswith("mtp.") or ".mtp." in layer_name
    if is_draft or index >= num_model_layers:
        return max(calibrated_layers)
    if index not in calibrated_layers:
        raise CalibrationError(
            f"vLLM layer {layer_name!r} (model layer {index}) has no KVTC calibration; "
            f"calibrated layers: {calibrated_layers}"
        )
    return index


@lru_cache(maxsize=4)
def load_serving_calibration(path: str) -> Calibration:
    """One load per process and file (customize_spec and every layer ask)."""
    return load_calibration(path)
