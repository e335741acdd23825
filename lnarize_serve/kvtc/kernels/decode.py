"""Decode attention straight from KVTC slots (flash-decoding with split-K).

Four launches per call:

1. ``_kvtc_project_kernel`` (sequence, KV head, column slab): project the GQA
   group's query rows into the key basis once,
   ``qs = (q . basis_j) * scale_j * softmax_scale * log2(e)`` (fp16 for the
   tensor cores), plus the per-row constant ``q . offset`` (offset = mean -
   sum_j zero_j scale_j basis_j), which only the LSE needs.
2. ``_kvtc_split_kernel`` (split, KV head, sequence): stream the split's
   slots, unpack codes with one rotate + mask each (per-column constants of
   the word grid, see tables.py; codes become the fp16 numbers
   1 + code * 2^(p - 10), the bias folded into the qs/scale/zero constants),
   scores = ``qs @ codes^T`` on tensor cores,
   online softmax, and accumulate ``p @ value codes`` in code space. Writes
   (max, sum, acc) per split.
3. ``_kvtc_merge_kernel`` (sequence x head, query row, column slab): merge
   all splits at once and turn code sums into coefficients
   ``(acc / l - zero) * scale``.
4. ``_kvtc_unproject_kernel`` (sequence, head, head_dim slab): one inverse
   projection per row, ``out = mean + coeff @ basis``.

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
        offset_ptr, basis_ptr, scale_ptr,
        qs_ptr, qconst_ptr, qk_scale,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr, C: tl.constexpr, SLAB: tl.constexpr, D_CHUNK: tl.constexpr):
    """qs[:, slab] = (q @ basis[slab]^T) * scale * qk_scale; slab 0 also writes
    the per-row constant q . offset * qk_scale. Grid (sequence, head, C / SLAB)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    slab = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    q_rows = q_ptr + (q_start + tok).to(tl.int64) * q_stride_t + (head * GROUP + rows % GROUP) * q_stride_h
    cols = slab * SLAB + tl.arange(0, SLAB)
    dk = tl.arange(0, D_CHUNK)
    proj = tl.zeros((ROWS, SLAB), dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, D_CHUNK):  # chunked: whole-d tiles spill at 32 rows
        q = tl.load(q_rows[:, None] + (d0 + dk)[None, :], mask=row_ok[:, None], other=0.0)
        basis = tl.load(basis_ptr + (head * C + cols)[:, None] * HEAD_DIM + (d0 + dk)[None, :])
        proj += tl.dot(q.to(tl.float32), tl.trans(basis), input_precision="tf32x3")  # ~fp32
    qs = proj * tl.load(scale_ptr + head * C + cols)[None, :] * qk_scale
    out = (seq * num_kv_heads + head).to(tl.int64)
    tl.store(qs_ptr + out * ROWS * C + rows[:, None] * C + cols[None, :], qs.to(tl.float16))
    if slab == 0:
        q_offset = tl.zeros((ROWS,), dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, D_CHUNK):
            q = tl.load(q_rows[:, None] + (d0 + dk)[None, :], mask=row_ok[:, None], other=0.0)
            q_offset += tl.sum(q.to(tl.float32)
                               * tl.load(offset_ptr + head * HEAD_DIM + d0 + dk)[None, :], axis=1)
        tl.store(qconst_ptr + out * ROWS + rows, q_offset * qk_scale)


@triton.jit
def _to_half(codes):
    """Small unsigned ints -> exact fp16 without the slow converter:
    0x6400 | c is the fp16 number 1024 + c."""
    return (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _rotate_right(x, n, USE_ASM: tl.constexpr):
    """x rotated right by n (1..31): one funnel shift (SHF.R.W) when compiled;
    the shift/or form under the interpreter (inline PTX cannot run there)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("shf.r.wrap.b32 $0, $1, $1, $2;", "=r,r,r",
                                         [x, n], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        return (x >> n) | (x << (32 - n))


@triton.jit
def _unit_half(words, rot, mask, USE_ASM: tl.constexpr):
    """Codes as fp16 numbers 1 + code * 2^(p - 10) (tables.py, unit_rot):
    rotate, truncate to 16 bits, mask and OR the exponent of 1.0 (after the
    truncation, so a packed pair of codes shares one LOP3; masking the 32-bit
    word first measured 15% slower). No fp16 subtraction: the bias and the
    unit are folded into the callers' per-column constants. A pair decode in
    inline PTX measured no faster (benchmarks/kvtc_decode_variants.py)."""
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
                          tl.broadcast_to(mask[None, :], (BLOCK_T, C)), USE_ASM)
    codes = lo >> shift[None, :]
    if STRADDLES:
        nxt = tl.load(wptrs + 1, mask=tok_ok[:, None] & (w + 1 < NW)[None, :], other=0)
        hi = tl.reshape(tl.broadcast_to(nxt.to(tl.uint32, bitcast=True)[:, :, None],
                                        (BLOCK_T, NWP, KP)), (BLOCK_T, C))
        codes = codes | ((hi << 1) << (31 - shift[None, :]))
    return _to_half(codes & mask[None, :])


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
        V_STRADDLES: tl.constexpr, VALID_ROWS: tl.constexpr,
        UNPACK: tl.constexpr = 0, USE_ASM: tl.constexpr = False):
    """Rows x tokens (codes are the dot's B operand), 2-D broadcast extract.
    The per-column shift/mask tables (L1-resident) are re-read every
    iteration instead of pinning ~4 registers per column.
    UNPACK 0: codes = (word >> shift) & mask, then 0x6400 | c - 1024 in fp16;
    UNPACK 1 (no straddling codes): unit-fp16 codes (see _unit_half), the
    tables are the unit_* ones, and the 1.0 bias leaves the scores through
    the row constant (sum of the fp16 qs) and the values through unit_zero
    (so the softmax sum is taken over the fp16 probabilities the value MMA
    sees). The other formulations measured are in
    benchmarks/kvtc_decode_variants.py."""
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
    kgrid = kcols
    vgrid = vcols
    k_shift = tl.load(k_shift_ptr + head * KC + kgrid).to(tl.uint32)
    k_mask = tl.load(k_mask_ptr + head * KC + kgrid).to(tl.uint32)
    v_shift = tl.load(v_shift_ptr + head * VC + vgrid).to(tl.uint32)
    v_mask = tl.load(v_mask_ptr + head * VC + vgrid).to(tl.uint32)
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
        # a loop-variant (always true) predicate keeps these loads in the loop
        k_live = kgrid < KC + (end - t0)
        v_live = vgrid < VC + (end - t0)
        k_shift = tl.load(k_shift_ptr + head * KC + kgrid, mask=k_live, other=0).to(tl.uint32)
        k_mask = tl.load(k_mask_ptr + head * KC + kgrid, mask=k_live, other=0).to(tl.uint32)
        v_shift = tl.load(v_shift_ptr + head * VC + vgrid, mask=v_live, other=0).to(tl.uint32)
        v_mask = tl.load(v_mask_ptr + head * VC + vgrid, mask=v_live, other=0).to(tl.uint32)
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
        v_codes = _codes_2d(cache_ptr + V_WORD0, slot_row, tok_ok, v_shift, v_mask,
                            V_NW, V_NWP, V_KP, BLOCK_T, V_STRADDLES, UNPACK, USE_ASM)
        acc = acc * alpha[:, None] + tl.dot(p16, v_codes)  # [ROWS, VC]
        run_max = new_max

    part = pair * num_splits + split
    row_ok = rows < VALID_ROWS  # padding rows of the MMA tile are never read back
    tl.store(part_max_ptr + part * ROWS + rows, run_max, mask=row_ok)
    tl.store(part_sum_ptr + part * ROWS + rows, run_sum, mask=row_ok)
    tl.store(part_acc_ptr + part * ROWS * VC + rows[:, None] * VC + vcols[None, :], acc,
             mask=row_ok[:, None])


@triton.jit
def _kvtc_merge_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits, num_kv_heads,
        seq_lens_ptr, query_start_loc_ptr, scale_ptr, zero_ptr, coeff_ptr,
        lse_ptr, lse_stride_t,
        GROUP: tl.constexpr, ROWS: tl.constexpr, VC: tl.constexpr, SLAB: tl.constexpr,
        SPLITS_P2: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Merge the splits of one (sequence, head, query row, column slab) in one
    shot (every split loaded at once: no serial chain of loads), and turn the
    code-space sums into basis coefficients ``(acc / l - zero) * scale``."""
    pair = tl.program_id(0)  # sequence * heads + head
    row = tl.program_id(1)
    slab = tl.program_id(2)
    seq = pair // num_kv_heads
    head = pair % num_kv_heads
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if row // GROUP >= num_q:
        return
    used = tl.cdiv(tl.load(seq_lens_ptr + seq), chunk_len)
    splits = tl.arange(0, SPLITS_P2)
    ok = splits < used
    part = pair.to(tl.int64) * num_splits + splits
    m = tl.load(part_max_ptr + part * ROWS + row, mask=ok, other=-1.0e30)
    top = tl.max(m, axis=0)
    weight = tl.where(ok, tl.exp2(m - top), 0.0)
    total = tl.sum(weight * tl.load(part_sum_ptr + part * ROWS + row, mask=ok, other=0.0), axis=0)
    cols = slab * SLAB + tl.arange(0, SLAB)
    acc = tl.load(part_acc_ptr + (part * ROWS + row)[:, None] * VC + cols[None, :],
                  mask=ok[:, None], other=0.0)
    # a row with nothing to read (all its positions exact) has total 0: coefficients
    # 0 (finite, so a caller's zero weight cancels it), LSE -inf
    merged = tl.where(total > 0, tl.sum(acc * weight[:, None], axis=0) / total, 0.0)
    coeff = (merged - tl.load(zero_ptr + head * VC + cols)) * tl.load(scale_ptr + head * VC + cols)
    tl.store(coeff_ptr + (pair.to(tl.int64) * ROWS + row) * VC + cols, coeff)
    if WRITE_LSE:
        if slab == 0:
            # natural-log LSE of the true scores (the per-row constant included),
            # so a caller can merge this with attention over uncompressed tokens
            lse = (top + tl.log2(total)) / 1.4426950408889634
            tl.store(lse_ptr + (q_start + row // GROUP).to(tl.int64) * lse_stride_t
                     + head * GROUP + row % GROUP, lse)


@triton.jit
def _kvtc_unproject_kernel(
        coeff_ptr, query_start_loc_ptr, mean_ptr, basis_ptr,
        out_ptr, out_stride_t, out_stride_h,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        VC: tl.constexpr, D_SLAB: tl.constexpr, C_CHUNK: tl.constexpr):
    """out[:, slab] = mean + coeff @ basis[:, slab]: one inverse projection per
    query row and head. Grid (sequence, head, head_dim / D_SLAB)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    slab = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    pair = (seq * num_kv_heads + head).to(tl.int64)
    dims = slab * D_SLAB + tl.arange(0, D_SLAB)
    ck = tl.arange(0, C_CHUNK)
    o = tl.zeros((ROWS, D_SLAB), dtype=tl.float32)
    for c0 in range(0, VC, C_CHUNK):
        coeff = tl.load(coeff_ptr + (pair * ROWS + rows)[:, None] * VC + (c0 + ck)[None, :],
                        mask=row_ok[:, None], other=0.0)
        basis = tl.load(basis_ptr + (head * VC + c0 + ck)[:, None] * HEAD_DIM + dims[None, :])
        o += tl.dot(coeff, basis, input_precision="tf32x3")
    o += tl.load(mean_ptr + head * HEAD_DIM + dims)[None, :]
    out_rows = out_ptr + (q_start + tok).to(tl.int64) * out_stride_t \
        + (head * GROUP + rows % GROUP) * out_stride_h
    tl.store(out_rows[:, None] + dims[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_t: int,
                       num_sms: int = 132, programs_per_sm: int = 8, min_chunk: int = 256) -> int:
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
                     compressed_range: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     block_t: int = 128, num_warps: int = 4, num_stages: int = 2,
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
    nothing gets LSE -inf and a finite output of no meaning). Codes are
    decoded as unit-fp16 numbers (UNPACK 1) when every code sits inside one
    32-bit word, else with the original 0x6400 decode (UNPACK 0).
    ``compiled``, if a list, receives the launched split kernel (for its
    register / spill / shared-memory report in the benchmarks).
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
    # the unit-fp16 decode reads each code from one word: straddling codes take the original
    unpack = 0 if k.straddles or v.straddles else 1
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
        V_STRADDLES=v.straddles, VALID_ROWS=valid_rows, UNPACK=unpack, USE_ASM=use_asm,
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
