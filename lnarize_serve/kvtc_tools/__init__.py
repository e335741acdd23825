"""Offline KVTC tools: collect post-RoPE statistics from a transformers model,
fit a calibration, evaluate quality per byte against other KV-cache methods,
compare vLLM engines with and without KVTC, and the ``lnarize-serve kvtc``
command.

Serving needs none of it. The one exception is the cpu-demo profile, which
fits its demo model's calibration on first start
(:func:`lnarize_serve.demo_model.ensure_demo_kvtc_calibration`).
"""
