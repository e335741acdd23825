"""Decode attention straight from KVTC slots (flash-decoding with split-K).

Three launches per call:

1. ``_kvtc_project_kernel`` (one program per sequence and KV head): project
   the GQA group's query rows into the key basis once,
   ``qs = (q . basis_j) * scale_j * softmax_scale * log2(e)`` (fp16 for the
   tensor cores) and the per-row constant ``q . mean - sum_j qs_j zero_j``.
2. ``_kvtc_split_kernel`` (sequence, KV head, split): stream the split's
   slots, unpack key codes with one shift + mask per code, scores =
   ``qs @ codes^T`` on tensor cores, online softmax, and accumulate
   ``p @ value codes`` in code space. Writes (max, sum, acc) per split.
3. ``_kvtc_combine_kernel`` (sequence, KV head): merge the splits, then one
   inverse projection per row: ``out = mean + ((acc/l - zero) * scale) @ basis``.

Query rows of one program are (query token i, head g of the group) with
row = i * G + g, so up to 4 MTP tokens share every slot read; token i sees
positions <= seq_len - n + i (the new tokens are already in the cache).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from lnarize_serve.kvtc.kernels.launch import check_launchable
from lnarize_serve.kvtc.kernels.tables import LayerKernelTables

_LOG2E = 1.4426950408889634
_EMPTY = -1.0e30  # running max of a row that has seen nothing (finite: no inf-inf)


@triton.jit
def _kvtc_project_kernel(
        q_ptr, q_stride_t, q_stride_h, query_start_loc_ptr,
        mean_ptr, basis_ptr, scale_ptr, zero_ptr,
        qs_ptr, qconst_ptr, qk_scale,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, C: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    q_rows = q_ptr + (q_start + tok).to(tl.int64) * q_stride_t + (head * GROUP + rows % GROUP) * q_stride_h
    cols = tl.arange(0, C)
    dk = tl.arange(0, D_CHUNK)
    proj = tl.zeros((ROWS, C), dtype=tl.float32)
    q_mean = tl.zeros((ROWS,), dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, D_CHUNK):
        q = tl.load(q_rows[:, None] + (d0 + dk)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        basis = tl.load(basis_ptr + (head * C + cols)[:, None] * HEAD_DIM + (d0 + dk)[None, :])
        proj += tl.dot(q, tl.trans(basis), input_precision="ieee")
        q_mean += tl.sum(q * tl.load(mean_ptr + head * HEAD_DIM + d0 + dk)[None, :], axis=1)
    qs = proj * tl.load(scale_ptr + head * C + cols)[None, :] * qk_scale
    qconst = q_mean * qk_scale - tl.sum(qs * tl.load(zero_ptr + head * C + cols)[None, :], axis=1)
    out = (seq * num_kv_heads + head).to(tl.int64)
    tl.store(qs_ptr + out * ROWS * C + rows[:, None] * C + cols[None, :], qs.to(tl.float16))
    tl.store(qconst_ptr + out * ROWS + rows, qconst)


@triton.jit
def _to_half(codes):
    """Small unsigned ints -> exact fp16 without the slow converter:
    0x6400 | c is the fp16 number 1024 + c."""
    return (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _codes_3d(words_base, row, tok_ok, shift, mask, NW: tl.constexpr, NWP: tl.constexpr,
              KP: tl.constexpr, BLOCK_T: tl.constexpr, STRADDLES: tl.constexpr):
    """[BLOCK_T, NWP * KP] fp16 codes: load [T, NW] words, extract in a
    [T, NW, KP] tile (shift/mask are [NWP, KP]), then flatten."""
    w = tl.arange(0, NWP)
    ptrs = words_base + row[:, None] + w[None, :]
    lo = tl.load(ptrs, mask=tok_ok[:, None] & (w < NW)[None, :], other=0).to(tl.uint32, bitcast=True)
    codes = lo[:, :, None] >> shift[None, :, :]
    if STRADDLES:
        hi = tl.load(ptrs + 1, mask=tok_ok[:, None] & (w + 1 < NW)[None, :], other=0)
        hi = hi.to(tl.uint32, bitcast=True)
        codes = codes | ((hi[:, :, None] << 1) << (31 - shift[None, :, :]))
    return tl.reshape(_to_half(codes & mask[None, :, :]), (BLOCK_T, NWP * KP))


@triton.jit
def _codes_2d(words_base, row, tok_ok, shift, mask, NW: tl.constexpr, NWP: tl.constexpr,
              KP: tl.constexpr, BLOCK_T: tl.constexpr, STRADDLES: tl.constexpr,
              GATHER: tl.constexpr):
    """[BLOCK_T, C] fp16 codes with shift/mask as [C] vectors. GATHER: every
    element loads its own word (the compiler keeps the tile in the layout its
    consumer wants); else the [T, NW] words are loaded once and broadcast."""
    C: tl.constexpr = NWP * KP
    word_of = tl.arange(0, C) // KP
    if GATHER:
        ptrs = words_base + row[:, None] + word_of[None, :]
        lo = tl.load(ptrs, mask=tok_ok[:, None] & (word_of < NW)[None, :], other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        if STRADDLES:
            hi = tl.load(ptrs + 1, mask=tok_ok[:, None] & (word_of + 1 < NW)[None, :], other=0)
            hi = hi.to(tl.uint32, bitcast=True)
    else:
        w = tl.arange(0, NWP)
        wptrs = words_base + row[:, None] + w[None, :]
        words = tl.load(wptrs, mask=tok_ok[:, None] & (w < NW)[None, :], other=0)
        lo = tl.reshape(tl.broadcast_to(words.to(tl.uint32, bitcast=True)[:, :, None],
                                        (BLOCK_T, NWP, KP)), (BLOCK_T, C))
        if STRADDLES:
            nxt = tl.load(wptrs + 1, mask=tok_ok[:, None] & (w + 1 < NW)[None, :], other=0)
            hi = tl.reshape(tl.broadcast_to(nxt.to(tl.uint32, bitcast=True)[:, :, None],
                                            (BLOCK_T, NWP, KP)), (BLOCK_T, C))
    codes = lo >> shift[None, :]
    if STRADDLES:
        codes = codes | ((hi << 1) << (31 - shift[None, :]))
    return _to_half(codes & mask[None, :])


@triton.jit
def _codes_2d_t(words_base, row, tok_ok, shift, mask, NW: tl.constexpr, NWP: tl.constexpr,
                KP: tl.constexpr, BLOCK_T: tl.constexpr, STRADDLES: tl.constexpr,
                GATHER: tl.constexpr):
    """Transposed :func:`_codes_2d`: [C, BLOCK_T] (the A operand of p @ codes
    computed as codes^T @ p^T)."""
    C: tl.constexpr = NWP * KP
    word_of = tl.arange(0, C) // KP
    if GATHER:
        ptrs = words_base + row[None, :] + word_of[:, None]
        lo = tl.load(ptrs, mask=tok_ok[None, :] & (word_of < NW)[:, None], other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        if STRADDLES:
            hi = tl.load(ptrs + 1, mask=tok_ok[None, :] & (word_of + 1 < NW)[:, None], other=0)
            hi = hi.to(tl.uint32, bitcast=True)
    else:
        w = tl.arange(0, NWP)
        wptrs = words_base + row[None, :] + w[:, None]
        words = tl.load(wptrs, mask=tok_ok[None, :] & (w < NW)[:, None], other=0)
        lo = tl.reshape(tl.broadcast_to(words.to(tl.uint32, bitcast=True)[:, None, :],
                                        (NWP, KP, BLOCK_T)), (C, BLOCK_T))
        if STRADDLES:
            nxt = tl.load(wptrs + 1, mask=tok_ok[None, :] & (w + 1 < NW)[:, None], other=0)
            hi = tl.reshape(tl.broadcast_to(nxt.to(tl.uint32, bitcast=True)[:, None, :],
                                            (NWP, KP, BLOCK_T)), (C, BLOCK_T))
    codes = lo >> shift[:, None]
    if STRADDLES:
        codes = codes | ((hi << 1) << (31 - shift[:, None]))
    return _to_half(codes & mask[:, None])


@triton.jit
def _kvtc_split_kernel(
        cache_ptr, stride_block, stride_head, stride_slot,
        block_table_ptr, block_table_stride, seq_lens_ptr, query_start_loc_ptr, block_size,
        qs_ptr, qconst_ptr, k_shift_ptr, k_mask_ptr, v_shift_ptr, v_mask_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits,
        GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
        K_NW: tl.constexpr, K_NWP: tl.constexpr, K_KP: tl.constexpr, K_STRADDLES: tl.constexpr,
        V_WORD0: tl.constexpr, V_NW: tl.constexpr, V_NWP: tl.constexpr, V_KP: tl.constexpr,
        V_STRADDLES: tl.constexpr, VARIANT: tl.constexpr, TABLES_IN_LOOP: tl.constexpr,
        VALID_ROWS: tl.constexpr):
    """VARIANT 0: rows x tokens (codes are the dot's B operand), 3-D extract;
    1: same, 2-D broadcast extract; 2: tokens x rows (codes are the A
    operand, kept in registers), broadcast extract; 3: as 2, gathered loads.
    TABLES_IN_LOOP re-reads the per-column shift/mask tables (L1-resident)
    every iteration instead of pinning ~4 registers per column (variants 1-3)."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * chunk_len
    if start >= seq_len:
        return  # the combine kernel only reads splits that hold tokens
    end = tl.minimum(start + chunk_len, seq_len)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - tl.load(query_start_loc_ptr + seq)

    KC: tl.constexpr = K_NWP * K_KP
    VC: tl.constexpr = V_NWP * V_KP
    TRANSPOSED: tl.constexpr = VARIANT >= 2
    GATHER: tl.constexpr = VARIANT == 3
    rows = tl.arange(0, ROWS)
    kcols = tl.arange(0, KC)
    vcols = tl.arange(0, VC)
    # the last position each row may see (rows past num_q compute harmless values)
    last_visible = seq_len - num_q + rows // GROUP
    pair = (seq * num_kv_heads + head).to(tl.int64)
    qconst = tl.load(qconst_ptr + pair * ROWS + rows)
    if VARIANT == 0:
        kgrid = tl.arange(0, K_NWP)[:, None] * K_KP + tl.arange(0, K_KP)[None, :]
        vgrid = tl.arange(0, V_NWP)[:, None] * V_KP + tl.arange(0, V_KP)[None, :]
    else:
        kgrid = kcols
        vgrid = vcols
    k_shift = tl.load(k_shift_ptr + head * KC + kgrid).to(tl.uint32)
    k_mask = tl.load(k_mask_ptr + head * KC + kgrid).to(tl.uint32)
    v_shift = tl.load(v_shift_ptr + head * VC + vgrid).to(tl.uint32)
    v_mask = tl.load(v_mask_ptr + head * VC + vgrid).to(tl.uint32)
    if TRANSPOSED:
        qs = tl.load(qs_ptr + pair * ROWS * KC + rows[None, :] * KC + kcols[:, None])  # [KC, ROWS]
        acc = tl.zeros((VC, ROWS), dtype=tl.float32)
    else:
        qs = tl.load(qs_ptr + pair * ROWS * KC + rows[:, None] * KC + kcols[None, :])  # [ROWS, KC]
        acc = tl.zeros((ROWS, VC), dtype=tl.float32)

    run_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros((ROWS,), dtype=tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * block_table_stride
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        tok_ok = pos < end
        block = tl.load(table_row + pos // block_size, mask=tok_ok, other=0).to(tl.int64)
        slot_row = block * stride_block + head * stride_head + (pos % block_size) * stride_slot
        if TABLES_IN_LOOP:
            # a loop-variant (always true) predicate keeps these loads in the loop
            k_live = kgrid < KC + (end - t0)
            v_live = vgrid < VC + (end - t0)
            k_shift = tl.load(k_shift_ptr + head * KC + kgrid, mask=k_live, other=0).to(tl.uint32)
            k_mask = tl.load(k_mask_ptr + head * KC + kgrid, mask=k_live, other=0).to(tl.uint32)
            v_shift = tl.load(v_shift_ptr + head * VC + vgrid, mask=v_live, other=0).to(tl.uint32)
            v_mask = tl.load(v_mask_ptr + head * VC + vgrid, mask=v_live, other=0).to(tl.uint32)
        if TRANSPOSED:
            k_codes = _codes_2d(cache_ptr, slot_row, tok_ok, k_shift, k_mask,
                                K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES, GATHER)
            scores = tl.dot(k_codes, qs) + qconst[None, :]  # [T, ROWS]
            visible = tok_ok[:, None] & (pos[:, None] <= last_visible[None, :])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=0))
            alpha = tl.exp2(run_max - new_max)
            probs = tl.exp2(scores - new_max[None, :])
            run_sum = run_sum * alpha + tl.sum(probs, axis=0)
            v_codes = _codes_2d_t(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                  V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES, GATHER)
            acc = acc * alpha[None, :] + tl.dot(v_codes, probs.to(tl.float16))  # [VC, ROWS]
        else:
            if VARIANT == 0:
                k_codes = _codes_3d(cache_ptr, slot_row, tok_ok, k_shift, k_mask,
                                    K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES)
            else:
                k_codes = _codes_2d(cache_ptr, slot_row, tok_ok, k_shift, k_mask,
                                    K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES, False)
            scores = tl.dot(qs, tl.trans(k_codes)) + qconst[:, None]  # [ROWS, T]
            visible = tok_ok[None, :] & (pos[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            alpha = tl.exp2(run_max - new_max)
            probs = tl.exp2(scores - new_max[:, None])
            run_sum = run_sum * alpha + tl.sum(probs, axis=1)
            if VARIANT == 0:
                v_codes = _codes_3d(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                    V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES)
            else:
                v_codes = _codes_2d(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                    V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES, False)
            acc = acc * alpha[:, None] + tl.dot(probs.to(tl.float16), v_codes)  # [ROWS, VC]
        run_max = new_max

    part = pair * num_splits + split
    row_ok = rows < VALID_ROWS  # padding rows of the MMA tile are never read back
    tl.store(part_max_ptr + part * ROWS + rows, run_max, mask=row_ok)
    tl.store(part_sum_ptr + part * ROWS + rows, run_sum, mask=row_ok)
    if TRANSPOSED:
        tl.store(part_acc_ptr + part * ROWS * VC + rows[None, :] * VC + vcols[:, None], acc,
                 mask=row_ok[None, :])
    else:
        tl.store(part_acc_ptr + part * ROWS * VC + rows[:, None] * VC + vcols[None, :], acc,
                 mask=row_ok[:, None])


@triton.jit
def _kvtc_combine_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits,
        seq_lens_ptr, query_start_loc_ptr, qconst_ptr,
        mean_ptr, basis_ptr, scale_ptr, zero_ptr,
        out_ptr, out_stride_t, out_stride_h, lse_ptr, lse_stride_t,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, VC: tl.constexpr,
        WRITE_LSE: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, VC)
    pair = (seq * num_kv_heads + head).to(tl.int64)
    used_splits = tl.cdiv(seq_len, chunk_len)

    # SPLIT_BLOCK splits per step, so that many partial loads are in flight
    valid = rows < MAX_Q * GROUP
    sb = tl.arange(0, SPLIT_BLOCK)
    run_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, VC), dtype=tl.float32)
    for s0 in range(0, used_splits, SPLIT_BLOCK):
        part = pair * num_splits + s0 + sb  # [SB]
        ok = ((s0 + sb) < used_splits)[:, None] & valid[None, :]  # [SB, ROWS]
        m = tl.load(part_max_ptr + part[:, None] * ROWS + rows[None, :], mask=ok, other=-1.0e30)
        s = tl.load(part_sum_ptr + part[:, None] * ROWS + rows[None, :], mask=ok, other=0.0)
        a = tl.load(part_acc_ptr + part[:, None, None] * ROWS * VC + rows[None, :, None] * VC
                    + cols[None, None, :], mask=ok[:, :, None], other=0.0)
        new_max = tl.maximum(run_max, tl.max(m, axis=0))
        old_w = tl.exp2(run_max - new_max)
        new_w = tl.exp2(m - new_max[None, :])  # [SB, ROWS]
        run_sum = run_sum * old_w + tl.sum(s * new_w, axis=0)
        acc = acc * old_w[:, None] + tl.sum(a * new_w[:, :, None], axis=0)
        run_max = new_max

    safe_sum = tl.where(run_sum > 0, run_sum, 1.0)
    coeff = (acc / safe_sum[:, None] - tl.load(zero_ptr + head * VC + cols)[None, :]) \
        * tl.load(scale_ptr + head * VC + cols)[None, :]
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    out_rows = out_ptr + (q_start + tok).to(tl.int64) * out_stride_t \
        + (head * GROUP + rows % GROUP) * out_stride_h
    dk = tl.arange(0, D_CHUNK)
    for d0 in range(0, HEAD_DIM, D_CHUNK):
        basis = tl.load(basis_ptr + (head * VC + cols)[:, None] * HEAD_DIM + (d0 + dk)[None, :])
        o = tl.dot(coeff, basis, input_precision="ieee") \
            + tl.load(mean_ptr + head * HEAD_DIM + d0 + dk)[None, :]
        tl.store(out_rows[:, None] + (d0 + dk)[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    if WRITE_LSE:
        # natural-log LSE of the true scores (the per-row constant included),
        # so a caller can merge this with attention over uncompressed tokens
        lse = (run_max + tl.log2(safe_sum)) / 1.4426950408889634
        tl.store(lse_ptr + (q_start + tok).to(tl.int64) * lse_stride_t + head * GROUP + rows % GROUP,
                 lse, mask=row_ok)


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_t: int,
                       num_sms: int = 132, programs_per_sm: int = 2, min_chunk: int = 256) -> int:
    """Enough (sequence, head, split) programs to give every SM about
    ``programs_per_sm`` of them, without splits shorter than ``min_chunk``."""
    wanted = max(1, -(-programs_per_sm * num_sms // (batch * num_kv_heads)))
    longest = max(1, -(-max_seq_len // max(min_chunk, block_t)))
    return max(1, min(wanted, longest))


def decode_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     tables: LayerKernelTables, softmax_scale: float, max_query_len: int,
                     max_seq_len: int, num_splits: int | None = None,
                     out: torch.Tensor | None = None, return_lse: bool = False,
                     block_t: int = 64, num_warps: int = 4, num_stages: int = 2,
                     variant: int = 1, tables_in_loop: bool = True,
                     compiled: list | None = None):
    """Attention of query tokens over a KVTC paged cache, causal over the new ones.

    query [T, Hq, d] post-RoPE, sequence b owning rows
    ``query_start_loc[b]:query_start_loc[b+1]`` (1..max_query_len of them, the
    last positions of ``seq_lens[b]``, already written to the cache). cache is
    uint8 [blocks, H, block_size, SLOT_BYTES]; block_table [B, max_blocks]
    int32. ``max_seq_len`` bounds seq_lens (a static bound keeps the launch
    CUDA-graph safe). Returns out [T, Hq, d] (query's dtype unless ``out``),
    plus the natural-log LSE [T, Hq] fp32 when ``return_lse``. ``variant``
    selects the split kernel's formulation (see _kvtc_split_kernel);
    ``compiled``, if a list, receives the launched kernels (for their
    register / spill / shared-memory reports).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_heads = tables.num_kv_heads
    if num_q_heads % num_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_heads} KV heads")
    if head_dim != tables.head_dim:
        raise ValueError(f"query head_dim {head_dim} != calibration head_dim {tables.head_dim}")
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[1] != num_heads \
            or cache.shape[3] != tables.slot_bytes:
        raise ValueError(f"cache must be uint8 [blocks, {num_heads}, block_size, "
                         f"{tables.slot_bytes}], got {cache.dtype} {tuple(cache.shape)}")
    if not 1 <= max_query_len <= 16:
        raise ValueError(f"max_query_len must be 1..16 (decode/verify), got {max_query_len}")
    if query.stride(2) != 1:
        raise ValueError("query must be contiguous in head_dim")
    check_launchable(_kvtc_split_kernel, query, cache)
    group = num_q_heads // num_heads
    batch = seq_lens.shape[0]
    rows = max(16, triton.next_power_of_2(max_query_len * group))
    if num_splits is None:
        num_splits = default_num_splits(batch, num_heads, max_seq_len, block_t)
    chunk = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_t) * block_t
    if out is None:
        out = torch.empty_like(query)
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=query.device) \
        if return_lse else out
    k, v = tables.keys, tables.values
    dev = query.device
    qs = torch.empty(batch, num_heads, rows, k.columns, dtype=torch.float16, device=dev)
    qconst = torch.empty(batch, num_heads, rows, dtype=torch.float32, device=dev)
    part_max = torch.empty(batch, num_heads, num_splits, rows, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch, num_heads, num_splits, rows, v.columns,
                           dtype=torch.float32, device=dev)
    words = cache.view(torch.int32)
    qk_scale = softmax_scale * _LOG2E
    d_chunk = min(head_dim, max(16, 8192 // max(k.columns, v.columns)))

    _kvtc_project_kernel[(batch, num_heads)](
        query, query.stride(0), query.stride(1), query_start_loc,
        k.mean, k.basis, k.scale, k.zero, qs, qconst, qk_scale,
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim,
        D_CHUNK=d_chunk, C=k.columns, num_warps=4, num_stages=2)
    split_kernel = _kvtc_split_kernel[(num_splits, num_heads, batch)](
        words, words.stride(0), words.stride(1), words.stride(2),
        block_table, block_table.stride(0), seq_lens, query_start_loc, cache.shape[2],
        qs, qconst, k.shift, k.mask, v.shift, v.mask,
        part_max, part_sum, part_acc, chunk, num_splits,
        GROUP=group, ROWS=rows, BLOCK_T=block_t,
        K_NW=k.num_words, K_NWP=k.words_padded, K_KP=k.kmax_padded, K_STRADDLES=k.straddles,
        V_WORD0=v.word_offset, V_NW=v.num_words, V_NWP=v.words_padded, V_KP=v.kmax_padded,
        V_STRADDLES=v.straddles, VARIANT=variant, TABLES_IN_LOOP=tables_in_loop and variant > 0,
        VALID_ROWS=max_query_len * group, num_warps=num_warps, num_stages=num_stages)
    if compiled is not None:
        compiled.append(split_kernel)
    _kvtc_combine_kernel[(batch, num_heads)](
        part_max, part_sum, part_acc, chunk, num_splits, seq_lens, query_start_loc, qconst,
        v.mean, v.basis, v.scale, v.zero,
        out, out.stride(0), out.stride(1), lse, lse.stride(0),
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim,
        D_CHUNK=d_chunk, VC=v.columns, WRITE_LSE=return_lse, SPLIT_BLOCK=4, num_warps=8,
        num_stages=2)
    return (out, lse) if return_lse else out
