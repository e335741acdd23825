"""Fit a KVTC calibration for a transformers model over an offline corpus.

PCA per (full-attention layer, KV head, keys/values) on post-RoPE vectors,
bits per component by DP over measured quantization error on held samples,
MSE-optimal steps. Key errors are weighted by the GQA group's query energy
along each component (score error is q . (k - k')), value errors by the
output projection's gain along it (what the layer adds to the residual).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.calibration import Calibration, RotaryInfo
from lnarize_serve.kvtc.format.codec import KindCodec, LayerCodec
from lnarize_serve.kvtc_tools.collect import LayerMoments, PositionSpread, collect_statistics
from lnarize_serve.kvtc_tools.corpus import token_sequences
from lnarize_serve.kvtc.format.fit import (HeadTables, bytes_for, codec_from_tables, measure_head,
                                           pca_from_covariance)
from lnarize_serve.kvtc_tools.hf_hooks import attention_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOptions:
    key_bits_per_dim: float = 3.0    # K3V3: 48-byte slots at head_dim 64, the better split
    value_bits_per_dim: float = 3.0  # measured (docs/kvtc-eval.md)
    num_sequences: int = 24
    sequence_length: int = 512
    sink_tokens: int = 4          # leading tokens left out of the statistics (sink-like)
    window_tokens: int = 0
    max_samples: int = 2048       # per layer, for measured quantizer errors
    query_weighted_keys: bool = True
    output_weighted_values: bool = True
    batch_size: int = 4
    # spread key statistics over positions [0, rope_positions) (0: the model's
    # max_position_embeddings); None turns it off (statistics at seen positions)
    rope_positions: int | None = 0


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def _value_weights(module: Any, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[H, d, d]: sum over the group's query heads of W_o_slice^T W_o_slice."""
    weight = module.o_proj.weight.detach().to(torch.float64).cpu()  # [hidden, Hq * d]
    num_q_heads = weight.shape[1] // head_dim
    group = num_q_heads // num_kv_heads
    slices = weight.view(weight.shape[0], num_q_heads, head_dim)
    per_q = torch.einsum("oqd,oqe->qde", slices, slices)
    return per_q.view(num_kv_heads, group, head_dim, head_dim).sum(1)


def measure_layer(stats: LayerMoments, value_metric: torch.Tensor | None,
                  options: FitOptions) -> dict[str, list[HeadTables]]:
    """PCA and quantizer tables of every head of one layer (budget-free)."""
    tables: dict[str, list[HeadTables]] = {}
    for kind in ("keys", "values"):
        means, covs = stats.mean(kind), stats.covariance(kind)
        samples = stats.sample_matrix(kind)  # [M, H, d]
        if samples.shape[0] > options.max_samples:
            idx = torch.linspace(0, samples.shape[0] - 1, options.max_samples).long()
            samples = samples[idx]
        tables[kind] = []
        for h in range(stats.num_kv_heads):
            pca = pca_from_covariance(means[h], covs[h])
            coeffs = ((samples[:, h] - pca.mean) @ pca.components.T).T.contiguous()  # [d, M]
            metric = None
            if kind == "keys" and options.query_weighted_keys and stats.query_moment is not None:
                metric = stats.query_moment[h]
            elif kind == "values" and options.output_weighted_values and value_metric is not None:
                metric = value_metric[h]
            weights = None
            if metric is not None:
                comps = pca.components.double()
                weights = torch.einsum("jd,de,je->j", comps, metric.double(), comps)
                weights = (weights / weights.mean()).float().clamp_min(1e-6)
            tables[kind].append(measure_head(pca, weights, coeffs))
    return tables


@dataclass
class Measurements:
    """Budget-free result of collection + measurement, for one model."""

    geometry: AttentionGeometry
    tables: dict[int, dict[str, list[HeadTables]]]  # layer -> kind -> per head
    source: dict[str, Any]
    sink_keys: dict[int, torch.Tensor]
    sink_values: dict[int, torch.Tensor]
    sink_token_id: int | None


def measure_model(model: Any, tokenizer: Any, options: FitOptions,
                  sequences: list[list[int]] | None = None) -> Measurements:
    geometry = AttentionGeometry.from_config(model.config)
    if sequences is None:
        sequences = list(token_sequences(tokenizer, "calibration", options.sequence_length,
                                         options.num_sequences))
    if not sequences:
        raise RuntimeError("the calibration corpus produced no sequences")
    total = len(sequences) * (len(sequences[0]) - options.sink_tokens)
    stride = max(1, total // options.max_samples)
    started = time.monotonic()
    spread = position_spread(model, options.rope_positions)
    stats = collect_statistics(model, sequences, skip_tokens=options.sink_tokens,
                               sample_stride=stride, batch_size=options.batch_size, spread=spread)
    collected = time.monotonic() - started
    modules = dict(attention_layers(model))
    tables = {}
    for index in sorted(stats):
        value_metric = None
        if options.output_weighted_values and index in modules:
            value_metric = _value_weights(modules[index], geometry.num_kv_heads, geometry.head_dim)
        tables[index] = measure_layer(stats[index], value_metric, options)
    logger.info("collected %d tokens in %.1fs, measured in %.1fs", total, collected,
                time.monotonic() - started - collected)
    source = {"fitter": "lnarize_serve.kvtc_tools.calibrate", "corpus": "python-stdlib/calibration",
              "num_sequences": len(sequences), "sequence_length": len(sequences[0]),
              "tokens": total, "skipped_leading_tokens": options.sink_tokens,
              "rope_positions": spread.positions if spread else None,
              "query_weighted_keys": options.query_weighted_keys,
              "output_weighted_values": options.output_weighted_values,
              "device": str(next(model.parameters()).device)}
    sink_keys, sink_values, sink_token = _sink_constants(stats, sequences)
    return Measurements(geometry, tables, source, sink_keys, sink_values, sink_token)


def position_spread(model: Any, positions: int | None) -> PositionSpread | None:
    """The model's own RoPE frequencies (rotary module's inv_freq, so scaled
    and partial rotary variants come out right)."""
    if positions is None:
        return None
    inv_freq = None
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            inv_freq = module.inv_freq.detach().float().cpu()
            break
    if inv_freq is None:
        raise RuntimeError("no rotary embedding (inv_freq) found; pass rope_positions=None")
    if positions == 0:
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    return PositionSpread(inv_freq, positions)


def _sink_constants(stats: dict[int, LayerMoments], sequences: list[list[int]]):
    """Position 0 sees only itself (causal), so its K/V are a function of the
    first token alone: constants of the model when every sequence starts with
    the same token (BOS / the chat template's first token). Recorded then."""
    first_tokens = {sequence[0] for sequence in sequences}
    if len(first_tokens) != 1:
        return {}, {}, None
    keys, values = {}, {}
    for index, layer in stats.items():
        k, v = torch.stack(layer.first_keys), torch.stack(layer.first_values)
        # identical up to float noise across sequences; keep the mean
        keys[index], values[index] = k.mean(0), v.mean(0)
    return keys, values, first_tokens.pop()


def calibration_at_budget(measurements: Measurements, model_id: str, key_bits_per_dim: float,
                          value_bits_per_dim: float, options: FitOptions,
                          use_weights: bool = True) -> Calibration:
    geometry = measurements.geometry
    key_bytes = bytes_for(key_bits_per_dim, geometry.head_dim)
    value_bytes = bytes_for(value_bits_per_dim, geometry.head_dim)
    layers = {}
    for index, per_kind in measurements.tables.items():
        parts = {kind: KindCodec.from_heads(
                     [codec_from_tables(t, 8 * num_bytes, use_weights) for t in per_kind[kind]],
                     num_bytes)
                 for kind, num_bytes in (("keys", key_bytes), ("values", value_bytes))}
        layers[index] = LayerCodec(parts["keys"], parts["values"])
    source = dict(measurements.source, key_bits_per_dim=key_bits_per_dim,
                  value_bits_per_dim=value_bits_per_dim)
    if not use_weights:
        source.update(query_weighted_keys=False, output_weighted_values=False)
    return Calibration(
        model_id=model_id, head_dim=geometry.head_dim, num_kv_heads=geometry.num_kv_heads,
        num_model_layers=geometry.num_layers, layers=layers,
        rotary=RotaryInfo(geometry.rotary_dim, geometry.rope_theta),
        sink_tokens=1 if measurements.sink_keys else 0, window_tokens=options.window_tokens,
        source=source, sink_keys=measurements.sink_keys, sink_values=measurements.sink_values,
        sink_token_id=measurements.sink_token_id)


def fit_calibration(model: Any, tokenizer: Any, model_id: str, options: FitOptions,
                    sequences: list[list[int]] | None = None) -> Calibration:
    measurements = measure_model(model, tokenizer, options, sequences)
    return calibration_at_budget(measurements, model_id, options.key_bits_per_dim,
                                 options.value_bits_per_dim, options)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
