"""Bit packing of KVTC codes into fixed-size byte strings (docs/kvtc-layout.md).

Component j of head h occupies bits [offset[h, j], offset[h, j] + bits[h, j])
of a little-endian bit stream; bit p lives in bit p % 8 of byte p // 8.
Offsets are calibration data: any non-overlapping offsets pack and unpack
here; calibrations written by this package use word packing (no code
straddles a 32-bit word, see :func:`word_packed_offsets`). Everything is
vectorised through per-head (position -> component, bit-within-code) index
tables, so one call packs all tokens and heads of a layer.
"""

from __future__ import annotations

import torch


def bit_offsets(bits: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of ``bits`` [..., R] along the last dim (int32)."""
    bits = bits.to(torch.int64)
    return (torch.cumsum(bits, dim=-1) - bits).to(torch.int32)


def word_packed_offsets(bits: list[int], num_bytes: int) -> list[int] | None:
    """Offsets per the layout's word packing, or None if the widths do not fit.

    ``num_bytes`` must be a multiple of 4 (NW = num_bytes / 4 words). Components
    are taken in order; each goes to the word with the most free bits (ties:
    lowest index) at that word's fill position, so no code straddles a word.
    """
    if num_bytes % 4:
        raise ValueError(f"word packing needs a multiple of 4 bytes, got {num_bytes}")
    used = [0] * (num_bytes // 4)
    offsets = []
    for width in bits:
        word = min(range(len(used)), key=lambda w: (used[w], w))
        if used[word] + width > 32:
            return None
        offsets.append(32 * word + used[word])
        used[word] += width
    return offsets


def check_offsets(bits: torch.Tensor, offsets: torch.Tensor, num_bytes: int) -> None:
    """Raise ValueError unless every head's codes fit the part without overlap."""
    _position_tables(bits, offsets, num_bytes)


def _position_tables(bits: torch.Tensor, offsets: torch.Tensor, num_bytes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each head and bit position p < 8 * num_bytes: (component, bit index).

    Unused positions map to the dummy component R (an always-zero code), so
    unused bits of a slot part are zero.
    """
    num_heads, num_components = bits.shape
    num_positions = 8 * num_bytes
    # built on the CPU whatever the default device (vLLM's GPU workers set cuda)
    cpu = torch.device("cpu")
    component = torch.full((num_heads, num_positions), num_components, dtype=torch.int64,
                           device=cpu)
    bit_index = torch.zeros((num_heads, num_positions), dtype=torch.int64, device=cpu)
    bits_cpu = bits.detach().to("cpu", torch.int64)
    offsets_cpu = offsets.detach().to("cpu", torch.int64)
    for h in range(num_heads):
        total = int(bits_cpu[h].sum())
        if total == 0:
            continue
        owners = torch.repeat_interleave(torch.arange(num_components, device=cpu), bits_cpu[h])
        within = torch.arange(total, device=cpu) - (torch.cumsum(bits_cpu[h], 0) - bits_cpu[h])[owners]
        positions = offsets_cpu[h][owners] + within
        if int(positions.min()) < 0 or int(positions.max()) >= num_positions:
            raise ValueError(f"head {h}: codes reach bit {int(positions.max())} but the "
                             f"slot part holds {num_positions} bits")
        if torch.unique(positions).numel() != total:
            raise ValueError(f"head {h}: codes overlap (bit offsets collide)")
        component[h, positions] = owners
        bit_index[h, positions] = within
    return component.to(bits.device), bit_index.to(bits.device)


def pack_codes(codes: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor,
               num_bytes: int) -> torch.Tensor:
    """Pack codes [N, H, R] (code j < 2^bits[h, j]) into uint8 [N, H, num_bytes]."""
    num_tokens, num_heads, num_components = codes.shape
    component, bit_index = _position_tables(bits, offsets, num_bytes)
    padded = torch.cat(
        [codes.to(torch.int64), codes.new_zeros(num_tokens, num_heads, 1, dtype=torch.int64)],
        dim=2)
    gathered = torch.gather(padded, 2, component.unsqueeze(0).expand(num_tokens, -1, -1))
    bit_values = (gathered >> bit_index.unsqueeze(0)) & 1
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int64))
    packed = (bit_values.view(num_tokens, num_heads, num_bytes, 8) * weights).sum(dim=-1)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [N, H, num_bytes] -> int32 [N, H, R]."""
    num_tokens, num_heads, num_bytes = packed.shape
    num_components = bits.shape[1]
    component, bit_index = _position_tables(bits, offsets, num_bytes)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64)
    bit_values = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1).view(
        num_tokens, num_heads, 8 * num_bytes)
    contributions = bit_values << bit_index.unsqueeze(0)
    codes = torch.zeros(num_tokens, num_heads, num_components + 1,
                        dtype=torch.int64, device=packed.device)
    codes.scatter_add_(2, component.unsqueeze(0).expand(num_tokens, -1, -1), contributions)
    return codes[:, :, :num_components].to(torch.int32)
