"""Triton kernels for the KVTC compressed paged KV cache (GPU; CPU through
Triton's interpreter). See docs/kvtc-kernels.md for design and measurements.

    tables = prepare_layer_tables(layer_codec)          # once per layer
    write_slots(k, v, slot_mapping, cache, tables)      # compress on write
    out = decode_attention(q, cache, block_table, seq_lens, query_start_loc,
                           tables, softmax_scale, max_query_len, max_seq_len)
"""

from lnarize_serve.kvtc.kernels.decode import decode_attention, default_num_splits
from lnarize_serve.kvtc.kernels.tables import LayerKernelTables, PartTables, prepare_layer_tables
from lnarize_serve.kvtc.kernels.write import write_slots

__all__ = ["LayerKernelTables", "PartTables", "decode_attention", "default_num_splits",
           "prepare_layer_tables", "write_slots"]
