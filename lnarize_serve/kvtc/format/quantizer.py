"""Scalar quantizer design for KVTC coefficients.

Two pieces: an MSE-optimal uniform quantizer per component (step and zero
point searched on measured samples, not min/max ranges, which waste levels on
outliers at 1-3 bits), and a dynamic-programming bit allocation that spends a
fixed bit budget where it removes the most (weighted) measured error.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 8


def quantize_codes(coeffs: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: torch.Tensor) -> torch.Tensor:
    """Codes per the layout: clamp(floor(c / scale + zero + 0.5), 0, 2^bits - 1).

    floor(x + 0.5) (not torch.round, which rounds half to even) so that the
    Triton kernels can reproduce it bit for bit. Components with 0 bits
    (padding) get code 0 whatever their scale.
    """
    active = bits > 0
    safe_scale = torch.where(active, scale, torch.ones_like(scale))
    levels = (torch.ones_like(bits) << bits) - 1
    codes = torch.floor(coeffs / safe_scale + zero + 0.5)
    codes = torch.minimum(torch.clamp(codes, min=0.0), levels.to(codes.dtype))
    return torch.where(active, codes, torch.zeros_like(codes)).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     bits: torch.Tensor) -> torch.Tensor:
    """c' = (code - zero) * scale; exactly 0 for padding components."""
    values = (codes.to(scale.dtype) - zero) * scale
    return torch.where(bits > 0, values, torch.zeros_like(values))


def fit_uniform_quantizer(samples: torch.Tensor, bits: int, grid_points: int = 16,
                          iterations: int = 8
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE-optimal uniform step for each row of ``samples`` [C, M].

    The reconstruction grid is centred on each component's sample mean
    (zero point (2^b - 1)/2 shifted by mean/step). A coarse grid over the step
    (in units of the component's std) picks a start; alternating optimisation
    then refines it: codes by nearest level for the current step, then the
    least-squares step for those codes (both halves lower the MSE, as in
    Lloyd's algorithm restricted to uniform grids). Returns (scale [C],
    zero [C], mse [C]), mse measured with the layout's exact rounding.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    samples = samples.to(torch.float32)
    centre = samples.mean(dim=1, keepdim=True)
    centred = samples - centre
    std = centred.pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
    levels = 2 ** bits
    half = (levels - 1) / 2.0
    # coarse start: ~4 std across the levels is near-optimal for light tails;
    # wider for heavy tails at low bits, narrower (~2.5 std) at high bits
    best_step = std * (4.0 / levels)
    best_mse = torch.full_like(std, float("inf"))

    def try_steps(candidates: torch.Tensor) -> None:
        nonlocal best_step, best_mse
        for step in candidates:
            mse = _centred_mse(centred, step, half)
            better = mse < best_mse
            best_mse = torch.where(better, mse, best_mse)
            best_step = torch.where(better, step, best_step)

    try_steps(std[None, :] * (torch.exp(torch.linspace(-1.5, 1.0, grid_points))
                              * (4.0 / levels))[:, None])
    step = best_step
    for _ in range(iterations):
        offsets = _levels(centred, step, half)  # (code - half), [C, M]
        denom = offsets.pow(2).sum(dim=1)
        update = (centred * offsets).sum(dim=1) / denom.clamp_min(1e-30)
        step = torch.where(denom > 0, update.clamp_min(1e-12), step)
        try_steps(step[None, :])
    # the MSE is piecewise smooth in the step: polish with a fine local grid
    try_steps(best_step[None, :] * torch.linspace(0.85, 1.15, grid_points)[:, None])
    zero = half - centre.squeeze(1) / best_step
    return best_step, zero, best_mse


def _levels(centred: torch.Tensor, step: torch.Tensor, half: float) -> torch.Tensor:
    codes = torch.floor(centred / step[:, None] + half + 0.5).clamp_(0, 2 * half)
    return codes - half


def _centred_mse(centred: torch.Tensor, step: torch.Tensor, half: float) -> torch.Tensor:
    recon = _levels(centred, step, half) * step[:, None]
    return (recon - centred).pow_(2).mean(dim=1)


def quantizer_tables(samples: torch.Tensor, max_bits: int = MAX_BITS
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit every width 1..max_bits for each component of ``samples`` [C, M].

    Returns (mse [C, max_bits + 1], scale [C, max_bits + 1],
    zero [C, max_bits + 1]); column 0 is "component dropped", whose error is
    the mean square of the coefficient (it reconstructs as the mean, i.e. 0).
    """
    samples = samples.to(torch.float32)
    num_components = samples.shape[0]
    mse = torch.empty(num_components, max_bits + 1)
    scale = torch.zeros(num_components, max_bits + 1)
    zero = torch.zeros(num_components, max_bits + 1)
    mse[:, 0] = samples.pow(2).mean(dim=1)
    for b in range(1, max_bits + 1):
        scale[:, b], zero[:, b], mse[:, b] = fit_uniform_quantizer(samples, b)
    return mse, scale, zero


def allocate_bits(error_table: torch.Tensor, budget_bits: int) -> torch.Tensor:
    """Choose bits per component minimising total error under a bit budget.

    ``error_table`` [C, W+1]: error of component c at width w (0..W), already
    weighted by how much that component matters. Exact dynamic programming
    over (component, bits used so far); returns bits [C] int64 whose sum is
    <= budget_bits.
    """
    errors = error_table.to(torch.float64)
    num_components, num_widths = errors.shape
    inf = float("inf")
    # cost[u] = best total error of the components seen so far using exactly u bits
    cost = torch.full((budget_bits + 1,), inf, dtype=torch.float64)
    cost[0] = 0.0
    choices = torch.zeros(num_components, budget_bits + 1, dtype=torch.int64)
    for c in range(num_components):
        candidates = torch.full((num_widths, budget_bits + 1), inf, dtype=torch.float64)
        for w in range(num_widths):
            if w > budget_bits:
                break
            candidates[w, w:] = cost[: budget_bits + 1 - w] + errors[c, w]
        cost, choices[c] = candidates.min(dim=0)
    used = int(torch.argmin(cost))
    bits = torch.zeros(num_components, dtype=torch.int64)
    for c in range(num_components - 1, -1, -1):
        w = int(choices[c, used])
        bits[c] = w
        used -= w
    return bits


def gaussian_unit_samples(count: int = 8192) -> torch.Tensor:
    """Deterministic standard-normal quantile points, for fitting without data."""
    probs = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return (math.sqrt(2.0) * torch.special.erfinv(2.0 * probs - 1.0)).to(torch.float32)
