"""`lnarize-serve bench`: load-test any OpenAI-compatible chat endpoint.

Pipeline, one module per concern:
    workload  -> prompts of an exact token length (model tokenizer) or a
                 server-calibrated approximation
    client    -> one streamed /v1/chat/completions request, timed per chunk
    driver    -> the concurrency x prompt-length grid, warm-up, time bound
    stats     -> per-cell throughput and latency percentiles (numpy)
    report    -> table, JSON;  plot -> PNG (matplotlib)
    process   -> a server subprocess: start, wait for ready, metrics, stop
                 (also the benchmarks' and the end-to-end tests' harness)
    servers   -> plain vLLM and lnarize-serve, planned for `bench compare`
    compare   -> alternating A/B measurements and per-cell ratios
    cli       -> argument parsing for `lnarize-serve bench [compare]`
"""
