"""Baseline for benchmarks/kvtc_kernels.py: split-K decode attention over a
dense paged cache (bf16, or fp8 e4m3 with per-tensor scales), same block
table / GQA / multi-query conventions and the same launch structure as the
KVTC kernels, so the comparison isolates what the cache format costs.

Cache layout: [num_blocks, H, block_size, d] per K and V (head-major inside
a block, like the KVTC cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _dense_split_kernel(
        q_ptr, q_stride_t, q_stride_h, k_ptr, v_ptr, stride_block, stride_head, stride_slot,
        block_table_ptr, block_table_stride, seq_lens_ptr, query_start_loc_ptr, block_size,
        qk_scale, k_scale, v_scale, part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_T: tl.constexpr):
    split = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * chunk_len
    if start >= seq_len:
        return
    end = tl.minimum(start + chunk_len, seq_len)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok).to(tl.int64)[:, None] * q_stride_t
                + (head * GROUP + rows % GROUP)[:, None] * q_stride_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * (qk_scale * k_scale)).to(tl.bfloat16)
    last_visible = seq_len - num_q + tok
    run_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * block_table_stride
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        tok_ok = pos < end
        block = tl.load(table_row + pos // block_size, mask=tok_ok, other=0).to(tl.int64)
        row = block * stride_block + head * stride_head + (pos % block_size) * stride_slot
        k = tl.load(k_ptr + row[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
        visible = tok_ok[None, :] & (pos[None, :] <= last_visible[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=1))
        alpha = tl.exp2(run_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(probs, axis=1)
        v = tl.load(v_ptr + row[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(probs.to(tl.bfloat16), v.to(tl.bfloat16))
        run_max = new_max
    part = (seq * num_kv_heads + head).to(tl.int64) * num_splits + split
    tl.store(part_max_ptr + part * ROWS + rows, run_max)
    tl.store(part_sum_ptr + part * ROWS + rows, run_sum)
    tl.store(part_acc_ptr + part * ROWS * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
             acc * v_scale)


@triton.jit
def _dense_combine_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, chunk_len, num_splits, seq_lens_ptr,
        query_start_loc_ptr, out_ptr, out_stride_t, out_stride_h,
        GROUP: tl.constexpr, MAX_Q: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    pair = (seq * num_kv_heads + head).to(tl.int64)
    run_max = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    for split in range(0, tl.cdiv(seq_len, chunk_len)):
        part = pair * num_splits + split
        m = tl.load(part_max_ptr + part * ROWS + rows)
        s = tl.load(part_sum_ptr + part * ROWS + rows)
        a = tl.load(part_acc_ptr + part * ROWS * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :])
        new_max = tl.maximum(run_max, m)
        old_w = tl.exp2(run_max - new_max)
        new_w = tl.exp2(m - new_max)
        run_sum = run_sum * old_w + s * new_w
        acc = acc * old_w[:, None] + a * new_w[:, None]
        run_max = new_max
    tok = rows // GROUP
    row_ok = (rows < MAX_Q * GROUP) & (tok < num_q)
    o = acc / tl.where(run_sum > 0, run_sum, 1.0)[:, None]
    tl.store(out_ptr + (q_start + tok).to(tl.int64)[:, None] * out_stride_t
             + (head * GROUP + rows % GROUP)[:, None] * out_stride_h + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def dense_paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor,
                       query_start_loc: torch.Tensor, softmax_scale: float, max_query_len: int,
                       max_seq_len: int, num_splits: int, k_scale: float = 1.0,
                       v_scale: float = 1.0, block_t: int = 32, num_warps: int = 4,
                       num_stages: int = 2) -> torch.Tensor:
    """Decode attention over [blocks, H, block_size, d] bf16 or fp8 caches."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_heads = key_cache.shape[1]
    group = num_q_heads // num_heads
    batch = seq_lens.shape[0]
    rows = max(16, triton.next_power_of_2(max_query_len * group))
    chunk = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_t) * block_t
    dev = query.device
    part_max = torch.empty(batch, num_heads, num_splits, rows, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch, num_heads, num_splits, rows, head_dim, dtype=torch.float32,
                           device=dev)
    out = torch.empty_like(query)
    _dense_split_kernel[(num_splits, num_heads, batch)](
        query, query.stride(0), query.stride(1), key_cache, value_cache,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_table, block_table.stride(0), seq_lens, query_start_loc, key_cache.shape[2],
        softmax_scale * _LOG2E, k_scale, v_scale, part_max, part_sum, part_acc, chunk, num_splits,
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim, BLOCK_T=block_t,
        num_warps=num_warps, num_stages=num_stages)
    _dense_combine_kernel[(batch, num_heads)](
        part_max, part_sum, part_acc, chunk, num_splits, seq_lens, query_start_loc,
        out, out.stride(0), out.stride(1),
        GROUP=group, MAX_Q=max_query_len, ROWS=rows, HEAD_DIM=head_dim, num_warps=8)
    return out
