"""What runs inside vLLM: the general plugin, the KVTC settings every vLLM
process reads from the environment, the server-side set-up, the compressed
attention backend and its ops, the exact recent-token window and sink, and
the /metrics series.

This package imports nothing, so loading :mod:`.plugin` with KVTC off stays
cheap (tests/unit/kvtc/serving/test_plugin_imports.py).
"""
