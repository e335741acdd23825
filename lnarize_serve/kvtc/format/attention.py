"""Reference attention computed directly on KVTC slots in a paged cache.

Keys: q . k'_t = q . mean + sum_j (q . basis_j) * scale_j * (code_tj - zero_j),
so the query is projected into the key basis once and each cached token
costs r_k multiply-adds. Values: probabilities are accumulated over codes and
one inverse projection per (query, head) turns them back into a vector.
Readable loops over sequences; this is the ground truth for the kernels.
"""

from __future__ import annotations

import torch

from lnarize_serve.kvtc.format.codec import LayerCodec, decode_kv


def gather_slots(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Slots of positions 0..length-1 of one sequence -> [length, H, SLOT]."""
    block_size = cache.shape[2]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table_row[positions // block_size].long()
    offsets = positions % block_size
    return cache[blocks, :, offsets]


def write_slots(cache: torch.Tensor, slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """vLLM-style write: token i goes to flat slot ``slot_mapping[i]``
    (block = slot // block_size, offset = slot % block_size)."""
    block_size = cache.shape[2]
    blocks = (slot_mapping // block_size).long()
    offsets = (slot_mapping % block_size).long()
    cache[blocks, :, offsets] = slots


def _causal_mask(num_queries: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[n, L] True where query i (at position L - n + i) may see position t."""
    query_pos = seq_len - num_queries + torch.arange(num_queries, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= query_pos[:, None]


def attention_on_slots(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                       layer: LayerCodec, softmax_scale: float,
                       exact_keys: torch.Tensor | None = None,
                       exact_values: torch.Tensor | None = None,
                       sink_keys: torch.Tensor | None = None,
                       sink_values: torch.Tensor | None = None,
                       compressed_range: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                       return_lse: bool = False):
    """Attention of a batch of query tokens over a KVTC-compressed paged cache.

    query [T, Hq, d] (post-RoPE, sequences concatenated, Hq a multiple of H);
    sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] (n_b
    tokens, its *last* n_b positions out of seq_lens[b]); the cache holds
    slots for all seq_lens[b] positions. Query i attends causally to
    positions <= seq_lens[b] - n_b + i.

    If ``exact_keys``/``exact_values`` [T, H, d] are given, the query tokens'
    own positions use those uncompressed vectors instead of their slots, in the
    same softmax (the current chunk's tokens, as a backend has them in hand).
    If ``sink_keys``/``sink_values`` [B, S, H, d] are given, positions 0..S-1
    of sequence b use those exact vectors (the sink tokens the cache keeps
    uncompressed, see docs/kvtc-layout.md).
    ``compressed_range`` (lo [B], hi [B], window): of the compressed positions
    a query at position q attends only to lo[b] <= t < max(q - window + 1,
    hi[b]) (the caller merges the others in through the LSE).
    Returns fp32 [T, Hq, d], plus the natural-log LSE [T, Hq] when
    ``return_lse``; a row that attends to nothing gets LSE -inf (and output 0).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = layer.num_kv_heads
    group = num_q_heads // num_kv_heads
    if group * num_kv_heads != num_q_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    keys, values = layer.keys, layer.values
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32,
                      device=query.device)
    lse = torch.full((num_tokens, num_q_heads), float("-inf"), device=query.device)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        num_q, seq_len = end - start, int(seq_lens[b])
        if num_q == 0:
            continue
        q = query[start:end].to(torch.float32).view(num_q, num_kv_heads, group, head_dim)
        slots = gather_slots(cache, block_table[b], seq_len)
        key_codes = keys.unpack(slots[:, :, : layer.key_bytes]).float()
        value_codes = values.unpack(
            slots[:, :, layer.key_bytes: layer.key_bytes + layer.value_bytes]).float()

        # scores from codes: [n, H, g, L]
        q_coeff = torch.einsum("nhgd,hrd->nhgr", q, keys.basis) * keys.scale[None, :, None, :]
        constant = (torch.einsum("nhgd,hd->nhg", q, keys.mean)
                    - (q_coeff * keys.zero[None, :, None, :]).sum(-1))
        scores = constant[..., None] + torch.einsum("nhgr,lhr->nhgl", q_coeff, key_codes)
        # tokens attended from exact vectors: sinks, then the current chunk
        exact = torch.zeros(seq_len, dtype=torch.bool, device=query.device)
        k_exact = torch.zeros(seq_len, num_kv_heads, head_dim, device=query.device)
        v_exact = torch.zeros(seq_len, num_kv_heads, head_dim, device=query.device)
        if sink_keys is not None:
            num_sinks = min(sink_keys.shape[1], seq_len)
            exact[:num_sinks] = True
            k_exact[:num_sinks] = sink_keys[b, :num_sinks].float()
            v_exact[:num_sinks] = sink_values[b, :num_sinks].float()
        if exact_keys is not None:
            exact[seq_len - num_q:] = True
            k_exact[seq_len - num_q:] = exact_keys[start:end].float()
            v_exact[seq_len - num_q:] = exact_values[start:end].float()
        if bool(exact.any()):
            exact_scores = torch.einsum("nhgd,lhd->nhgl", q, k_exact)
            scores = torch.where(exact, exact_scores, scores)
        compressed = ~exact
        scores = scores * softmax_scale
        visible = _causal_mask(num_q, seq_len, query.device)
        if compressed_range is not None:
            lo, hi, window = int(compressed_range[0][b]), int(compressed_range[1][b]), compressed_range[2]
            positions = torch.arange(seq_len, device=query.device)
            query_pos = seq_len - num_q + torch.arange(num_q, device=query.device)
            row_end = torch.clamp(query_pos - window + 1, min=hi)  # [n]
            in_range = (positions[None, :] >= lo) & (positions[None, :] < row_end[:, None])
            visible = visible & (exact[None, :] | in_range)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [n, H, g]
        probs = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)
        lse[start:end] = row_lse.reshape(num_q, num_q_heads)

        # values in code space: one inverse projection per (query, head)
        probs_c = probs * compressed
        mass = probs_c.sum(-1)  # [n, H, g]
        acc = torch.einsum("nhgl,lhr->nhgr", probs_c, value_codes)
        coeff = (acc - values.zero[None, :, None, :] * mass[..., None]) * values.scale[None, :, None, :]
        o = (values.mean[None, :, None, :] * mass[..., None]
             + torch.einsum("nhgr,hrd->nhgd", coeff, values.basis))
        if bool(exact.any()):
            o = o + torch.einsum("nhgl,lhd->nhgd", probs * exact, v_exact)
        out[start:end] = o.reshape(num_q, num_q_heads, head_dim)
    return (out, lse) if return_lse else out


def dense_attention(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    query_start_loc: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Plain causal GQA attention; keys[b]/values[b] are [L_b, H, d] per sequence."""
    num_tokens, num_q_heads, head_dim = query.shape
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32,
                      device=query.device)
    for b, (k, v) in enumerate(zip(keys, values)):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        num_q, seq_len, num_kv_heads = end - start, k.shape[0], k.shape[1]
        if num_q == 0:
            continue
        group = num_q_heads // num_kv_heads
        q = query[start:end].to(torch.float32).view(num_q, num_kv_heads, group, head_dim)
        scores = torch.einsum("nhgd,lhd->nhgl", q, k.float()) * softmax_scale
        visible = _causal_mask(num_q, seq_len, query.device)[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        o = torch.einsum("nhgl,lhd->nhgd", probs, v.float())
        out[start:end] = o.reshape(num_q, num_q_heads, head_dim)
    return out


def decoded_sequences(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                      layer: LayerCodec) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode every sequence's slots back to dense fp32 keys and values."""
    keys, values = [], []
    for b in range(seq_lens.shape[0]):
        k, v = decode_kv(gather_slots(cache, block_table[b], int(seq_lens[b])), layer)
        keys.append(k)
        values.append(v)
    return keys, values
