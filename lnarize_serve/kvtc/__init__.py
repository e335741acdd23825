"""KVTC: PCA transform coding of the KV cache (codec, calibration, evaluation).

Slot layout contract: docs/kvtc-layout.md.
"""

from lnarize_serve.kvtc.attention import (attention_on_slots, decoded_sequences,
                                          dense_attention, gather_slots, write_slots)
from lnarize_serve.kvtc.bitpack import (bit_offsets, pack_codes, unpack_codes,
                                        word_packed_offsets)
from lnarize_serve.kvtc.codec import (KINDS, LAYOUT_VERSION, HeadCodec, KindCodec, LayerCodec,
                                      decode_kv, encode_kv, roundtrip_kv, split_slots)
from lnarize_serve.kvtc.fit import random_layer_codec, sample_from_statistics

__all__ = [
    "KINDS", "LAYOUT_VERSION", "HeadCodec", "KindCodec", "LayerCodec", "encode_kv", "decode_kv",
    "roundtrip_kv", "split_slots", "pack_codes", "unpack_codes", "bit_offsets",
    "word_packed_offsets",
    "attention_on_slots", "dense_attention", "decoded_sequences", "gather_slots", "write_slots",
    "random_layer_codec", "sample_from_statistics",
]
