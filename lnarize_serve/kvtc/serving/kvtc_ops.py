"""The KVTC backend's glue and the two device-specific operations under it.

The glue (batch split, exact tokens, prefill) is the same on every device;
it calls an object with this interface:

- ``write``: compress the step's K/V into their slots.
- ``decode``: attention of short queries (decode, MTP verification: at most
  ``DECODE_MAX_QUERY`` tokens per sequence) over a range of each sequence's
  compressed positions; the new tokens were written first, so they are read
  back compressed like the rest. Returns the output and its LSE, so the glue
  can merge in tokens it serves exactly (the sink, :mod:`sink`; the window,
  :mod:`window`).

CPU: the codec's torch reference. CUDA: the Triton kernels. Prefill chunks
(longer rows) take one path on both: each sequence's compressed history is
decoded to dense K/V once, exact tokens substituted, and SDPA runs over it
plus the chunk's own uncompressed K/V, in query blocks (bounded memory at
long contexts; there is no prefill kernel on slots yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lnarize_serve.kvtc.format.attention import attention_on_slots, gather_slots
from lnarize_serve.kvtc.format.attention import write_slots as write_slots_reference
from lnarize_serve.kvtc.format.codec import LayerCodec, decode_kv, encode_kv
from lnarize_serve.kvtc.serving.sink import SinkConstants, sink_flags, snap_to_sink
from lnarize_serve.kvtc.serving.window import LayerWindow, WindowStep

# Longest per-sequence query treated as decode/verify (the Triton decode
# kernel's limit; MTP n=3 verification is 4).
DECODE_MAX_QUERY = 16


class KVTCOps(Protocol):
    def write(self, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
              slot_mapping: torch.Tensor, codec: LayerCodec) -> None: ...

    def decode(self, query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, query_start_loc: torch.Tensor, codec: LayerCodec,
               softmax_scale: float, max_query_len: int, max_seq_len: int,
               compressed_range: tuple[torch.Tensor, torch.Tensor, int] | None
               ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchReferenceOps:
    """The codec's reference implementation (any device; used on CPU)."""

    def write(self, key, value, cache, slot_mapping, codec):
        # rows past the slot mapping are padding (CUDA-graph sizes); so are -1 slots
        key, value = key[: slot_mapping.shape[0]], value[: slot_mapping.shape[0]]
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
        write_slots_reference(cache, encode_kv(key, value, codec), slot_mapping)

    def decode(self, query, cache, block_table, seq_lens, query_start_loc, codec,
               softmax_scale, max_query_len, max_seq_len, compressed_range):
        return attention_on_slots(query, cache, block_table, seq_lens, query_start_loc,
                                  codec, softmax_scale, compressed_range=compressed_range,
                                  return_lse=True)


class TritonOps(TorchReferenceOps):
    """The Triton write and decode ops of the KVTC kernels (CUDA)."""

    def __init__(self) -> None:
        from lnarize_serve.kvtc import kernels

        self._kernels = kernels
        self._tables: dict[int, object] = {}

    def _tables_for(self, codec: LayerCodec):
        tables = self._tables.get(id(codec))
        if tables is None:
            tables = self._kernels.prepare_layer_tables(codec)
            self._tables[id(codec)] = tables
        return tables

    def write(self, key, value, cache, slot_mapping, codec):
        self._kernels.write_slots(key, value, slot_mapping, cache, self._tables_for(codec))

    def decode(self, query, cache, block_table, seq_lens, query_start_loc, codec,
               softmax_scale, max_query_len, max_seq_len, compressed_range):
        return self._kernels.decode_attention(
            query, cache, block_table, seq_lens, query_start_loc, self._tables_for(codec),
            softmax_scale, max_query_len, max_seq_len, compressed_range=compressed_range,
            return_lse=True)


def prefill_over_decoded_history(query, cache, block_table, seq_lens, query_start_loc, codec,
                                 softmax_scale, exact_keys, exact_values,
                                 history_fixes=None, query_block: int = 512) -> torch.Tensor:
    """Prefill chunks over a compressed history, with SDPA: the history
    (positions before the chunk) is decoded from its slots once per sequence,
    ``history_fixes(b, keys, values)`` puts exact tokens in place (the sink,
    the window), the chunk's own K/V are exact, and queries go in blocks of
    ``query_block`` so the score matrix stays bounded at long contexts."""
    num_kv_heads = codec.num_kv_heads
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        num_q = end - start
        if num_q == 0:
            continue
        history = seq_len - num_q
        k_exact = exact_keys[start:end].float()
        v_exact = exact_values[start:end].float()
        if history:
            k_hist, v_hist = decode_kv(gather_slots(cache, block_table[b], seq_len)[:history], codec)
            if history_fixes is not None:
                history_fixes(b, k_hist, v_hist)
            keys, values = torch.cat([k_hist, k_exact]), torch.cat([v_hist, v_exact])
        else:
            keys, values = k_exact, v_exact
        keys = keys.transpose(0, 1)  # [H, L, d]
        values = values.transpose(0, 1)
        positions = torch.arange(seq_len, device=query.device)
        for q0 in range(0, num_q, query_block):
            q1 = min(num_q, q0 + query_block)
            q = query[start + q0:start + q1].float().transpose(0, 1)  # [Hq, n, d]
            visible = positions[None, :] <= (history + torch.arange(q0, q1, device=query.device))[:, None]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=visible, scale=softmax_scale,
                enable_gqa=q.shape[0] != num_kv_heads)
            out[start + q0:start + q1] = o.transpose(0, 1)
    return out


def merge_exact(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    """Add exact tokens to attention computed without them.

    out [T, Hq, d] and lse [T, Hq] (natural log, -inf where nothing was read)
    come from the compressed positions; row t also attends to the exact
    tokens ``keys/values[t, e]`` ([T, E, H, d]) where ``mask[t, e]``. Softmax
    over the union = LSE-weighted merge. Every row attends to something.
    """
    num_tokens, num_q_heads, head_dim = query.shape
    heads = keys.shape[2]
    group = num_q_heads // heads
    q = query.view(num_tokens, heads, group, head_dim).float()
    score = torch.einsum("thgd,tehd->thge", q, keys.float()) * softmax_scale
    score.masked_fill_(~mask[:, None, None, :], float("-inf"))
    lse = lse.view(num_tokens, heads, group)
    top = torch.maximum(lse, score.amax(dim=-1)).clamp_min_(-1e30)  # finite: no inf - inf
    w_compressed = (lse - top).exp_()
    probs = (score - top[..., None]).exp_()
    merged = out.float().view(num_tokens, heads, group, head_dim) * w_compressed[..., None]
    merged += torch.einsum("thge,tehd->thgd", probs, values.float())
    merged /= (w_compressed + probs.sum(dim=-1))[..., None]
    return merged.view(num_tokens, num_q_heads, head_dim)


def ops_for_device(device: torch.device) -> KVTCOps:
    return TritonOps() if device.type == "cuda" else TorchReferenceOps()


@dataclass
class ExactTokens:
    """What one layer serves exactly besides the current chunk: the
    position-0 sink and/or the recent-token window (its copies and this
    step's bookkeeping)."""

    sink: SinkConstants | None = None
    window: LayerWindow | None = None
    step: WindowStep | None = None
    window_tokens: int = 0  # W: each query row reads its last W positions exactly

    @property
    def has_window(self) -> bool:
        return self.window is not None and self.step is not None


def real_request_count(query_start_loc_cpu: torch.Tensor) -> int:
    """Requests of the step without the trailing empty ones vLLM pads a
    batch with for a captured CUDA-graph size (every real request has a token)."""
    query_lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
    count = len(query_lens)
    while count and query_lens[count - 1] == 0:
        count -= 1
    return count


def kvtc_write(ops: KVTCOps, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
               slot_mapping: torch.Tensor, codec: LayerCodec,
               exact: ExactTokens | None = None, num_actual_tokens: int | None = None) -> None:
    """Compress the step's K/V; sink-like tokens are stored as the exact
    sink's fixed pattern (see :mod:`sink`); window copies are kept exact.

    Only the first ``num_actual_tokens`` rows are the step's tokens (default:
    the slot mapping's length): under CUDA graphs key/value, and in vLLM's
    V2 runner the slot mapping too (with -1), are padded to a captured size.
    """
    num_tokens = slot_mapping.shape[0]
    if num_actual_tokens is not None:
        num_tokens = min(num_tokens, num_actual_tokens)
    if key.shape[0] < num_tokens or value.shape[0] < num_tokens:
        raise ValueError(f"KVTC write: {num_tokens} tokens to write, key/value have "
                         f"{key.shape[0]}/{value.shape[0]} rows")
    key, value, slot_mapping = key[:num_tokens], value[:num_tokens], slot_mapping[:num_tokens]
    if num_tokens == 0:
        return
    exact = exact or ExactTokens()
    if exact.has_window:
        exact.window.write(key, value, exact.step)
    if exact.sink is not None:
        key, value = snap_to_sink(key, value, exact.sink)
    ops.write(key, value, cache, slot_mapping, codec)


def kvtc_attention(ops: KVTCOps, query: torch.Tensor, cache: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, query_start_loc_cpu: torch.Tensor,
                   codec: LayerCodec, softmax_scale: float,
                   exact_keys: torch.Tensor | None, exact_values: torch.Tensor | None,
                   max_seq_len: int, exact: ExactTokens | None = None) -> torch.Tensor:
    """The glue: split the batch into decode rows and prefill rows, run each.

    The metadata builder moves rows with at most DECODE_MAX_QUERY tokens to
    the front (vLLM's batch reordering), so decode rows are a prefix.
    Exact tokens (``exact``): the sink (sequences whose position-0 slot holds
    its pattern) and the window's exact suffix. Decode reads only the
    positions between them from the slots and merges the exact ones in
    through the LSE; prefill substitutes them in the decoded history.
    """
    exact = exact or ExactTokens()
    # the step's real rows: query/key/value may be padded to a CUDA-graph size,
    # the batch to a captured request count (empty requests at the end)
    num_reqs = real_request_count(query_start_loc_cpu)
    query_lens = (query_start_loc_cpu[1:num_reqs + 1] - query_start_loc_cpu[:num_reqs]).tolist()
    num_tokens = int(query_start_loc_cpu[num_reqs])
    query = query[:num_tokens]
    if exact_keys is not None and exact_values is not None:
        exact_keys, exact_values = exact_keys[:num_tokens], exact_values[:num_tokens]
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] <= DECODE_MAX_QUERY:
        num_decodes += 1
    if any(n <= DECODE_MAX_QUERY for n in query_lens[num_decodes:] if n > 0):
        raise RuntimeError("KVTC: decode rows must precede prefill rows in the batch")
    num_decode_tokens = int(query_start_loc_cpu[num_decodes])
    device = query.device
    lens_all = seq_lens[:num_reqs]
    sink = exact.sink
    flags = sink_flags(cache, block_table[:num_reqs], sink) if sink is not None else None
    window = None
    if exact.has_window:
        first = flags.to(torch.int64) if flags is not None else torch.zeros_like(lens_all)
        window = exact.window.exact_suffix(exact.step, first)
    out = torch.empty(num_tokens, query.shape[1], query.shape[2], dtype=torch.float32,
                      device=device)
    if num_decodes:
        lens = lens_all[:num_decodes]
        compressed_range = None
        if flags is not None or window is not None:
            # compressed positions: after the sink, before each row's own window
            # (its last W positions, within the exact suffix of the pool window)
            hi = lens if window is None else lens - window[:num_decodes].sum(dim=1).to(lens.dtype)
            lo = flags[:num_decodes].to(lens.dtype) if flags is not None else torch.zeros_like(lens)
            compressed_range = (lo, hi,
                                exact.window_tokens if window is not None else 0)
        decoded, lse = ops.decode(
            query[:num_decode_tokens], cache, block_table[:num_decodes], lens,
            query_start_loc[: num_decodes + 1], codec, softmax_scale,
            max(query_lens[:num_decodes]), max_seq_len, compressed_range=compressed_range)
        if compressed_range is not None:
            decoded = _merge_decode_exact(decoded, lse, query[:num_decode_tokens], exact, flags,
                                          window, lens, query_lens[:num_decodes], softmax_scale)
        out[:num_decode_tokens] = decoded.float()
    if num_decodes < num_reqs and num_decode_tokens < num_tokens:
        if exact_keys is None or exact_values is None:
            raise RuntimeError("KVTC prefill needs the chunk's keys and values")

        def history_fixes(b: int, k_hist: torch.Tensor, v_hist: torch.Tensor) -> None:
            seq = num_decodes + b
            if flags is not None and bool(flags[seq]):
                k_hist[0], v_hist[0] = sink.keys_f32, sink.values_f32
            if window is not None:
                positions = exact.step.positions[seq]
                history = k_hist.shape[0]
                use = window[seq] & (positions < history) & (
                    positions >= history - exact.window_tokens)
                rows = exact.step.read_row[seq][use]
                k_hist[positions[use]] = exact.window.keys[rows].float()
                v_hist[positions[use]] = exact.window.values[rows].float()

        out[num_decode_tokens:] = prefill_over_decoded_history(
            query[num_decode_tokens:], cache, block_table[num_decodes:num_reqs],
            seq_lens[num_decodes:num_reqs],
            query_start_loc[num_decodes:num_reqs + 1] - num_decode_tokens,
            codec, softmax_scale, exact_keys[num_decode_tokens:],
            exact_values[num_decode_tokens:],
            history_fixes=history_fixes if (flags is not None or window is not None) else None)
    return out


def _merge_decode_exact(decoded, lse, query, exact: ExactTokens, flags, window, lens,
                        query_lens: list[int], softmax_scale: float) -> torch.Tensor:
    """Decode rows: merge the sink and the window's exact suffix (causal per
    row: an MTP verify row sees window positions up to its own)."""
    device = query.device
    num_decodes = len(query_lens)
    # row -> sequence and row -> distance from the end, from the CPU lengths: no sync
    cpu = torch.device("cpu")
    row_seq_cpu = torch.repeat_interleave(torch.arange(num_decodes, device=cpu),
                                          torch.tensor(query_lens, device=cpu))
    from_end = torch.cat([torch.arange(n - 1, -1, -1, device=cpu) for n in query_lens])
    row_seq = row_seq_cpu.to(device, non_blocking=True)
    # row i of a sequence with n new tokens sits at position seq_len - n + i
    row_position = lens.to(torch.int64)[row_seq] - 1 - from_end.to(device, non_blocking=True)
    num_rows = query.shape[0]
    keys, values, masks = [], [], []
    if flags is not None:
        sink = exact.sink
        keys.append(sink.keys[None, None].expand(num_rows, 1, *sink.keys.shape))
        values.append(sink.values[None, None].expand(num_rows, 1, *sink.values.shape))
        masks.append(flags[row_seq][:, None])
    if window is not None:
        rows = exact.step.read_row[:num_decodes][row_seq]  # [R, W]
        keys.append(exact.window.keys[rows])
        values.append(exact.window.values[rows])
        positions = exact.step.positions[:num_decodes][row_seq]
        # each row's own window: its last W positions, itself included
        own = (positions <= row_position[:, None]) & (
            positions > row_position[:, None] - exact.window_tokens)
        masks.append(window[:num_decodes][row_seq] & own)
    return merge_exact(decoded, lse, query, torch.cat(keys, 1), torch.cat(values, 1),
                       torch.cat(masks, 1), softmax_scale)
