"""KVTC: PCA transform coding of the paged KV cache.

Nothing is imported here: vLLM loads the plugin (``serving.plugin``) in every
process, and with KVTC off that must cost no torch and no codec.

- ``format``: what is on disk and in a slot: the codec (encode/decode of
  fixed-size slots), bit packing, the scalar quantizer, the calibration file
  format, the shipped-pickle loader and converter, fitting a codec from
  statistics, and reference attention on slots (the ground truth for kernels).
- ``serving``: what runs inside vLLM: the plugin, the settings carried by the
  environment, the server-side set-up, the attention backend and its ops, the
  exact recent-token window, the attention sink, and the /metrics series.
- ``kernels``: the production Triton kernels (compress on write, decode
  attention from slots).

Offline calibration and evaluation tools live in :mod:`lnarize_serve.kvtc_tools`.
Slot layout contract: docs/kvtc-layout.md.
"""
