"""Host-side preparation of one layer's KVTC calibration for the Triton kernels.

The kernels never walk a bit stream component by component. A slot part
(keys or values) is read as ``NW`` little-endian 32-bit words, and the
components are arranged in a ``[NW, KMAX]`` grid: column ``(w, k)`` is the
``k``-th component whose code *starts* in word ``w``. A code is then
``(word[w] >> shift) & mask`` with per-column constants (plus the next word's
low bits when a code straddles a word boundary, only possible with
prefix-sum offsets). Every per-component table (basis rows, scale, zero) is
permuted into that column order once here, so the kernels stay branch-free.

Offsets come from the calibration (``KindCodec.bit_offset``), whatever rule
produced them; docs/kvtc-layout.md says which rule is fast (word packing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lnarize_serve.kvtc.format.codec import KindCodec, LayerCodec

# tl.dot needs every tile dimension >= 16; grids are padded up to this.
_MIN_DOT_DIM = 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class PartTables:
    """Keys or values of one layer, in the kernels' [NW, KMAX] column order.

    ``C = words_padded * kmax_padded`` columns per head; padding columns have
    basis, scale, zero and mask all 0 (so they decode to code 0 and weigh 0).
    """

    num_words: int           # NW: 32-bit words in this part of a slot
    word_offset: int         # where the part starts inside a slot, in words
    words_padded: int        # NW rounded up to a power of two
    kmax_padded: int         # components per word, power of two
    straddles: bool          # some code crosses a word boundary
    mean: torch.Tensor       # [H, d] fp32
    basis: torch.Tensor      # [H, C, d] fp32, rows in column order
    scale: torch.Tensor      # [H, C] fp32 (0 on padding)
    zero: torch.Tensor       # [H, C] fp32 (0 on padding)
    shift: torch.Tensor      # [H, C] int32, start bit inside the start word
    mask: torch.Tensor       # [H, C] int32, 2^bits - 1 (0 on padding)
    # The one code (if any) that crosses into word w from word w - 1, for the
    # write kernel: its basis row, scale, zero, start bit in word w-1, mask.
    straddle_basis: torch.Tensor  # [H, NWp, d]
    straddle_scale: torch.Tensor  # [H, NWp] (1 where none, to keep division safe)
    straddle_zero: torch.Tensor   # [H, NWp]
    straddle_shift: torch.Tensor  # [H, NWp] int32
    straddle_mask: torch.Tensor   # [H, NWp] int32 (0 where none)
    # mean - sum_j zero_j scale_j basis_j (fp64 sum): q . offset is the score
    # part shared by every cached token (keys; the LSE needs it)
    offset: torch.Tensor          # [H, d] fp32
    # "Unit-fp16" decode tables (no straddling codes only): rotating the start
    # word right by ``unit_rot`` puts the code at bit p = 10 - bits of the low
    # half (p - 1 where that rotation would be 0), so
    # ``(rot & unit_mask) | 0x3C00`` is the fp16 number 1 + code * 2^(p - 10)
    # with no fp16 subtraction. The 1.0 bias and the 2^(p - 10) unit fold into
    # these per-column constants: code space is (value - unit_zero) / unit_step
    # and ``(value - unit_zero) * unit_scale == (code - zero) * scale``.
    unit_rot: torch.Tensor        # [H, C] int32 in 1..31
    unit_mask: torch.Tensor       # [H, C] int32, mask << p (0 on padding)
    unit_scale: torch.Tensor      # [H, C] fp32, scale * 2^(10 - p) (0 on padding)
    unit_zero: torch.Tensor       # [H, C] fp32, 1 + zero * 2^(p - 10) (1 on padding)

    @property
    def columns(self) -> int:
        return self.words_padded * self.kmax_padded


@dataclass(frozen=True)
class LayerKernelTables:
    """Everything the write and decode kernels need for one attention layer."""

    keys: PartTables
    values: PartTables
    num_kv_heads: int
    head_dim: int
    slot_bytes: int
    slot_words: int

    def to(self, device: torch.device | str) -> "LayerKernelTables":
        def move(part: PartTables) -> PartTables:
            fields = {name: getattr(part, name).to(device)
                      for name in part.__dataclass_fields__
                      if isinstance(getattr(part, name), torch.Tensor)}
            return PartTables(**{**part.__dict__, **fields})
        return LayerKernelTables(move(self.keys), move(self.values), self.num_kv_heads,
                                 self.head_dim, self.slot_bytes, self.slot_words)


def _part_tables(part: KindCodec, word_offset: int) -> PartTables:
    if part.num_bytes % 4:
        raise ValueError(
            f"KVTC kernels need each slot part to be whole 32-bit words; this part has "
            f"{part.num_bytes} bytes (docs/kvtc-layout.md, word packing)")
    num_heads, _, head_dim = part.basis.shape
    num_words = part.num_bytes // 4
    bits = part.bits.detach().to("cpu", torch.int64)
    offsets = part.bit_offset.detach().to("cpu", torch.int64)
    basis = part.basis.detach().to("cpu", torch.float32)
    scale = part.scale.detach().to("cpu", torch.float32)
    zero = part.zero.detach().to("cpu", torch.float32)

    # group components by start word, in bit order inside each word
    groups: list[list[list[int]]] = []
    straddles = False
    for h in range(num_heads):
        per_word: list[list[int]] = [[] for _ in range(num_words)]
        active = [j for j in range(bits.shape[1]) if bits[h, j] > 0]
        for j in sorted(active, key=lambda j: int(offsets[h, j])):
            start, width = int(offsets[h, j]), int(bits[h, j])
            if start + width > 8 * part.num_bytes:
                raise ValueError(f"head {h} component {j} ends past its slot part")
            per_word[start // 32].append(j)
            straddles |= start % 32 + width > 32
        groups.append(per_word)
    kmax = max((len(g) for per_word in groups for g in per_word), default=1)
    words_padded = _next_pow2(num_words)
    kmax_padded = _next_pow2(max(kmax, 1))
    while words_padded * kmax_padded < _MIN_DOT_DIM:
        kmax_padded *= 2
    columns = words_padded * kmax_padded

    # built on the CPU whatever the default device, moved to the codec's at the end
    cpu = torch.device("cpu")
    col_basis = torch.zeros(num_heads, columns, head_dim, device=cpu)
    col_scale = torch.zeros(num_heads, columns, device=cpu)
    col_zero = torch.zeros(num_heads, columns, device=cpu)
    col_shift = torch.zeros(num_heads, columns, dtype=torch.int32, device=cpu)
    col_mask = torch.zeros(num_heads, columns, dtype=torch.int32, device=cpu)
    s_basis = torch.zeros(num_heads, words_padded, head_dim, device=cpu)
    s_scale = torch.ones(num_heads, words_padded, device=cpu)
    s_zero = torch.zeros(num_heads, words_padded, device=cpu)
    s_shift = torch.zeros(num_heads, words_padded, dtype=torch.int32, device=cpu)
    s_mask = torch.zeros(num_heads, words_padded, dtype=torch.int32, device=cpu)
    for h, per_word in enumerate(groups):
        for w, comps in enumerate(per_word):
            for k, j in enumerate(comps):
                c = w * kmax_padded + k
                start, width = int(offsets[h, j]), int(bits[h, j])
                col_basis[h, c] = basis[h, j]
                col_scale[h, c] = scale[h, j]
                col_zero[h, c] = zero[h, j]
                col_shift[h, c] = start % 32
                col_mask[h, c] = (1 << width) - 1
                if start % 32 + width > 32:
                    s_basis[h, w + 1] = basis[h, j]
                    s_scale[h, w + 1] = scale[h, j]
                    s_zero[h, w + 1] = zero[h, j]
                    s_shift[h, w + 1] = start % 32
                    s_mask[h, w + 1] = (1 << width) - 1
    unit_rot, unit_mask, unit_scale, unit_zero = _unit_half_tables(
        col_shift, col_mask, col_scale, col_zero)
    device = part.basis.device
    offset = (part.mean.detach().to("cpu", torch.float64)
              - torch.einsum("hc,hcd->hd", (col_zero * col_scale).double(), col_basis.double()))
    tensors = [part.mean.detach().to(torch.float32), col_basis, col_scale, col_zero, col_shift,
               col_mask, s_basis, s_scale, s_zero, s_shift, s_mask, offset.float(),
               unit_rot, unit_mask, unit_scale, unit_zero]
    tensors = [t.to(device).contiguous() for t in tensors]
    return PartTables(num_words, word_offset, words_padded, kmax_padded, straddles, *tensors)


def _unit_half_tables(shift: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor):
    """Per-column constants of the unit-fp16 decode (see PartTables.unit_rot)."""
    width = torch.zeros_like(mask)
    for b in range(1, 11):
        width[mask == (1 << b) - 1] = b
    if bool((mask > 1023).any()):
        raise ValueError("unit-fp16 decode needs codes of at most 10 bits")
    pos = 10 - width
    pos = torch.where((shift - pos) % 32 == 0, pos - 1, pos)  # rotation 0 is not a funnel shift
    rot = ((shift - pos) % 32).to(torch.int32)
    rot = torch.where(mask == 0, torch.ones_like(rot), rot)  # padding: any valid rotation
    step = torch.exp2((pos - 10).to(torch.float32))  # value of one code unit
    unit_mask = (mask << pos).to(torch.int32)
    unit_scale = torch.where(mask == 0, torch.zeros_like(scale), scale / step)
    unit_zero = torch.where(mask == 0, torch.ones_like(zero), 1.0 + zero * step)
    return rot, unit_mask, unit_scale, unit_zero


def prepare_layer_tables(layer: LayerCodec) -> LayerKernelTables:
    """Build the kernels' tables for one layer (once, at load time)."""
    if layer.slot_bytes % 4:
        raise ValueError(f"KVTC kernels need SLOT_BYTES % 4 == 0, got {layer.slot_bytes}")
    keys = _part_tables(layer.keys, 0)
    values = _part_tables(layer.values, layer.key_bytes // 4)
    return LayerKernelTables(keys, values, layer.num_kv_heads, layer.head_dim,
                             layer.slot_bytes, layer.slot_bytes // 4)
