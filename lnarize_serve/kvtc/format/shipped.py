"""The kvtc_calibration.pt shipped in the model repo: a safe loader and a
converter to our format.

The file is a torch.save of pickled dataclasses (``kvtc.common`` or
``src.common`` CalibrationData / PCAEntry). It is read with torch's
weights-only unpickler, which resolves only an allowlist of globals: tensors,
plain containers, and our two stand-in classes registered under the shipped
module paths. Any other global (os.system, builtins.eval, ...) is refused.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.calibration import Calibration, CalibrationError, RotaryInfo
from lnarize_serve.kvtc.format.codec import LayerCodec
from lnarize_serve.kvtc.format.fit import HeadStatistics, kind_codec, pca_from_covariance

SHIPPED_MODULES = ("kvtc.common", "src.common")


class ShippedCalibrationData:
    """Stand-in for kvtc.common.CalibrationData; fields arrive via pickle BUILD."""

    entries: dict
    head_group_size: int
    rope_theta: float
    sink_tokens: int
    window_tokens: int


class ShippedPCAEntry:
    """Stand-in for kvtc.common.PCAEntry (eigenvectors rows = components)."""

    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    mean: torch.Tensor
    head_indices: list
    kind: str
    bit_budget: int
    pca_mins: torch.Tensor
    pca_maxs: torch.Tensor
    bit_widths: torch.Tensor


def _allowlist() -> list[tuple[type, str]]:
    allowed = []
    for module in SHIPPED_MODULES:
        allowed.append((ShippedCalibrationData, f"{module}.CalibrationData"))
        allowed.append((ShippedPCAEntry, f"{module}.PCAEntry"))
    return allowed


@dataclass
class ShippedEntry:
    layer: int          # index over full-attention layers only (0..L-1)
    group: int
    kind: str           # "keys" | "values"
    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    mean: torch.Tensor
    head_indices: list[int]
    bit_budget: int


@dataclass
class ShippedCalibration:
    entries: dict[tuple[int, int, str], ShippedEntry]
    head_group_size: int
    rope_theta: float
    sink_tokens: int
    window_tokens: int

    @property
    def head_dim(self) -> int:
        return next(iter(self.entries.values())).mean.shape[0]

    @property
    def num_layers(self) -> int:
        return 1 + max(key[0] for key in self.entries)

    @property
    def num_kv_heads(self) -> int:
        heads = set()
        for entry in self.entries.values():
            heads.update(entry.head_indices)
        return len(heads)


def load_shipped(path: str | Path) -> ShippedCalibration:
    """Load kvtc_calibration.pt safely; refuse anything beyond the allowlist."""
    try:
        with torch.serialization.safe_globals(_allowlist()):
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CalibrationError(
            f"{path}: refused to unpickle: it needs objects outside the allowlist "
            f"(tensors, plain containers, {' / '.join(SHIPPED_MODULES)} CalibrationData and "
            f"PCAEntry). Loader said: {_reason(exc)}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CalibrationError(f"{path}: not a readable torch file ({exc})") from None
    if not isinstance(raw, ShippedCalibrationData):
        raise CalibrationError(f"{path}: top-level object is {type(raw).__name__}, "
                               "not CalibrationData")
    return _validate(raw, path)


def _reason(exc: Exception) -> str:
    """The informative line of torch's long weights-only error message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "GLOBAL" in line:
            return line.removeprefix("WeightsUnpickler error: ")
    return lines[-1] if lines else repr(exc)


def _validate(raw: ShippedCalibrationData, path: str | Path) -> ShippedCalibration:
    state = vars(raw)
    if not isinstance(state.get("entries"), dict) or not state["entries"]:
        raise CalibrationError(f"{path}: CalibrationData has no entries")
    entries = {}
    head_dim = None
    for key, entry in state["entries"].items():
        if not (isinstance(key, tuple) and len(key) == 3 and key[2] in ("keys", "values")):
            raise CalibrationError(f"{path}: bad entry key {key!r} (want (layer, group, kind))")
        if not isinstance(entry, ShippedPCAEntry):
            raise CalibrationError(f"{path}: entry {key} is {type(entry).__name__}, not PCAEntry")
        fields = vars(entry)
        try:
            vecs, vals, mean = fields["eigenvectors"], fields["eigenvalues"], fields["mean"]
            heads, budget = list(fields["head_indices"]), int(fields["bit_budget"])
        except KeyError as exc:
            raise CalibrationError(f"{path}: entry {key} lacks field {exc.args[0]}") from None
        d = mean.shape[0]
        head_dim = head_dim or d
        if d != head_dim or tuple(vecs.shape) != (d, d) or tuple(vals.shape) != (d,):
            raise CalibrationError(f"{path}: entry {key} has inconsistent shapes "
                                   f"{tuple(vecs.shape)}, {tuple(vals.shape)}, {tuple(mean.shape)}")
        entries[key] = ShippedEntry(int(key[0]), int(key[1]), key[2], vecs.float(), vals.float(),
                                    mean.float(), [int(h) for h in heads], budget)
    group = int(state.get("head_group_size", 1))
    if group != 1:
        raise CalibrationError(f"{path}: head_group_size {group} is not supported (only 1: "
                               "one basis per KV head, as the slot layout needs)")
    return ShippedCalibration(entries, group, float(state.get("rope_theta", 10000.0)),
                              int(state.get("sink_tokens", 4)), int(state.get("window_tokens", 128)))


# -- conversion ----------------------------------------------------------------

def neox_rotation_average(mean: torch.Tensor, second_moment: torch.Tensor, rope_theta: float,
                          positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of R(p) x over p in [0, positions), for x with the
    given mean and second moment E[x x^T], R the full-dim rotate-half RoPE.

    The shipped file models keys *before* its RoPE (full head dim, its own
    theta); the layout stores keys after RoPE, whose statistics are this
    position average.
    """
    d = mean.shape[0]
    half = d // 2
    inv_freq = rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / d)
    mean64, moment64 = mean.double(), second_moment.double()
    mean_acc = torch.zeros(d, dtype=torch.float64)
    moment_acc = torch.zeros(d, d, dtype=torch.float64)
    chunk = 256
    for start in range(0, positions, chunk):
        pos = torch.arange(start, min(positions, start + chunk), dtype=torch.float64)
        angle = pos[:, None] * inv_freq[None, :]
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(len(pos), d, d, dtype=torch.float64)
        idx = torch.arange(half)
        # (R x)_i = x_i cos - x_{i+h} sin ; (R x)_{i+h} = x_{i+h} cos + x_i sin
        rot[:, idx, idx] = cos
        rot[:, idx, idx + half] = -sin
        rot[:, idx + half, idx + half] = cos
        rot[:, idx + half, idx] = sin
        mean_acc += (rot @ mean64).sum(0)
        moment_acc += (rot @ moment64 @ rot.transpose(1, 2)).sum(0)
    mean_post = mean_acc / positions
    cov_post = moment_acc / positions - torch.outer(mean_post, mean_post)
    return mean_post.float(), cov_post.float()


def convert_shipped(shipped: ShippedCalibration, geometry: AttentionGeometry, model_id: str,
                    key_bits_per_dim: float | None = None, value_bits_per_dim: float | None = None,
                    positions: int = 4096) -> Calibration:
    """Shipped file -> our format.

    Values keep the shipped PCA. Keys: the shipped statistics are pre-RoPE in
    the fork's convention (full-dim rotate-half at the file's theta), so the
    post-RoPE statistics are their average over ``positions`` rotations, then
    re-diagonalised. Bits are re-allocated by DP under the budgets (default:
    each entry's own bit_budget) with a Gaussian error model, since the file
    carries no coefficient samples; steps are MSE-optimal for that model.
    """
    if shipped.head_dim != geometry.head_dim:
        raise CalibrationError(f"shipped head_dim {shipped.head_dim} != model's {geometry.head_dim}")
    if shipped.num_layers != len(geometry.full_attention_layers):
        raise CalibrationError(f"shipped file has {shipped.num_layers} layers, the model has "
                               f"{len(geometry.full_attention_layers)} full-attention layers")
    if shipped.num_kv_heads != geometry.num_kv_heads:
        raise CalibrationError(f"shipped file covers {shipped.num_kv_heads} KV heads, model has "
                               f"{geometry.num_kv_heads}")
    d = geometry.head_dim

    def budget_bytes(kind: str, bits_per_dim: float | None) -> int:
        if bits_per_dim is None:
            budgets = {e.bit_budget for e in shipped.entries.values() if e.kind == kind}
            bits = max(budgets)
        else:
            bits = bits_per_dim * d
        return 4 * int(math.ceil(bits / 32))

    key_bytes = budget_bytes("keys", key_bits_per_dim)
    value_bytes = budget_bytes("values", value_bits_per_dim)
    layers = {}
    for layer_idx, model_layer in enumerate(geometry.full_attention_layers):
        stats: dict[str, list[HeadStatistics]] = {"keys": [], "values": []}
        for kind in ("keys", "values"):
            for head in range(geometry.num_kv_heads):
                entry = shipped.entries.get((layer_idx, head, kind))
                if entry is None:
                    raise CalibrationError(f"shipped file lacks entry ({layer_idx}, {head}, {kind})")
                cov = entry.eigenvectors.T @ torch.diag(entry.eigenvalues) @ entry.eigenvectors
                if kind == "keys":
                    moment = cov + torch.outer(entry.mean, entry.mean)
                    mean, cov = neox_rotation_average(entry.mean, moment, shipped.rope_theta,
                                                      positions)
                    stats[kind].append(pca_from_covariance(mean, cov))
                else:
                    stats[kind].append(HeadStatistics(entry.mean, entry.eigenvectors,
                                                      entry.eigenvalues.clamp_min(0)))
        layers[model_layer] = LayerCodec(kind_codec(stats["keys"], key_bytes),
                                         kind_codec(stats["values"], value_bytes))
    return Calibration(
        model_id=model_id, head_dim=d, num_kv_heads=geometry.num_kv_heads,
        num_model_layers=geometry.num_layers, layers=layers,
        rotary=RotaryInfo(geometry.rotary_dim, geometry.rope_theta),
        sink_tokens=shipped.sink_tokens, window_tokens=shipped.window_tokens,
        source={"converted_from": "kvtc_calibration.pt", "shipped_rope_theta": shipped.rope_theta,
                "rope_average_positions": positions, "error_model": "gaussian"})


def describe_shipped(shipped: ShippedCalibration) -> dict[str, Any]:
    budgets: dict[str, set[int]] = {"keys": set(), "values": set()}
    for entry in shipped.entries.values():
        budgets[entry.kind].add(entry.bit_budget)
    return {"entries": len(shipped.entries), "layers": shipped.num_layers,
            "kv_heads": shipped.num_kv_heads, "head_dim": shipped.head_dim,
            "head_group_size": shipped.head_group_size, "rope_theta": shipped.rope_theta,
            "sink_tokens": shipped.sink_tokens, "window_tokens": shipped.window_tokens,
            "bit_budgets": {k: sorted(v) for k, v in budgets.items()}}


def convert_shipped_file(path: str | Path, geometry: AttentionGeometry, model_id: str,
                         out: str | Path) -> Path:
    """Convert a shipped file to our format at ``out`` (written atomically)."""
    calibration = convert_shipped(load_shipped(path), geometry, model_id)
    out = Path(out)
    partial = out.with_suffix(".partial")
    calibration.save(partial)
    partial.replace(out)
    return out
