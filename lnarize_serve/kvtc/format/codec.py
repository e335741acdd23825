"""KVTC codec, torch reference (device-agnostic): calibration containers and
encode/decode of fixed-size per-token-per-KV-head slots.

The byte layout is the contract in docs/kvtc-layout.md. Every tensor of a
layer is kept in a stacked, padded form ([H, R_max, ...], bits 0 = padding)
so that kernels take one layer's tensors as plain arguments; ``head()`` gives
the unpadded per-head view.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lnarize_serve.kvtc.format.bitpack import check_offsets, pack_codes, unpack_codes
from lnarize_serve.kvtc.format.quantizer import MAX_BITS, dequantize_codes, quantize_codes

LAYOUT_VERSION = 2
KINDS = ("keys", "values")


@dataclass(frozen=True)
class HeadCodec:
    """One (layer, KV head, kind): the unpadded calibration of the layout doc."""

    mean: torch.Tensor   # [d] fp32
    basis: torch.Tensor  # [r, d] fp32, rows are components
    bits: torch.Tensor   # [r] int32, 1..8
    scale: torch.Tensor  # [r] fp32, quantizer step
    zero: torch.Tensor   # [r] fp32, zero point in code units
    offset: torch.Tensor  # [r] int32, first bit of each code in its slot part


@dataclass(frozen=True)
class KindCodec:
    """Keys or values of one layer, stacked over KV heads and padded to R_max.

    Padding components (bits 0) have basis, scale and zero all 0, sit after
    the real components of their head, and always carry code 0.
    """

    mean: torch.Tensor   # [H, d] fp32
    basis: torch.Tensor  # [H, R_max, d] fp32
    bits: torch.Tensor   # [H, R_max] int32, 0 = padding
    scale: torch.Tensor  # [H, R_max] fp32
    zero: torch.Tensor   # [H, R_max] fp32
    bit_offset: torch.Tensor  # [H, R_max] int32, stored (layout v2), 0 on padding
    num_bytes: int       # bytes of this part of a slot (same for every head)

    def __post_init__(self) -> None:
        num_heads, max_rank, head_dim = self.basis.shape
        expect = {"mean": (num_heads, head_dim), "bits": (num_heads, max_rank),
                  "scale": (num_heads, max_rank), "zero": (num_heads, max_rank),
                  "bit_offset": (num_heads, max_rank)}
        for name, shape in expect.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"{name} has shape {actual}, expected {shape}")
        bits = self.bits.to(torch.int64)
        if bool(((bits < 0) | (bits > MAX_BITS)).any()):
            raise ValueError(f"bit widths must lie in 0..{MAX_BITS}")
        active = bits > 0
        # real components first, then padding: active must be non-increasing
        if bool((active[:, 1:] & ~active[:, :-1]).any()):
            raise ValueError("padding components (0 bits) must follow the real ones")
        worst = int(bits.sum(dim=1).max()) if bits.numel() else 0
        if worst > 8 * self.num_bytes:
            raise ValueError(f"a head needs {worst} bits, more than {self.num_bytes} bytes hold")
        check_offsets(self.bits, self.bit_offset, self.num_bytes)

    @property
    def num_heads(self) -> int:
        return self.basis.shape[0]

    @property
    def head_dim(self) -> int:
        return self.basis.shape[2]

    @property
    def max_rank(self) -> int:
        return self.basis.shape[1]

    def head(self, h: int) -> HeadCodec:
        rank = int((self.bits[h] > 0).sum())
        return HeadCodec(self.mean[h], self.basis[h, :rank], self.bits[h, :rank],
                         self.scale[h, :rank], self.zero[h, :rank], self.bit_offset[h, :rank])

    @classmethod
    def from_heads(cls, heads: list[HeadCodec], num_bytes: int) -> "KindCodec":
        head_dim = heads[0].mean.shape[0]
        max_rank = max(1, max(int(h.bits.shape[0]) for h in heads))
        num_heads = len(heads)
        device = heads[0].mean.device
        mean = torch.zeros(num_heads, head_dim, device=device)
        basis = torch.zeros(num_heads, max_rank, head_dim, device=device)
        bits = torch.zeros(num_heads, max_rank, dtype=torch.int32, device=device)
        scale = torch.zeros(num_heads, max_rank, device=device)
        zero = torch.zeros(num_heads, max_rank, device=device)
        offset = torch.zeros(num_heads, max_rank, dtype=torch.int32, device=device)
        for i, head in enumerate(heads):
            rank = head.bits.shape[0]
            mean[i] = head.mean
            basis[i, :rank] = head.basis
            bits[i, :rank] = head.bits.to(torch.int32)
            scale[i, :rank] = head.scale
            zero[i, :rank] = head.zero
            offset[i, :rank] = head.offset.to(torch.int32)
        return cls(mean, basis, bits, scale, zero, offset, num_bytes)

    def to(self, device: torch.device | str) -> "KindCodec":
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device)
                     for f in ("mean", "basis", "bits", "scale", "zero", "bit_offset")})

    # -- the transform ---------------------------------------------------
    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, d] -> [N, H, R_max] PCA coefficients (0 on padding)."""
        centred = x.to(torch.float32) - self.mean
        return torch.einsum("nhd,hrd->nhr", centred, self.basis)

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(self.coefficients(x), self.scale, self.zero, self.bits)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        coeffs = dequantize_codes(codes, self.scale, self.zero, self.bits)
        return self.mean + torch.einsum("nhr,hrd->nhd", coeffs, self.basis)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits, self.bit_offset, self.num_bytes)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_codes(packed, self.bits, self.bit_offset)


@dataclass(frozen=True)
class LayerCodec:
    """KVTC calibration of one full-attention layer (all its KV heads)."""

    keys: KindCodec
    values: KindCodec

    def __post_init__(self) -> None:
        if self.keys.num_heads != self.values.num_heads:
            raise ValueError("keys and values disagree on the number of KV heads")
        if self.keys.head_dim != self.values.head_dim:
            raise ValueError("keys and values disagree on head_dim")

    @property
    def num_kv_heads(self) -> int:
        return self.keys.num_heads

    @property
    def head_dim(self) -> int:
        return self.keys.head_dim

    @property
    def key_bytes(self) -> int:
        return self.keys.num_bytes

    @property
    def value_bytes(self) -> int:
        return self.values.num_bytes

    @property
    def slot_bytes(self) -> int:
        """K_BYTES + V_BYTES rounded up to even (vLLM needs an even page)."""
        total = self.key_bytes + self.value_bytes
        return total + (total % 2)

    def kind(self, name: str) -> KindCodec:
        if name not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {name!r}")
        return self.keys if name == "keys" else self.values

    def to(self, device: torch.device | str) -> "LayerCodec":
        return LayerCodec(self.keys.to(device), self.values.to(device))

    def kernel_args(self) -> dict[str, torch.Tensor | int]:
        """One layer's tensors as flat kernel arguments (see the layout doc)."""
        args: dict[str, torch.Tensor | int] = {}
        for prefix, part in (("k", self.keys), ("v", self.values)):
            args[f"{prefix}_mean"] = part.mean
            args[f"{prefix}_basis"] = part.basis
            args[f"{prefix}_bits"] = part.bits
            args[f"{prefix}_scale"] = part.scale
            args[f"{prefix}_zero"] = part.zero
            args[f"{prefix}_bit_offset"] = part.bit_offset
        args["key_bytes"] = self.key_bytes
        args["value_bytes"] = self.value_bytes
        args["slot_bytes"] = self.slot_bytes
        return args


def encode_kv(keys: torch.Tensor, values: torch.Tensor, layer: LayerCodec) -> torch.Tensor:
    """Post-RoPE keys and values [N, H, d] -> slots uint8 [N, H, SLOT_BYTES]."""
    _check_tokens(keys, layer, "keys")
    _check_tokens(values, layer, "values")
    key_part = layer.keys.pack(layer.keys.encode_codes(keys))
    value_part = layer.values.pack(layer.values.encode_codes(values))
    slots = torch.zeros(keys.shape[0], layer.num_kv_heads, layer.slot_bytes,
                        dtype=torch.uint8, device=keys.device)
    slots[:, :, : layer.key_bytes] = key_part
    slots[:, :, layer.key_bytes: layer.key_bytes + layer.value_bytes] = value_part
    return slots


def split_slots(slots: torch.Tensor, layer: LayerCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [..., H, SLOT] -> (key codes [N, H, Rk], value codes [N, H, Rv])."""
    flat = slots.reshape(-1, layer.num_kv_heads, slots.shape[-1])
    key_codes = layer.keys.unpack(flat[:, :, : layer.key_bytes])
    value_codes = layer.values.unpack(
        flat[:, :, layer.key_bytes: layer.key_bytes + layer.value_bytes])
    return key_codes, value_codes


def decode_kv(slots: torch.Tensor, layer: LayerCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots uint8 [N, H, SLOT_BYTES] -> (keys, values) fp32 [N, H, d]."""
    if slots.dtype != torch.uint8 or slots.shape[-1] != layer.slot_bytes:
        raise ValueError(f"expected uint8 slots of {layer.slot_bytes} bytes, "
                         f"got {slots.dtype} {tuple(slots.shape)}")
    key_codes, value_codes = split_slots(slots, layer)
    return layer.keys.decode_codes(key_codes), layer.values.decode_codes(value_codes)


def roundtrip_kv(keys: torch.Tensor, values: torch.Tensor, layer: LayerCodec
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """decode(encode(k, v)) without materialising bytes (same numbers)."""
    k_hat = layer.keys.decode_codes(layer.keys.encode_codes(keys))
    v_hat = layer.values.decode_codes(layer.values.encode_codes(values))
    return k_hat, v_hat


def _check_tokens(x: torch.Tensor, layer: LayerCodec, name: str) -> None:
    if x.dim() != 3 or x.shape[1:] != (layer.num_kv_heads, layer.head_dim):
        raise ValueError(f"{name} must be [N, {layer.num_kv_heads}, {layer.head_dim}], "
                         f"got {tuple(x.shape)}")
