"""KV-cache quantizers KVTC is compared with, as round-trip transforms.

Each method maps post-RoPE keys and values [B, H, T, d] to what a cache of
that kind would give back, and states its bytes per token per KV head (K+V,
metadata included). These mirror vLLM's cache modes: bf16, fp8 e4m3 (scale
1), int4 per token-head (asymmetric, fp16 scale and zero), and a
TurboQuant-like quantizer (random-sign Hadamard rotation, per-token fp16 norm,
Lloyd-Max Gaussian codebook per coordinate, no residual correction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from lnarize_serve.kvtc.format.calibration import Calibration
from lnarize_serve.kvtc.format.codec import roundtrip_kv
from lnarize_serve.kvtc.format.quantizer import gaussian_unit_samples

Transform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVMethod:
    name: str
    bytes_per_token_head: float
    transform: Transform  # (layer index, keys, values) -> (keys', values')


def bf16_method(head_dim: int) -> KVMethod:
    def transform(layer, k, v):
        return k.to(torch.bfloat16).to(k.dtype), v.to(torch.bfloat16).to(v.dtype)
    return KVMethod("bf16", 4 * head_dim, transform)


def fp8_method(head_dim: int) -> KVMethod:
    def transform(layer, k, v):
        return (k.to(torch.float8_e4m3fn).to(k.dtype), v.to(torch.float8_e4m3fn).to(v.dtype))
    return KVMethod("fp8 e4m3", 2 * head_dim, transform)


def _int_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    low = x.amin(dim=-1, keepdim=True)
    high = x.amax(dim=-1, keepdim=True)
    scale = ((high - low) / levels).to(torch.float16).to(x.dtype).clamp_min(1e-8)
    low = low.to(torch.float16).to(x.dtype)
    codes = torch.clamp(torch.round((x - low) / scale), 0, levels)
    return codes * scale + low


def int_per_token_head_method(head_dim: int, bits: int = 4) -> KVMethod:
    def transform(layer, k, v):
        return _int_per_token(k, bits), _int_per_token(v, bits)
    return KVMethod(f"int{bits} per-token-head", 2 * (head_dim * bits / 8 + 4), transform)


def _hadamard(n: int) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@lru_cache(maxsize=8)
def lloyd_max_gaussian(bits: int, iterations: int = 200) -> torch.Tensor:
    """Lloyd-Max reconstruction levels for a unit Gaussian (2^bits, sorted)."""
    samples = gaussian_unit_samples(1 << 16).double()
    levels = torch.quantile(samples, (torch.arange(2 ** bits, dtype=torch.float64) + 0.5)
                            / 2 ** bits)
    for _ in range(iterations):
        edges = (levels[1:] + levels[:-1]) / 2
        cell = torch.bucketize(samples, edges)
        sums = torch.zeros_like(levels).index_add_(0, cell, samples)
        counts = torch.zeros_like(levels).index_add_(0, cell, torch.ones_like(samples))
        levels = sums / counts.clamp_min(1)
    return levels.float()


def turboquant_like_method(head_dim: int, bits: int, seed: int = 0) -> KVMethod:
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=generator).float() * 2 - 1
    rotation = _hadamard(head_dim) * signs[None, :]  # y = R x, R orthonormal
    levels = lloyd_max_gaussian(bits)
    edges = (levels[1:] + levels[:-1]) / 2

    def quantize(x):
        rot = rotation.to(x.device, x.dtype)
        norm = x.norm(dim=-1, keepdim=True).to(torch.float16).to(x.dtype).clamp_min(1e-8)
        y = (x / norm) @ rot.T * math.sqrt(head_dim)
        q = levels.to(x.device, x.dtype)[torch.bucketize(y, edges.to(x.device, x.dtype))]
        return (q / math.sqrt(head_dim)) @ rot * norm

    def transform(layer, k, v):
        return quantize(k), quantize(v)
    return KVMethod(f"TurboQuant-like {bits}-bit", 2 * (head_dim * bits / 8 + 2), transform)


def kvtc_method(calibration: Calibration, name: str | None = None) -> KVMethod:
    layers = calibration.layers

    def transform(layer, k, v):
        codec = layers[layer]
        batch, heads, length, dim = k.shape
        flat_k = k.permute(0, 2, 1, 3).reshape(-1, heads, dim)
        flat_v = v.permute(0, 2, 1, 3).reshape(-1, heads, dim)
        k_hat, v_hat = roundtrip_kv(flat_k, flat_v, codec.to(k.device))
        shape = (batch, length, heads, dim)
        return (k_hat.view(shape).permute(0, 2, 1, 3).to(k.dtype),
                v_hat.view(shape).permute(0, 2, 1, 3).to(v.dtype))
    label = name or f"KVTC {calibration.key_bytes}+{calibration.value_bytes}B"
    return KVMethod(label, calibration.slot_bytes, transform)


def baseline_methods(head_dim: int) -> list[KVMethod]:
    return [bf16_method(head_dim), fp8_method(head_dim), int_per_token_head_method(head_dim, 4),
            turboquant_like_method(head_dim, 4), turboquant_like_method(head_dim, 3)]
