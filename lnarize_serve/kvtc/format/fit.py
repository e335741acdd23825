"""Turn second-order statistics (and, when available, measured coefficient
samples) into a KindCodec: PCA basis, DP bit allocation, MSE-optimal steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from lnarize_serve.kvtc.format.bitpack import word_packed_offsets
from lnarize_serve.kvtc.format.codec import HeadCodec, KindCodec, LayerCodec
from lnarize_serve.kvtc.format.quantizer import (MAX_BITS, allocate_bits, gaussian_unit_samples,
                                                 quantizer_tables)


@dataclass(frozen=True)
class HeadStatistics:
    """PCA of one (layer, KV head, kind): components as rows, descending variance."""

    mean: torch.Tensor         # [d]
    components: torch.Tensor   # [d, d]
    variances: torch.Tensor    # [d]


def pca_from_covariance(mean: torch.Tensor, covariance: torch.Tensor) -> HeadStatistics:
    cov = 0.5 * (covariance + covariance.T).to(torch.float64)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)
    return HeadStatistics(mean.to(torch.float32), eigvecs[:, order].T.contiguous().float(),
                          eigvals[order].clamp_min(0).float())


@lru_cache(maxsize=1)
def _unit_gaussian_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantizer_tables(gaussian_unit_samples().unsqueeze(0))


def gaussian_quantizer_tables(variances: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizer tables for zero-mean Gaussian components of the given variances."""
    mse, scale, zero = _unit_gaussian_tables()
    std = variances.clamp_min(1e-20).sqrt()[:, None]
    scaled_zero = zero.expand(variances.shape[0], -1).clone()  # centred: zero is scale-free
    return mse * variances[:, None], scale * std, scaled_zero


@dataclass(frozen=True)
class HeadTables:
    """Everything the bit allocation needs for one head: its PCA and, for every
    component and width 0..8, the (weighted) error, step and zero point.
    Independent of the budget, so several budgets share one measurement."""

    stats: HeadStatistics
    error: torch.Tensor           # [d, 9] measured MSE of each coefficient
    scale: torch.Tensor           # [d, 9]
    zero: torch.Tensor            # [d, 9]
    weights: torch.Tensor | None  # [d] downstream importance of each component

    def weighted_error(self, use_weights: bool = True) -> torch.Tensor:
        if self.weights is None or not use_weights:
            return self.error
        return self.error * self.weights.to(self.error.dtype)[:, None]


def measure_head(stats: HeadStatistics, weights: torch.Tensor | None = None,
                 coeff_samples: torch.Tensor | None = None) -> HeadTables:
    """``coeff_samples`` [d, M] are measured PCA coefficients (exact empirical
    errors); without them a Gaussian model of each component is used.
    ``weights`` [d] scale each component's error by how much it matters
    downstream (query energy for keys, output-projection gain for values)."""
    if coeff_samples is not None:
        mse, scale, zero = quantizer_tables(coeff_samples)
    else:
        mse, scale, zero = gaussian_quantizer_tables(stats.variances)
    return HeadTables(stats, mse, scale, zero, weights)


def codec_from_tables(tables: HeadTables, budget_bits: int, use_weights: bool = True) -> HeadCodec:
    """DP bit allocation under ``budget_bits``, then word-packed offsets."""
    weighted = tables.weighted_error(use_weights)
    bits = allocate_bits(weighted, budget_bits)
    keep, offsets = _word_pack(bits, weighted, budget_bits // 8)
    rows = torch.arange(len(bits))
    chosen_scale = tables.scale[rows, bits][keep]
    chosen_zero = tables.zero[rows, bits][keep]
    stats = tables.stats
    return HeadCodec(mean=stats.mean.clone(), basis=stats.components[keep].clone(),
                     bits=bits[keep].to(torch.int32), scale=chosen_scale.float(),
                     zero=chosen_zero.float(), offset=torch.tensor(offsets, dtype=torch.int32))


def head_codec(stats: HeadStatistics, budget_bits: int, weights: torch.Tensor | None = None,
               coeff_samples: torch.Tensor | None = None) -> HeadCodec:
    """Allocate ``budget_bits`` over the components and fit their quantizers."""
    return codec_from_tables(measure_head(stats, weights, coeff_samples), budget_bits)


def _word_pack(bits: torch.Tensor, weighted: torch.Tensor, num_bytes: int
               ) -> tuple[torch.Tensor, list[int]]:
    """Order kept components by width (widest first, stable) and word-pack them.

    If the widths do not pack (layout v2: no code straddles a 32-bit word),
    take one bit from the component whose loss costs the least weighted error,
    and retry. Mutates ``bits``; returns (kept component indices, offsets).
    """
    while True:
        kept = [int(i) for i in torch.nonzero(bits > 0).flatten()]
        kept.sort(key=lambda i: -int(bits[i]))
        offsets = word_packed_offsets([int(bits[i]) for i in kept], num_bytes)
        if offsets is not None:
            return torch.tensor(kept, dtype=torch.int64), offsets
        costs = [float(weighted[i, bits[i] - 1] - weighted[i, bits[i]]) for i in kept]
        bits[kept[min(range(len(kept)), key=costs.__getitem__)]] -= 1


def kind_codec(stats: list[HeadStatistics], num_bytes: int, **per_head) -> KindCodec:
    """A KindCodec using all ``8 * num_bytes`` bits of every head.

    ``per_head`` maps argument names of :func:`head_codec` (weights,
    coeff_samples) to lists with one entry per head.
    """
    heads = []
    for h, head_stats in enumerate(stats):
        kwargs = {name: values[h] for name, values in per_head.items() if values is not None}
        heads.append(head_codec(head_stats, 8 * num_bytes, **kwargs))
    return KindCodec.from_heads(heads, num_bytes)


def bytes_for(bits_per_dim: float, head_dim: int) -> int:
    """Bytes of one slot part: rounded up to whole 32-bit words (layout v2)."""
    return 4 * int(math.ceil(bits_per_dim * head_dim / 32))


def random_statistics(head_dim: int, generator: torch.Generator, decay: float = 8.0,
                      mean_scale: float = 0.5) -> HeadStatistics:
    """Valid random PCA statistics: a random orthonormal basis and a spectrum
    decaying like exp(-i / (head_dim / decay)), as real keys/values do."""
    gauss = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)
    variances = torch.exp(-torch.arange(head_dim, dtype=torch.float64) * decay / head_dim)
    mean = mean_scale * torch.randn(head_dim, generator=generator, dtype=torch.float64)
    return HeadStatistics(mean.float(), q.T.contiguous().float(), variances.float())


def random_layer_codec(num_kv_heads: int, head_dim: int, key_bits_per_dim: float = 2.0,
                       value_bits_per_dim: float = 4.0, seed: int = 0
                       ) -> tuple[LayerCodec, dict[str, list[HeadStatistics]]]:
    """A LayerCodec fitted to random but valid statistics, plus those statistics
    (draw matching data with :func:`sample_from_statistics`). For tests and
    kernel work before a real calibration exists."""
    generator = torch.Generator().manual_seed(seed)
    stats = {kind: [random_statistics(head_dim, generator) for _ in range(num_kv_heads)]
             for kind in ("keys", "values")}
    keys = kind_codec(stats["keys"], bytes_for(key_bits_per_dim, head_dim))
    values = kind_codec(stats["values"], bytes_for(value_bits_per_dim, head_dim))
    return LayerCodec(keys, values), stats


def sample_from_statistics(stats: list[HeadStatistics], num_tokens: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian vectors [N, H, d] with the given per-head mean and covariance."""
    out = []
    for head in stats:
        white = torch.randn(num_tokens, head.variances.shape[0], generator=generator)
        out.append(head.mean + (white * head.variances.sqrt()) @ head.components)
    return torch.stack(out, dim=1)


__all__ = ["HeadStatistics", "pca_from_covariance", "head_codec", "kind_codec",
           "random_layer_codec", "sample_from_statistics", "random_statistics", "bytes_for",
           "gaussian_quantizer_tables", "MAX_BITS"]
