"""Collect post-RoPE key, value and query statistics from a transformers model.

Per full-attention layer: first and second moments of keys and values per KV
head (all tokens, float64), a strided subsample of the vectors themselves (to
measure real quantization error per component), and the second moment of the
queries of each KV head's GQA group (only key error along query directions
changes attention scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lnarize_serve.kvtc_tools.hf_hooks import attention_override, sdpa


@dataclass
class LayerMoments:
    num_kv_heads: int
    head_dim: int
    count: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)      # kind -> [H, d]
    moments: dict[str, torch.Tensor] = field(default_factory=dict)   # kind -> [H, d, d]
    samples: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # kind -> [n, H, d]
    query_moment: torch.Tensor | None = None  # [H, d, d], summed over the group's query heads
    query_count: int = 0
    # K/V at position 0 of every sequence seen ([H, d] each): the attention sink
    first_keys: list[torch.Tensor] = field(default_factory=list)
    first_values: list[torch.Tensor] = field(default_factory=list)

    def add(self, kind: str, vectors: torch.Tensor, sample_stride: int) -> None:
        """vectors [n, H, d]"""
        x = vectors.to(torch.float64)
        if kind not in self.sums:
            self.sums[kind] = torch.zeros(self.num_kv_heads, self.head_dim, dtype=torch.float64)
            self.moments[kind] = torch.zeros(self.num_kv_heads, self.head_dim, self.head_dim,
                                             dtype=torch.float64)
            self.samples[kind] = []
        self.sums[kind] += x.sum(0)
        self.moments[kind] += torch.einsum("nhd,nhe->hde", x, x)
        self.samples[kind].append(vectors[::sample_stride].to(torch.float32).cpu())

    def mean(self, kind: str) -> torch.Tensor:
        return (self.sums[kind] / self.count).float()

    def covariance(self, kind: str) -> torch.Tensor:
        mean = self.sums[kind] / self.count
        return (self.moments[kind] / self.count - torch.einsum("hd,he->hde", mean, mean)).float()

    def sample_matrix(self, kind: str) -> torch.Tensor:
        return torch.cat(self.samples[kind])


@dataclass(frozen=True)
class PositionSpread:
    """Re-rotate post-RoPE keys/queries to uniformly random positions in
    [0, positions) before accumulating statistics.

    Post-RoPE keys depend on position: a basis fitted on short calibration
    sequences does not cover the angles reached further out (measured: key
    error doubles past the calibration length). Rotating each vector by
    (random position - its position) gives the statistics of keys spread over
    the whole served range, from short sequences. Only the first
    ``inv_freq.numel() * 2`` dims rotate (partial rotary: Qwen3.5/3.6).
    """

    inv_freq: torch.Tensor   # [rotary_dim / 2]
    positions: int
    seed: int = 0

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x [B, H, T, d] at positions 0..T-1 -> rotated to random positions."""
        batch, _, length, _ = x.shape
        half = self.inv_freq.numel()
        target = torch.randint(0, self.positions, (batch, length), generator=generator)
        delta = (target - torch.arange(length)[None, :]).to(torch.float64)
        angle = delta[..., None] * self.inv_freq.double().cpu()[None, None, :]  # [B, T, half]
        cos = torch.cos(angle).to(x.dtype).to(x.device)[:, None]
        sin = torch.sin(angle).to(x.dtype).to(x.device)[:, None]
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class KVCollector:
    """Attention hook that records statistics and then runs ordinary SDPA.

    ``skip_tokens`` leading positions of every sequence are left out of the
    statistics: they are attention sinks with atypical keys/values (position
    0 is kept exact by the cache; see docs/kvtc-layout.md).
    """

    def __init__(self, skip_tokens: int = 0, sample_stride: int = 1,
                 spread: PositionSpread | None = None):
        self.skip_tokens = skip_tokens
        self.sample_stride = sample_stride
        self.spread = spread
        self.generator = torch.Generator().manual_seed(spread.seed if spread else 0)
        self.layers: dict[int, LayerMoments] = {}

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any):
        originals = (query, key, value)
        layer = int(module.layer_idx)
        batch, num_kv_heads, length, head_dim = key.shape
        num_q_heads = query.shape[1]
        group = num_q_heads // num_kv_heads
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerMoments(num_kv_heads, head_dim)
        for b in range(batch):
            stats.first_keys.append(key[b, :, 0].detach().float().cpu())
            stats.first_values.append(value[b, :, 0].detach().float().cpu())
        keep = slice(self.skip_tokens, None)
        if self.spread is not None:
            key = self.spread.apply(key.detach().float(), self.generator)
            query = self.spread.apply(query.detach().float(), self.generator)
        for kind, tensor in (("keys", key), ("values", value)):
            vectors = tensor[:, :, keep].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)
            stats.add(kind, vectors.detach(), self.sample_stride)
        q = query[:, :, keep].detach().to(torch.float64)
        q = q.reshape(batch, num_kv_heads, group, -1, head_dim)
        moment = torch.einsum("bhgtd,bhgte->hde", q, q)
        stats.query_moment = moment if stats.query_moment is None else stats.query_moment + moment
        stats.count += batch * max(0, length - self.skip_tokens)
        stats.query_count += batch * max(0, length - self.skip_tokens)
        return sdpa(module, *originals, attention_mask, **kwargs)


@torch.no_grad()
def collect_statistics(model: Any, sequences: list[list[int]], skip_tokens: int,
                       sample_stride: int, batch_size: int = 1,
                       spread: PositionSpread | None = None) -> dict[int, LayerMoments]:
    """Run ``model`` over token sequences (equal lengths within a batch)."""
    collector = KVCollector(skip_tokens=skip_tokens, sample_stride=sample_stride, spread=spread)
    device = next(model.parameters()).device
    with attention_override(model, collector):
        for start in range(0, len(sequences), batch_size):
            batch = torch.tensor(sequences[start:start + batch_size], device=device)
            model(input_ids=batch, use_cache=False)
    if not collector.layers:
        raise RuntimeError("no attention layer went through the collector; "
                           "is this a transformers model with standard attention?")
    return collector.layers
