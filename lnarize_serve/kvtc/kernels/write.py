"""Compress-on-write: new K/V tokens -> KVTC slots in the paged cache.

One program encodes BLOCK_T tokens of one KV head: centre, project onto the
PCA basis (fp32, IEEE, so codes match the torch reference bit for bit except
at exact rounding ties of a different summation order), quantize, and OR the
codes into the part's 32-bit words, which are stored with one vector store
per token. Keys and values are done by the same program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lnarize_serve.kvtc.kernels.launch import check_launchable
from lnarize_serve.kvtc.kernels.tables import LayerKernelTables, PartTables


@triton.jit
def _encode_part_words(x_base, x_stride_t, tok, tok_ok, head, mean_ptr, basis_ptr, scale_ptr,
                       zero_ptr, shift_ptr, mask_ptr, s_basis_ptr, s_scale_ptr, s_zero_ptr,
                       s_shift_ptr, s_mask_ptr,
                       HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                       NWP: tl.constexpr, KP: tl.constexpr, STRADDLES: tl.constexpr):
    """Codes of one part for BLOCK_T tokens of one head -> words [BLOCK_T, NWP] uint32."""
    C: tl.constexpr = NWP * KP
    cols = tl.arange(0, C)
    words_idx = tl.arange(0, NWP)
    dk = tl.arange(0, D_CHUNK)
    coeff = tl.zeros((BLOCK_T, C), dtype=tl.float32)
    s_coeff = tl.zeros((BLOCK_T, NWP), dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, D_CHUNK):
        x = tl.load(x_base + tok[:, None] * x_stride_t + (d0 + dk)[None, :],
                    mask=tok_ok[:, None], other=0.0).to(tl.float32)
        x = x - tl.load(mean_ptr + head * HEAD_DIM + d0 + dk)[None, :]
        basis = tl.load(basis_ptr + (head * C + cols)[:, None] * HEAD_DIM + (d0 + dk)[None, :])
        coeff += tl.dot(x, tl.trans(basis), input_precision="ieee")
        if STRADDLES:
            s_basis = tl.load(s_basis_ptr + (head * NWP + words_idx)[:, None] * HEAD_DIM
                              + (d0 + dk)[None, :])
            s_coeff += tl.sum(x[:, None, :] * s_basis[None, :, :], axis=2)
    scale = tl.load(scale_ptr + head * C + cols)
    zero = tl.load(zero_ptr + head * C + cols)
    mask = tl.load(mask_ptr + head * C + cols)
    safe_scale = tl.where(mask > 0, scale, 1.0)
    code = tl.floor(coeff / safe_scale[None, :] + zero[None, :] + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), mask.to(tl.float32)[None, :])
    code = code.to(tl.int32).to(tl.uint32)
    shift = tl.load(shift_ptr + head * C + cols).to(tl.uint32)
    placed = tl.reshape(code << shift[None, :], (BLOCK_T, NWP, KP))
    # fields never overlap, so the sum of the placed codes is their bitwise OR
    words = tl.sum(placed, axis=2).to(tl.uint32)
    if STRADDLES:
        s_scale = tl.load(s_scale_ptr + head * NWP + words_idx)
        s_zero = tl.load(s_zero_ptr + head * NWP + words_idx)
        s_mask = tl.load(s_mask_ptr + head * NWP + words_idx)
        s_shift = tl.load(s_shift_ptr + head * NWP + words_idx).to(tl.uint32)
        s_code = tl.floor(s_coeff / s_scale[None, :] + s_zero[None, :] + 0.5)
        s_code = tl.minimum(tl.maximum(s_code, 0.0), s_mask.to(tl.float32)[None, :])
        s_code = s_code.to(tl.int32).to(tl.uint32)
        # the high bits of a code that started at bit s of the previous word;
        # s >= 25 for any straddler (width <= 8), so 32 - s is a valid shift
        s_safe = tl.where(s_mask > 0, s_shift, 31)
        words += tl.where(s_mask[None, :] > 0, s_code >> (32 - s_safe)[None, :], 0)
    return words


@triton.jit
def _kvtc_write_kernel(
        k_ptr, v_ptr, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
        slot_mapping_ptr, cache_ptr, stride_block, stride_head, stride_slot,
        num_tokens, block_size,
        k_mean, k_basis, k_scale, k_zero, k_shift, k_mask,
        k_s_basis, k_s_scale, k_s_zero, k_s_shift, k_s_mask,
        v_mean, v_basis, v_scale, v_zero, v_shift, v_mask,
        v_s_basis, v_s_scale, v_s_zero, v_s_shift, v_s_mask,
        HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
        K_NW: tl.constexpr, K_NWP: tl.constexpr, K_KP: tl.constexpr, K_STRADDLES: tl.constexpr,
        V_WORD0: tl.constexpr, V_NW: tl.constexpr, V_NWP: tl.constexpr, V_KP: tl.constexpr,
        V_STRADDLES: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_mapping_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    tok_ok = slot >= 0  # vLLM pads with -1: nothing is written for those
    block = tl.where(tok_ok, slot // block_size, 0)
    row = block * stride_block + head * stride_head + tl.where(tok_ok, slot % block_size, 0) * stride_slot

    k_words = _encode_part_words(k_ptr + head * k_stride_h, k_stride_t, tok, tok_ok, head,
                                 k_mean, k_basis, k_scale, k_zero, k_shift, k_mask,
                                 k_s_basis, k_s_scale, k_s_zero, k_s_shift, k_s_mask,
                                 HEAD_DIM, D_CHUNK, BLOCK_T, K_NWP, K_KP, K_STRADDLES)
    kw = tl.arange(0, K_NWP)
    tl.store(cache_ptr + row[:, None] + kw[None, :], k_words.to(tl.int32, bitcast=True),
             mask=tok_ok[:, None] & (kw < K_NW)[None, :])

    v_words = _encode_part_words(v_ptr + head * v_stride_h, v_stride_t, tok, tok_ok, head,
                                 v_mean, v_basis, v_scale, v_zero, v_shift, v_mask,
                                 v_s_basis, v_s_scale, v_s_zero, v_s_shift, v_s_mask,
                                 HEAD_DIM, D_CHUNK, BLOCK_T, V_NWP, V_KP, V_STRADDLES)
    vw = tl.arange(0, V_NWP)
    tl.store(cache_ptr + row[:, None] + V_WORD0 + vw[None, :], v_words.to(tl.int32, bitcast=True),
             mask=tok_ok[:, None] & (vw < V_NW)[None, :])


def _part_args(part: PartTables) -> list[torch.Tensor]:
    return [part.mean, part.basis, part.scale, part.zero, part.shift, part.mask,
            part.straddle_basis, part.straddle_scale, part.straddle_zero,
            part.straddle_shift, part.straddle_mask]


def write_slots(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                cache: torch.Tensor, tables: LayerKernelTables, block_t: int = 16) -> None:
    """Encode key/value [T, H, d] (post-RoPE keys) and store them as slots.

    ``cache`` is the layer's uint8 [num_blocks, H, block_size, SLOT_BYTES];
    token i goes to flat slot ``slot_mapping[i]`` (block = slot // block_size,
    offset = slot % block_size, -1 = skip), vLLM's convention. The slot
    mapping's length is the number of tokens: key/value rows past it are
    padding (CUDA-graph sizes) and are never read.
    """
    _, num_heads, head_dim = key.shape
    num_tokens = slot_mapping.shape[0]
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if key.shape[0] < num_tokens:
        raise ValueError(f"{num_tokens} slots to write but only {key.shape[0]} key/value rows")
    if (num_heads, head_dim) != (tables.num_kv_heads, tables.head_dim):
        raise ValueError(f"tokens are [.., {num_heads}, {head_dim}], the calibration is "
                         f"[.., {tables.num_kv_heads}, {tables.head_dim}]")
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[1] != num_heads \
            or cache.shape[3] != tables.slot_bytes:
        raise ValueError(f"cache must be uint8 [blocks, {num_heads}, block_size, "
                         f"{tables.slot_bytes}], got {cache.dtype} {tuple(cache.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value must be contiguous in head_dim")
    check_launchable(_kvtc_write_kernel, key, cache)
    if num_tokens == 0:
        return
    words = cache.view(torch.int32)
    k, v = tables.keys, tables.values
    # the [C, D_CHUNK] fp32 basis tile is staged in shared memory: keep it <= 32 KB
    d_chunk = min(head_dim, max(16, 8192 // max(k.columns, v.columns)))
    grid = (triton.cdiv(num_tokens, block_t), num_heads)
    _kvtc_write_kernel[grid](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        slot_mapping, words, words.stride(0), words.stride(1), words.stride(2),
        num_tokens, cache.shape[2], *_part_args(k), *_part_args(v),
        HEAD_DIM=head_dim, D_CHUNK=d_chunk, BLOCK_T=block_t,
        K_NW=k.num_words, K_NWP=k.words_padded, K_KP=k.kmax_padded, K_STRADDLES=k.straddles,
        V_WORD0=v.word_offset, V_NW=v.num_words, V_NWP=v.words_padded, V_KP=v.kmax_padded,
        V_STRADDLES=v.straddles, num_warps=8, num_stages=2)
