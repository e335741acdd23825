"""The KVTC decode kernel's experimental formulations, for the benchmarks.

lnarize_serve/kvtc/kernels/decode.py is the production kernel, one path;
this is its split kernel with every formulation that was measured
(docs/kvtc-kernels.md), selected by knobs:

- ``variant`` 0: rows x tokens (codes are the dot's B operand), 3-D extract;
  1: the same with a 2-D broadcast extract (production); 2: tokens x rows
  (codes are the A operand, kept in registers), broadcast extract.
- ``tables_in_loop``: re-read the shift/mask tables every iteration
  (production) instead of pinning them in registers (variants 1-2).
- ``unpack`` 0: the original 0x6400 decode; 1: unit-fp16 (production where no
  code straddles a word); 2: unit-fp16 pairs in inline PTX (compiled only).

The project, merge and unproject kernels are production's, imported, so the
variants differ only in the split kernel. :func:`decoder` hands out the
production ``decode_attention`` for the production choice and this module's
for any other, so the benchmarks time the shipped kernel as the default.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lnarize_serve.kvtc.kernels import decode as production
from lnarize_serve.kvtc.kernels.decode import (_LOG2E, _kvtc_merge_kernel, _kvtc_project_kernel,
                                               _kvtc_unproject_kernel, _rotate_right, _to_half,
                                               default_num_splits)
from lnarize_serve.kvtc.kernels.launch import check_launchable
from lnarize_serve.kvtc.kernels.tables import LayerKernelTables

# what lnarize_serve's decode_attention does, in this module's knobs
PRODUCTION = {"variant": 1, "tables_in_loop": True, "unpack": None}
KNOBS = tuple(PRODUCTION)  # the knobs only this module's decode_attention takes


def decoder(variant: int = 1, tables_in_loop: bool = True, unpack: int | None = None):
    """decode_attention for these knobs: production's own function for the
    production choice, else this module's with the knobs bound."""
    knobs = {"variant": variant, "tables_in_loop": tables_in_loop, "unpack": unpack}
    if knobs == PRODUCTION:
        return production.decode_attention
    return functools.partial(decode_attention, **knobs)


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
def _unit_half(words, rot, mask, UNPACK: tl.constexpr, USE_ASM: tl.constexpr):
    """Codes as fp16 numbers 1 + code * 2^(p - 10) (tables.py, unit_rot):
    rotate, truncate to 16 bits, mask and OR the exponent of 1.0 (after the
    truncation, so a packed pair of codes shares one LOP3; masking the 32-bit
    word first measured 15% slower). No fp16 subtraction: the bias and the
    unit are folded into the callers' per-column constants. UNPACK 2 does a
    pair in PTX (two rotations, one PRMT, one LOP3, plus a mask-pair PRMT
    ptxas can share); it measured within noise of UNPACK 1 at one query token
    and up to 7% slower at batch 1 with 4, so it stays an option only."""
    if UNPACK == 2 and USE_ASM:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, p, m, k;
            shf.r.wrap.b32 a, $1, $1, $3;
            shf.r.wrap.b32 b, $2, $2, $4;
            prmt.b32 p, a, b, 0x5410;
            prmt.b32 m, $5, $6, 0x5410;
            mov.b32 k, 0x3C003C00;
            lop3.b32 $0, p, m, k, 0xEA;
            }""", "=r,r,r,r,r,r,r", [words, rot, mask], dtype=tl.float16, is_pure=True, pack=2)
    r = _rotate_right(words, rot, USE_ASM)
    bits = (r.to(tl.uint16) & mask.to(tl.uint16)) | 0x3C00
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _codes_2d(words_base, row, tok_ok, shift, mask, NW: tl.constexpr, NWP: tl.constexpr,
              KP: tl.constexpr, BLOCK_T: tl.constexpr, STRADDLES: tl.constexpr,
              UNPACK: tl.constexpr = 0, USE_ASM: tl.constexpr = False):
    """[BLOCK_T, C] fp16 codes with shift/mask as [C] vectors: the [T, NW]
    words are loaded once and broadcast to their KP columns each. UNPACK > 0:
    shift/mask are the unit-fp16 rotation/mask (no straddling codes)."""
    C: tl.constexpr = NWP * KP
    w = tl.arange(0, NWP)
    wptrs = words_base + row[:, None] + w[None, :]
    words = tl.load(wptrs, mask=tok_ok[:, None] & (w < NW)[None, :], other=0)
    lo = tl.reshape(tl.broadcast_to(words.to(tl.uint32, bitcast=True)[:, :, None],
                                    (BLOCK_T, NWP, KP)), (BLOCK_T, C))
    if UNPACK > 0:
        return _unit_half(lo, tl.broadcast_to(shift[None, :], (BLOCK_T, C)),
                          tl.broadcast_to(mask[None, :], (BLOCK_T, C)), UNPACK, USE_ASM)
    codes = lo >> shift[None, :]
    if STRADDLES:
        nxt = tl.load(wptrs + 1, mask=tok_ok[:, None] & (w + 1 < NW)[None, :], other=0)
        hi = tl.reshape(tl.broadcast_to(nxt.to(tl.uint32, bitcast=True)[:, :, None],
                                        (BLOCK_T, NWP, KP)), (BLOCK_T, C))
        codes = codes | ((hi << 1) << (31 - shift[None, :]))
    return _to_half(codes & mask[None, :])


@triton.jit
def _codes_2d_t(words_base, row, tok_ok, shift, mask, NW: tl.constexpr, NWP: tl.constexpr,
                KP: tl.constexpr, BLOCK_T: tl.constexpr, STRADDLES: tl.constexpr,
                UNPACK: tl.constexpr = 0, USE_ASM: tl.constexpr = False):
    """Transposed :func:`_codes_2d`: [C, BLOCK_T] (the A operand of p @ codes
    computed as codes^T @ p^T)."""
    C: tl.constexpr = NWP * KP
    w = tl.arange(0, NWP)
    wptrs = words_base + row[None, :] + w[:, None]
    words = tl.load(wptrs, mask=tok_ok[None, :] & (w < NW)[:, None], other=0)
    lo = tl.reshape(tl.broadcast_to(words.to(tl.uint32, bitcast=True)[:, None, :],
                                    (NWP, KP, BLOCK_T)), (C, BLOCK_T))
    if UNPACK > 0:
        return _unit_half(lo, tl.broadcast_to(shift[:, None], (C, BLOCK_T)),
                          tl.broadcast_to(mask[:, None], (C, BLOCK_T)), UNPACK, USE_ASM)
    codes = lo >> shift[:, None]
    if STRADDLES:
        nxt = tl.load(wptrs + 1, mask=tok_ok[None, :] & (w + 1 < NW)[:, None], other=0)
        hi = tl.reshape(tl.broadcast_to(nxt.to(tl.uint32, bitcast=True)[:, None, :],
                                        (NWP, KP, BLOCK_T)), (C, BLOCK_T))
        codes = codes | ((hi << 1) << (31 - shift[:, None]))
    return _to_half(codes & mask[:, None])


@triton.jit
def _kvtc_split_kernel(
        cache_ptr, stride_block, stride_head, stride_slot,
        block_table_ptr, block_table_stride, seq_lens_ptr, query_start_loc_ptr, block_size,
        qs_ptr, qconst_ptr, k_shift_ptr, k_mask_ptr, v_shift_ptr, v_mask_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits,
        range_lo_ptr, range_hi_ptr, window, HAS_RANGE: tl.constexpr,
        GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
        K_NW: tl.constexpr, K_NWP: tl.constexpr, K_KP: tl.constexpr, K_STRADDLES: tl.constexpr,
        V_WORD0: tl.constexpr, V_NW: tl.constexpr, V_NWP: tl.constexpr, V_KP: tl.constexpr,
        V_STRADDLES: tl.constexpr, VARIANT: tl.constexpr, TABLES_IN_LOOP: tl.constexpr,
        VALID_ROWS: tl.constexpr, UNPACK: tl.constexpr = 0, USE_ASM: tl.constexpr = False):
    """VARIANT 0: rows x tokens (codes are the dot's B operand), 3-D extract;
    1: same, 2-D broadcast extract; 2: tokens x rows (codes are the A
    operand, kept in registers), broadcast extract.
    TABLES_IN_LOOP re-reads the per-column shift/mask tables (L1-resident)
    every iteration instead of pinning ~4 registers per column (variants 1-3).
    UNPACK 0: codes = (word >> shift) & mask, then 0x6400 | c - 1024 in fp16;
    UNPACK 1/2 (variants 1-2, no straddling codes): unit-fp16 codes (see
    _unit_half), the tables are the unit_* ones, and the 1.0 bias leaves the
    scores through the row constant (sum of the fp16 qs) and the values
    through unit_zero (so the softmax sum is taken over the fp16 probabilities
    the value MMA sees)."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * chunk_len
    if start >= seq_len:
        return  # the combine kernel only reads splits that hold tokens
    end = tl.minimum(start + chunk_len, seq_len)
    first = 0
    hi = seq_len
    if HAS_RANGE:
        first = tl.load(range_lo_ptr + seq)
        hi = tl.load(range_hi_ptr + seq)
        # the newest row reads furthest: up to max(seq_len - window, hi)
        end = tl.minimum(end, tl.maximum(seq_len - window, hi))
    num_q = tl.load(query_start_loc_ptr + seq + 1) - tl.load(query_start_loc_ptr + seq)

    KC: tl.constexpr = K_NWP * K_KP
    VC: tl.constexpr = V_NWP * V_KP
    TRANSPOSED: tl.constexpr = VARIANT == 2
    rows = tl.arange(0, ROWS)
    kcols = tl.arange(0, KC)
    vcols = tl.arange(0, VC)
    # the last position each row may see (rows past num_q compute harmless values)
    last_visible = seq_len - num_q + rows // GROUP
    if HAS_RANGE:
        # each row's compressed positions end where its own window begins
        last_visible = tl.minimum(last_visible, tl.maximum(last_visible - window + 1, hi) - 1)
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
        if UNPACK > 0:
            qconst = qconst - tl.sum(qs.to(tl.float32), axis=0)
    else:
        qs = tl.load(qs_ptr + pair * ROWS * KC + rows[:, None] * KC + kcols[None, :])  # [ROWS, KC]
        acc = tl.zeros((ROWS, VC), dtype=tl.float32)
        if UNPACK > 0:
            qconst = qconst - tl.sum(qs.to(tl.float32), axis=1)

    run_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros((ROWS,), dtype=tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * block_table_stride
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        tok_ok = (pos < end) & (pos >= first)
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
                                K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES, UNPACK, USE_ASM)
            scores = tl.dot(k_codes, qs) + qconst[None, :]  # [T, ROWS]
            visible = tok_ok[:, None] & (pos[:, None] <= last_visible[None, :])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=0))
            alpha = tl.exp2(run_max - new_max)
            probs = tl.exp2(scores - new_max[None, :])
            p16 = probs.to(tl.float16)
            if UNPACK > 0:
                run_sum = run_sum * alpha + tl.sum(p16.to(tl.float32), axis=0)
            else:
                run_sum = run_sum * alpha + tl.sum(probs, axis=0)
            v_codes = _codes_2d_t(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                  V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES, UNPACK, USE_ASM)
            acc = acc * alpha[None, :] + tl.dot(v_codes, p16)  # [VC, ROWS]
        else:
            if VARIANT == 0:
                k_codes = _codes_3d(cache_ptr, slot_row, tok_ok, k_shift, k_mask,
                                    K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES)
            else:
                k_codes = _codes_2d(cache_ptr, slot_row, tok_ok, k_shift, k_mask,
                                    K_NW, K_NWP, K_KP, BLOCK_T, K_STRADDLES, UNPACK, USE_ASM)
            scores = tl.dot(qs, tl.trans(k_codes)) + qconst[:, None]  # [ROWS, T]
            visible = tok_ok[None, :] & (pos[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            alpha = tl.exp2(run_max - new_max)
            probs = tl.exp2(scores - new_max[:, None])
            p16 = probs.to(tl.float16)
            if UNPACK > 0:
                run_sum = run_sum * alpha + tl.sum(p16.to(tl.float32), axis=1)
            else:
                run_sum = run_sum * alpha + tl.sum(probs, axis=1)
            if VARIANT == 0:
                v_codes = _codes_3d(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                    V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES)
            else:
                v_codes = _codes_2d(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                                    V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES, UNPACK, USE_ASM)
            acc = acc * alpha[:, None] + tl.dot(p16, v_codes)  # [ROWS, VC]
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


def decode_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     tables: LayerKernelTables, softmax_scale: float, max_query_len: int,
                     max_seq_len: int, num_splits: int | None = None,
                     out: torch.Tensor | None = None, return_lse: bool = False,
                     compressed_range: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     block_t: int = 128, num_warps: int = 4, num_stages: int = 2,
                     variant: int = 1, tables_in_loop: bool = True, unpack: int | None = None,
                     compiled: list | None = None):
    """Attention of query tokens over a KVTC paged cache, causal over the new ones.

    query [T, Hq, d] post-RoPE, sequence b owning rows
    ``query_start_loc[b]:query_start_loc[b+1]`` (1..max_query_len of them, the
    last positions of ``seq_lens[b]``, already written to the cache). cache is
    uint8 [blocks, H, block_size, SLOT_BYTES]; block_table [B, max_blocks]
    int32. ``max_seq_len`` bounds seq_lens (a static bound keeps the launch
    CUDA-graph safe). Returns out [T, Hq, d] (query's dtype unless ``out``),
    plus the natural-log LSE [T, Hq] fp32 when ``return_lse``.
    ``compressed_range`` (lo, hi, window), int32 [B] each and an int: a
    query row of sequence b at position q reads only positions
    lo[b] <= t < max(q - window + 1, hi[b]) (the caller attends to the others
    from exact vectors and merges through the LSE: the sink before lo, each
    row's last ``window`` positions or the suffix from hi; a row that reads
    nothing gets LSE -inf and a finite output of no meaning). ``variant``
    selects the split kernel's formulation (see _kvtc_split_kernel);
    ``unpack`` its code decoding (None: the unit-fp16 decode, UNPACK 1, where
    it applies, i.e. variants 1-2 without straddling codes; else the original
    0x6400 decode, UNPACK 0, which is also what 0 forces);
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
    if num_splits > 1024:
        raise ValueError(f"num_splits {num_splits} > 1024 (the merge loads all splits at once)")
    chunk = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_t) * block_t
    if out is None:
        out = torch.empty_like(query)
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=query.device) \
        if return_lse else out
    k, v = tables.keys, tables.values
    dev = query.device
    valid_rows = max_query_len * group
    qs = torch.empty(batch, num_heads, rows, k.columns, dtype=torch.float16, device=dev)
    qconst = torch.empty(batch, num_heads, rows, dtype=torch.float32, device=dev)
    part_max = torch.empty(batch, num_heads, num_splits, rows, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch, num_heads, num_splits, rows, v.columns,
                           dtype=torch.float32, device=dev)
    coeff = torch.empty(batch, num_heads, rows, v.columns, dtype=torch.float32, device=dev)
    words = cache.view(torch.int32)
    slab = min(64, k.columns)
    unit_ok = variant in (1, 2) and not k.straddles and not v.straddles
    if unpack is None:
        unpack = 1 if unit_ok else 0
    if unpack and not unit_ok:
        raise ValueError(f"unpack={unpack} needs variant 1 or 2 and word-packed offsets "
                         "(no straddling codes); use unpack=0")
    # the unit-fp16 decode folds its bias and unit into the scale/zero tables
    k_scale = k.unit_scale if unpack else k.scale
    v_scale, v_zero = (v.unit_scale, v.unit_zero) if unpack else (v.scale, v.zero)
    k_shift, k_mask = (k.unit_rot, k.unit_mask) if unpack else (k.shift, k.mask)
    v_shift, v_mask = (v.unit_rot, v.unit_mask) if unpack else (v.shift, v.mask)
    use_asm = type(_kvtc_split_kernel).__name__ != "InterpretedFunction"

    _kvtc_project_kernel[(batch, num_heads, k.columns // slab)](
        query, query.stride(0), query.stride(1), query_start_loc,
        k.offset, k.basis, k_scale, qs, qconst, softmax_scale * _LOG2E,
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim, C=k.columns,
        SLAB=slab, D_CHUNK=min(32, head_dim), num_warps=4)
    split_kernel = _kvtc_split_kernel[(num_splits, num_heads, batch)](
        words, words.stride(0), words.stride(1), words.stride(2),
        block_table, block_table.stride(0), seq_lens, query_start_loc, cache.shape[2],
        qs, qconst, k_shift, k_mask, v_shift, v_mask,
        part_max, part_sum, part_acc, chunk, num_splits,
        *(compressed_range if compressed_range is not None else (seq_lens, seq_lens, 0)),
        HAS_RANGE=compressed_range is not None,
        GROUP=group, ROWS=rows, BLOCK_T=block_t,
        K_NW=k.num_words, K_NWP=k.words_padded, K_KP=k.kmax_padded, K_STRADDLES=k.straddles,
        V_WORD0=v.word_offset, V_NW=v.num_words, V_NWP=v.words_padded, V_KP=v.kmax_padded,
        V_STRADDLES=v.straddles, VARIANT=variant, TABLES_IN_LOOP=tables_in_loop and variant > 0,
        VALID_ROWS=valid_rows, UNPACK=unpack, USE_ASM=use_asm,
        num_warps=num_warps, num_stages=num_stages)
    if compiled is not None:
        compiled.append(split_kernel)
    merge_slab = min(32, v.columns)
    _kvtc_merge_kernel[(batch * num_heads, valid_rows, v.columns // merge_slab)](
        part_max, part_sum, part_acc, chunk, num_splits, num_heads, seq_lens, query_start_loc,
        v_scale, v_zero, coeff, lse, lse.stride(0),
        GROUP=group, ROWS=rows, VC=v.columns, SLAB=merge_slab,
        SPLITS_P2=triton.next_power_of_2(num_splits), WRITE_LSE=return_lse, num_warps=4)
    d_slab = min(64, head_dim)
    _kvtc_unproject_kernel[(batch, num_heads, head_dim // d_slab)](
        coeff, query_start_loc, v.mean, v.basis, out, out.stride(0), out.stride(1),
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim, VC=v.columns,
        D_SLAB=d_slab, C_CHUNK=32, num_warps=4)
    return (out, lse) if return_lse else out
