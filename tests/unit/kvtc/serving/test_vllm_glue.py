"""Pure-logic parts of the KVTC vLLM integration (no engine)."""

import pytest
import torch

from lnarize_serve.kvtc.format.attention import attention_on_slots, write_slots
from lnarize_serve.kvtc.format.calibration import CalibrationError
from lnarize_serve.kvtc.format.codec import encode_kv
from lnarize_serve.kvtc.format.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.format.attention import decoded_sequences, dense_attention
from lnarize_serve.kvtc.serving.kvtc_ops import (
    ExactTokens,
    TorchReferenceOps,
    kvtc_attention,
    kvtc_write,
    real_request_count,
)
from lnarize_serve.kvtc.serving.model_codecs import layer_index_for
from lnarize_serve.kvtc.serving.runtime_config import KVTCConfigError, KVTCRuntimeConfig, kvtc_enabled
from lnarize_serve.kvtc.serving.sink import SinkConstants, sink_flags, snap_to_sink
from lnarize_serve.kvtc.serving.window import LayerWindow, WindowPool, pool_entries, pool_window


def test_layer_names_map_to_calibrated_layers():
    full = [3, 7]
    assert layer_index_for("model.layers.3.self_attn.attn", full, 8) == 3
    assert layer_index_for("model.layers.7.self_attn.attn", full, 8) == 7
    # the MTP draft layer reuses the last target layer's calibration
    assert layer_index_for("model.layers.8.self_attn.attn", full, 8) == 7
    assert layer_index_for("mtp.layers.0.self_attn.attn", full, 8) == 7
    with pytest.raises(CalibrationError, match="no KVTC calibration"):
        layer_index_for("model.layers.2.self_attn.attn", full, 8)


def test_runtime_config_round_trips_through_vllm_additional_config(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"x")
    runtime = KVTCRuntimeConfig(str(path), 1, 128)
    # other plugins' entries beside ours are left alone
    additional = {"other": {"x": 1}, **runtime.as_additional_config()}
    assert KVTCRuntimeConfig.from_additional_config(additional) == runtime
    # written by hand (e.g. LLM(additional_config=...)): unset counts mean 0
    assert KVTCRuntimeConfig.from_additional_config(
        {"lnarize_kvtc": {"calibration": str(path)}}) == KVTCRuntimeConfig(str(path), 0, 0)


@pytest.mark.parametrize(("additional", "named"), [
    (None, r"additional_config\['lnarize_kvtc'\] is missing"),
    ({"lnarize_kvtc": "on"}, r"additional_config\['lnarize_kvtc'\] is missing or not a mapping"),
    ({"lnarize_kvtc": {"calibration": "/no/such/file"}}, r"\['calibration'\]='/no/such/file'"),
    ({"lnarize_kvtc": {"calibration": "CAL", "sink_tokens": "1"}}, r"\['sink_tokens'\]='1'"),
    ({"lnarize_kvtc": {"calibration": "CAL", "sink_tokens": True}}, r"\['sink_tokens'\]=True"),
    ({"lnarize_kvtc": {"calibration": "CAL", "window_tokens": -1}}, r"\['window_tokens'\]=-1"),
])
def test_malformed_additional_config_names_the_entry(tmp_path, additional, named):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"x")
    if isinstance(additional, dict) and isinstance(additional["lnarize_kvtc"], dict):
        section = additional["lnarize_kvtc"]
        if section["calibration"] == "CAL":
            section["calibration"] = str(path)
    with pytest.raises(KVTCConfigError, match=named):
        KVTCRuntimeConfig.from_additional_config(additional)


def test_plugin_switch_is_a_boolean():
    assert kvtc_enabled({}) is False and kvtc_enabled({"LNARIZE_KVTC_ENABLE": "1"}) is True
    with pytest.raises(KVTCConfigError, match="not a boolean"):
        kvtc_enabled({"LNARIZE_KVTC_ENABLE": "maybe"})


def test_glue_splits_decode_and_prefill_rows_like_separate_calls():
    """A mixed batch (a 3-token verify row, then a 40-token prefill chunk over
    history) gives what the reference op gives for each row on its own."""
    codec, stats = random_layer_codec(2, 64, seed=3)
    gen = torch.Generator().manual_seed(0)
    block_size, lens = 16, [21, 70]
    query_lens = [3, 40]
    cache = torch.zeros(12, 2, block_size, codec.slot_bytes, dtype=torch.uint8)
    block_table = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], dtype=torch.int32)
    keys = [sample_from_statistics(stats["keys"], n, gen) for n in lens]
    values = [sample_from_statistics(stats["values"], n, gen) for n in lens]
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = block_table[b][pos // block_size].long() * block_size + pos % block_size
        write_slots(cache, encode_kv(keys[b], values[b], codec), slots)
    query = torch.randn(sum(query_lens), 4, 64, generator=gen)
    qsl = torch.tensor([0, 3, 43])
    seq_lens = torch.tensor(lens)
    chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
    chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
    out = kvtc_attention(TorchReferenceOps(), query, cache, block_table, seq_lens, qsl, qsl,
                         codec, 0.125, chunk_k, chunk_v, max_seq_len=70)
    decode = attention_on_slots(query[:3], cache, block_table[:1], seq_lens[:1], qsl[:2], codec, 0.125)
    prefill = attention_on_slots(query[3:], cache, block_table[1:], seq_lens[1:], qsl[1:] - 3, codec,
                                 0.125, exact_keys=chunk_k[3:], exact_values=chunk_v[3:])
    torch.testing.assert_close(out[:3], decode)
    torch.testing.assert_close(out[3:], prefill)


def _paged(codec, stats, lens, block_size, gen, first_tokens=None):
    """A paged cache for sequences of ``lens`` tokens (sampled K/V); the first
    token of sequence b is ``first_tokens[b]`` (K, V) when given."""
    blocks = [-(-n // block_size) for n in lens]
    cache = torch.zeros(sum(blocks) + 1, codec.num_kv_heads, block_size, codec.slot_bytes,
                        dtype=torch.uint8)
    block_table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 1  # block 0 stays unused: a zero block table row must not look like data
    keys, values = [], []
    for b, n in enumerate(lens):
        block_table[b, :blocks[b]] = torch.arange(used, used + blocks[b])
        used += blocks[b]
        k = sample_from_statistics(stats["keys"], n, gen)
        v = sample_from_statistics(stats["values"], n, gen)
        if first_tokens is not None and first_tokens[b] is not None:
            k[0], v[0] = first_tokens[b]
        keys.append(k)
        values.append(v)
    return cache, block_table, keys, values


def _slots(block_table, b, positions, block_size):
    return block_table[b][positions // block_size].long() * block_size + positions % block_size


def _write_all(ops, cache, block_table, keys, values, codec, exact, block_size):
    for b, (k, v) in enumerate(zip(keys, values)):
        kvtc_write(ops, k, v, cache, _slots(block_table, b, torch.arange(k.shape[0]), block_size),
                   codec, exact)


def _sink(codec, stats, gen):
    ops = TorchReferenceOps()
    k0 = sample_from_statistics(stats["keys"], 1, gen)[0] * 3.0  # sinks are large
    v0 = sample_from_statistics(stats["values"], 1, gen)[0]
    return SinkConstants.encoded(k0, v0, codec.slot_bytes,
                                 lambda k, v, c, s: ops.write(k, v, c, s, codec),
                                 torch.float32, torch.device("cpu"))


def _reference(query, qsl, cache, block_table, lens, codec, exact_positions, keys, values):
    """Dense causal attention over the decoded slots, with the positions in
    ``exact_positions[b]`` taken from the true K/V (``keys``/``values``)."""
    dec_k, dec_v = decoded_sequences(cache, block_table, torch.tensor(lens), codec)
    for b, positions in enumerate(exact_positions):
        for p in positions:
            dec_k[b][p], dec_v[b][p] = keys[b][p], values[b][p]
    return dense_attention(query, dec_k, dec_v, qsl, 0.125)


def _reference_per_row(query, qsl, cache, block_table, lens, codec, exact_for_row, keys,
                       values):
    """Like _reference, but each query row has its own exact positions:
    ``exact_for_row(b, q)`` for the row of sequence b at position q."""
    dec_k, dec_v = decoded_sequences(cache, block_table, torch.tensor(lens), codec)
    out = torch.empty(query.shape)
    for b, n in enumerate(lens):
        start, end = int(qsl[b]), int(qsl[b + 1])
        for row in range(start, end):
            q = n - (end - start) + (row - start)
            k, v = dec_k[b][: q + 1].clone(), dec_v[b][: q + 1].clone()
            for p in exact_for_row(b, q):
                k[p], v[p] = keys[b][p], values[b][p]
            out[row] = dense_attention(query[row:row + 1], [k], [v], torch.tensor([0, 1]),
                                       0.125)[0]
    return out


def test_prefill_rows_see_the_exact_sink_in_their_history():
    codec, stats = random_layer_codec(2, 64, seed=5)
    gen = torch.Generator().manual_seed(1)
    block_size, lens, query_lens = 16, [50, 37], [30, 20]
    sink = _sink(codec, stats, gen)
    cache, block_table, keys, values = _paged(codec, stats, lens, block_size, gen,
                                              [(sink.keys, sink.values), None])
    _write_all(TorchReferenceOps(), cache, block_table, keys, values, codec,
               ExactTokens(sink=sink), block_size)
    assert sink_flags(cache, block_table, sink).tolist() == [True, False]
    query = torch.randn(sum(query_lens), 6, 64, generator=gen)
    qsl = torch.tensor([0, 30, 50])
    chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
    chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
    out = kvtc_attention(TorchReferenceOps(), query, cache, block_table, torch.tensor(lens), qsl,
                         qsl, codec, 0.125, chunk_k, chunk_v, max_seq_len=50,
                         exact=ExactTokens(sink=sink))
    # exact: the sink of sequence 0, each chunk's own tokens
    exact = [[0, *range(20, 50)], list(range(17, 37))]
    reference = _reference(query, qsl, cache, block_table, lens, codec, exact, keys, values)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_writes_near_the_sink_store_its_pattern_and_others_do_not():
    codec, stats = random_layer_codec(2, 64, seed=2)
    gen = torch.Generator().manual_seed(4)
    sink = _sink(codec, stats, gen)
    near_k = sink.keys * (1 + 0.02 * torch.randn(sink.keys.shape, generator=gen))
    near_v = sink.values * (1 + 0.02 * torch.randn(sink.values.shape, generator=gen))
    far_k = sink.keys.clone()
    far_k[1] = -far_k[1]  # one head far off: not the sink
    key = torch.stack([near_k, far_k])
    value = torch.stack([near_v, sink.values])
    snapped_k, snapped_v = snap_to_sink(key, value, sink)
    assert torch.equal(snapped_k[0], sink.keys) and torch.equal(snapped_v[0], sink.values)
    assert torch.equal(snapped_k[1], far_k)
    cache = torch.zeros(2, 2, 16, codec.slot_bytes, dtype=torch.uint8)
    kvtc_write(TorchReferenceOps(), key, value, cache, torch.tensor([0, 16]), codec,
               ExactTokens(sink=sink))
    assert sink_flags(cache, torch.tensor([[0], [1]]), sink).tolist() == [True, False]


def test_decode_rows_attend_to_the_exact_sink_through_the_lse_merge():
    """Decode/verify rows: positions 1.. from the decode op, the sink merged
    in exactly; a sequence whose first token is not the sink is read all
    compressed; a one-token sequence attends to the sink alone."""
    codec, stats = random_layer_codec(2, 64, seed=8)
    gen = torch.Generator().manual_seed(6)
    block_size, lens, query_lens = 16, [33, 21, 1], [4, 1, 1]
    sink = _sink(codec, stats, gen)
    cache, block_table, keys, values = _paged(
        codec, stats, lens, block_size, gen,
        [(sink.keys, sink.values), None, (sink.keys, sink.values)])
    _write_all(TorchReferenceOps(), cache, block_table, keys, values, codec,
               ExactTokens(sink=sink), block_size)
    query = torch.randn(sum(query_lens), 4, 64, generator=gen)
    qsl = torch.tensor([0, 4, 5, 6])
    out = kvtc_attention(TorchReferenceOps(), query, cache, block_table, torch.tensor(lens), qsl,
                         qsl, codec, 0.125, None, None, max_seq_len=33,
                         exact=ExactTokens(sink=sink))
    reference = _reference(query, qsl, cache, block_table, lens, codec, [[0], [], [0]], keys,
                           values)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[5], sink.values.repeat_interleave(2, dim=0))


def _pad_rows(x, rows):
    """x with garbage rows appended up to ``rows`` (what a CUDA-graph size leaves there)."""
    garbage = torch.Generator().manual_seed(rows)
    extra = torch.randn(rows - x.shape[0], *x.shape[1:], generator=garbage).to(x.dtype) * 50
    return torch.cat([x, extra])


def _run_steps(codec, stats, gen, block_size, schedule, window, entries, sink=None,
               first_tokens=None, pad=None):
    """Drive the glue like vLLM does: per step, the pool's bookkeeping, each
    sequence's new tokens written, then attention. ``schedule`` is a list of
    steps, each {sequence: number of new tokens}. Returns the last step's
    output, its inputs and the true K/V.

    ``pad`` = (tokens, slot_mapping_padded): every step arrives as under CUDA
    graphs, key/value/query padded with garbage rows to a multiple of
    ``tokens``, one empty request appended to the batch, and (V2 runner) the
    slot mapping padded with -1 when ``slot_mapping_padded``; the returned
    output keeps its padding rows."""
    total = {}
    for step in schedule:
        for b, n in step.items():
            total[b] = total.get(b, 0) + n
    lens_final = [total[b] for b in sorted(total)]
    cache, block_table, keys, values = _paged(codec, stats, lens_final, block_size, gen,
                                              first_tokens)
    pool = WindowPool(pool_window(window), entries, block_size, torch.device("cpu"))
    layer = LayerWindow(entries, codec.num_kv_heads, 64, torch.float32, torch.device("cpu"))
    done = {b: 0 for b in total}
    ops = TorchReferenceOps()
    for step in schedule:
        seqs = sorted(step, key=lambda b: (step[b] > 16, b))  # decode rows first
        new = [torch.arange(done[b], done[b] + step[b]) for b in seqs]
        slot_mapping = torch.cat([_slots(block_table, b, p, block_size) for b, p in zip(seqs, new)])
        lens = torch.tensor([done[b] + step[b] for b in seqs])
        table = block_table[seqs]
        k_new = torch.cat([keys[b][p] for b, p in zip(seqs, new)])
        v_new = torch.cat([values[b][p] for b, p in zip(seqs, new)])
        qsl = torch.tensor([0, *torch.tensor([step[b] for b in seqs]).cumsum(0).tolist()])
        query = torch.randn(int(qsl[-1]), 4, 64, generator=gen)
        num_actual = int(qsl[-1])
        if pad is None:
            window_step = pool.step(table, lens, slot_mapping)
            step_slots, step_k, step_v, step_q = slot_mapping, k_new, v_new, query
            step_table, step_lens, step_qsl = table, lens, qsl
        else:
            tokens, slot_mapping_padded = pad
            rows = -(-num_actual // tokens) * tokens
            step_k, step_v, step_q = (_pad_rows(x, rows) for x in (k_new, v_new, query))
            step_slots = slot_mapping
            if slot_mapping_padded:
                step_slots = torch.cat([slot_mapping,
                                        torch.full((rows - num_actual,), -1, dtype=torch.int64)])
            # one captured-size request more: an empty query, a zero block-table row
            step_table = torch.cat([table, torch.zeros_like(table[:1])])
            step_lens = torch.cat([lens, torch.zeros_like(lens[:1])])
            step_qsl = torch.cat([qsl, qsl[-1:]])
            # what the metadata builder hands the pool
            num_reqs = real_request_count(step_qsl)
            window_step = pool.step(step_table[:num_reqs], step_lens[:num_reqs],
                                    step_slots[:num_actual])
        exact = ExactTokens(sink=sink, window=layer, step=window_step, window_tokens=window)
        kvtc_write(ops, step_k, step_v, cache, step_slots, codec, exact,
                   num_actual_tokens=num_actual)
        out = kvtc_attention(ops, step_q, cache, step_table, step_lens, step_qsl, step_qsl, codec,
                             0.125, step_k, step_v, max_seq_len=int(lens.max()), exact=exact)
        for b in seqs:
            done[b] += step[b]
    return out, query, qsl, cache, table, lens.tolist(), [keys[b] for b in seqs], \
        [values[b] for b in seqs], pool, layer, window_step


def test_window_keeps_each_sequences_last_tokens_exact_across_steps():
    """Prefill chunks then decode and MTP-verify steps: the last step's rows
    attend to the last W positions exactly (written over several earlier
    steps), to the sink exactly, and to the rest compressed."""
    codec, stats = random_layer_codec(2, 64, seed=11)
    gen = torch.Generator().manual_seed(12)
    sink = _sink(codec, stats, gen)
    window = 24
    schedule = [{0: 40, 1: 30}, {0: 25, 1: 1}, {0: 1, 1: 4}, {0: 3, 1: 1}, {0: 1, 1: 4, 2: 20}]
    out, query, qsl, cache, table, lens, keys, values, *_ = _run_steps(
        codec, stats, gen, 16, schedule, window, pool_entries(3, window), sink,
        [(sink.keys, sink.values), None, None])
    # rows: seq 0 (1 token), seq 1 (4 tokens, verify: each row its own last W
    # positions, so the verify rows match plain decoding), seq 2 (20-token
    # prefill, no history: all exact)
    def exact_for_row(b, q):
        if b == 2:
            return range(q + 1)
        own = range(max(q - window + 1, 0), q + 1)
        return [0, *own] if b == 0 else own

    reference = _reference_per_row(query, qsl, cache, table, lens, codec, exact_for_row, keys,
                                   values)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_window_falls_back_to_compressed_where_copies_were_evicted():
    """A pool too small for both sequences: the one whose sub-blocks were
    taken reads them compressed (less exact, still correct attention)."""
    codec, stats = random_layer_codec(2, 64, seed=13)
    gen = torch.Generator().manual_seed(14)
    window = 16
    # one sequence's window needs up to 2 sub-blocks: 3 entries cannot serve both
    schedule = [{0: 20}, {1: 20}, {0: 1}]
    out, query, qsl, cache, table, lens, keys, values, pool, layer, step = _run_steps(
        codec, stats, gen, 16, schedule, window, entries=3)
    exact_rows = layer.exact_suffix(step, torch.zeros(1, dtype=torch.int64))
    kept = int(exact_rows.sum())
    assert 0 < kept < window  # the newest positions stayed exact, older ones were evicted
    reference = _reference(query, qsl, cache, table, lens, codec,
                           [list(range(lens[0] - kept, lens[0]))], keys, values)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_pool_gives_shared_sub_blocks_one_entry_and_renews_epochs_on_reuse():
    pool = WindowPool(window=32, entries=4, block_size=16, device=torch.device("cpu"))
    # two sequences sharing their first block (a prefix-cache hit), 32 tokens each
    table = torch.tensor([[1, 2], [1, 3]])
    step = pool.step(table, torch.tensor([32, 32]), torch.tensor([40, 56]))
    # block size = sub-block size: keys are block ids; block 1 needed twice, one entry
    assert sorted(pool.owner[:4].tolist()) == [-1, 1, 2, 3]
    assert torch.equal(step.read_row[0, :16], step.read_row[1, :16])  # shared block, one copy
    epochs = pool.epoch.clone()
    # a third sequence on other blocks: entries not needed any more are recycled
    step = pool.step(torch.tensor([[5, 6]]), torch.tensor([32]), torch.tensor([100]))
    recycled = pool.epoch[:4] != epochs[:4]
    assert int(recycled.sum()) == 2 and set(pool.owner[:4].tolist()) >= {5, 6}


@pytest.mark.parametrize("slot_mapping_padded", [True, False], ids=["v2-runner", "v1-runner"])
def test_cuda_graph_padding_rows_change_nothing(slot_mapping_padded):
    """Key/value/query padded to a captured size (8) with garbage rows, an
    empty request appended, the slot mapping padded with -1 (V2 runner) or
    not (V1): cache bytes, window copies and every real output row equal the
    unpadded run, with the sink and the default-size window on."""
    codec, stats = random_layer_codec(2, 64, seed=17)
    window = 24
    # a 5-token step (a 1-token decode and a 4-token verify) among others
    schedule = [{0: 40, 1: 30}, {0: 1, 1: 4}, {0: 3, 1: 1}, {0: 1, 1: 4, 2: 20}]
    results = []
    for pad in (None, (8, slot_mapping_padded)):
        gen = torch.Generator().manual_seed(18)
        sink = _sink(codec, stats, gen)
        results.append(_run_steps(codec, stats, gen, 16, schedule, window, pool_entries(3, window),
                                  sink, [(sink.keys, sink.values), None, None], pad=pad))
    (out, _, qsl, cache, *_, layer, _), (out_padded, _, _, cache_padded, *_, layer_padded, _) = \
        results
    num_actual = int(qsl[-1])
    assert out_padded.shape[0] == num_actual  # rows for the real tokens only
    torch.testing.assert_close(out_padded, out)
    assert torch.equal(cache_padded, cache)
    assert torch.equal(layer_padded.stamp, layer.stamp)
    assert torch.equal(layer_padded.keys, layer.keys)
    assert torch.equal(layer_padded.values, layer.values)


def test_the_write_refuses_fewer_rows_than_tokens():
    codec, _ = random_layer_codec(2, 64, seed=1)
    cache = torch.zeros(2, 2, 16, codec.slot_bytes, dtype=torch.uint8)
    k = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="5 tokens to write"):
        kvtc_write(TorchReferenceOps(), k, k, cache, torch.arange(5), codec)


def test_padded_requests_are_not_counted():
    assert real_request_count(torch.tensor([0, 1, 5, 5, 5])) == 2
    assert real_request_count(torch.tensor([0, 1, 5])) == 2
    assert real_request_count(torch.tensor([0])) == 0
