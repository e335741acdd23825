"""The KVTC vLLM backend's glue on CUDA (Triton ops) against the same glue on
the torch reference ops, at Qwen3.6-27B's full-attention shape, with the
exact sink and the recent-token window; then what they cost a decode step.
vLLM itself is not needed: the glue (``kvtc_ops.kvtc_write`` /
``kvtc_attention``, the window pool's bookkeeping) is what the backend calls.

    PYTHONUNBUFFERED=1 python benchmarks/kvtc_glue_gpu.py [--profile]

Prints two tables: correctness (relative error vs the reference ops, slots
whose bytes differ) and decode-step timings without exact tokens, with the
sink, and with the sink plus a 128-token window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnarize_serve.kvtc.format.fit import random_layer_codec, sample_from_statistics  # noqa: E402
from lnarize_serve.kvtc.serving.kvtc_ops import (  # noqa: E402
    ExactTokens,
    TorchReferenceOps,
    TritonOps,
    kvtc_attention,
    kvtc_write,
)
from lnarize_serve.kvtc.serving.sink import SinkConstants, sink_flags  # noqa: E402
from lnarize_serve.kvtc.serving.window import (  # noqa: E402
    LayerWindow,
    WindowPool,
    pool_entries,
    pool_window,
)

Q_HEADS, KV_HEADS, HEAD_DIM = 24, 4, 256
SCALE = HEAD_DIM ** -0.5


def build_cache(codec, stats, ops, lens, block_size, sink, sink_first, gen, device,
                window: int = 0):
    """Sequences of sampled K/V written through ``ops`` via the glue's write,
    as one step (the window pool assigns entries for every sequence's last
    ``window`` positions); sequence b starts with the sink's K/V (times 1 + 1%
    noise) if sink_first[b]. Returns the cache, block table, K/V and the
    ExactTokens the step's attention uses."""
    blocks = [-(-n // block_size) for n in lens]
    total = sum(blocks) + 1
    perm = torch.randperm(total - 1, generator=gen) + 1  # block 0 unused
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    cache = torch.zeros(total, KV_HEADS, block_size, codec.slot_bytes, dtype=torch.uint8,
                        device=device)
    table = table.to(device)
    keys, values, slots = [], [], []
    for b, n in enumerate(lens):
        k = sample_from_statistics(stats["keys"], n, gen)
        v = sample_from_statistics(stats["values"], n, gen)
        if sink_first[b]:
            noise = 1 + 0.01 * torch.randn(2, KV_HEADS, HEAD_DIM, generator=gen)
            k[0], v[0] = sink.keys.float().cpu() * noise[0], sink.values.float().cpu() * noise[1]
        keys.append(k.to(device, torch.bfloat16))
        values.append(v.to(device, torch.bfloat16))
        pos = torch.arange(n, device=device)
        slots.append(table[b][pos // block_size].long() * block_size + pos % block_size)
    exact = ExactTokens(sink=sink)
    if window:
        entries = pool_entries(len(lens), window)
        pool = WindowPool(pool_window(window), entries, block_size, torch.device(device))
        exact.window_tokens = window
        exact.step = pool.step(table, torch.tensor(lens, device=device), torch.cat(slots))
        exact.window = LayerWindow(entries, KV_HEADS, HEAD_DIM, torch.bfloat16,
                                   torch.device(device))
    kvtc_write(ops, torch.cat(keys), torch.cat(values), cache, torch.cat(slots),
               codec.to(device), exact)
    return cache, table, keys, values, exact


def sink_for(codec, stats, ops, gen, device):
    k0 = sample_from_statistics(stats["keys"], 1, gen)[0] * 4.0  # sinks have large keys
    v0 = sample_from_statistics(stats["values"], 1, gen)[0]
    dev_codec = codec.to(device)
    return SinkConstants.encoded(k0, v0, codec.slot_bytes,
                                 lambda k, v, c, s: ops.write(k, v, c, s, dev_codec),
                                 torch.bfloat16, torch.device(device))


def correctness(gen, window: int = 128) -> list[tuple]:
    codec, stats = random_layer_codec(KV_HEADS, HEAD_DIM, 2.0, 4.0, seed=1)
    dev = codec.to("cuda")
    triton_ops, ref_ops = TritonOps(), TorchReferenceOps()
    rows = []
    # decode rows: MTP verify (4) with the sink, decode (1) without, verify with;
    # then two prefill chunks over history (one with the sink, one without)
    lens = [3000, 1800, 700, 2500, 1300]
    query_lens = [4, 1, 4, 300, 257]
    sink_first = [True, False, True, True, False]
    for block_size in (16, 64):
        sink_gpu = sink_for(codec, stats, triton_ops, torch.Generator().manual_seed(5), "cuda")
        sink_ref = sink_for(codec, stats, ref_ops, torch.Generator().manual_seed(5), "cuda")
        state = gen.get_state()
        cache_t, table, keys, values, exact_t = build_cache(
            codec, stats, triton_ops, lens, block_size, sink_gpu, sink_first, gen, "cuda", window)
        gen.set_state(state)
        cache_r, _, _, _, exact_r = build_cache(
            codec, stats, ref_ops, lens, block_size, sink_ref, sink_first, gen, "cuda", window)
        # slots whose bytes differ between the Triton and the reference encoder
        # (fp32 rounding at a code boundary flips one code; expected rare)
        differing = int((cache_t != cache_r).any(dim=-1).sum())
        same_sink = torch.equal(sink_gpu.slot, sink_ref.slot)
        flags = sink_flags(cache_t, table, sink_gpu).tolist()
        qsl_list = [0]
        for n in query_lens:
            qsl_list.append(qsl_list[-1] + n)
        qsl_cpu = torch.tensor(qsl_list, dtype=torch.int32)
        qsl = qsl_cpu.to("cuda")
        query = (torch.randn(qsl_list[-1], Q_HEADS, HEAD_DIM, generator=gen) * 2).to(
            "cuda", torch.bfloat16)
        chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
        chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        args = (query, cache_t, table, seq_lens, qsl, qsl_cpu, dev, SCALE, chunk_k, chunk_v,
                max(lens))
        out_t = kvtc_attention(triton_ops, *args, exact=exact_t)
        out_r = kvtc_attention(ref_ops, *args, exact=exact_r)
        out_plain = kvtc_attention(ref_ops, *args, exact=None)
        torch.cuda.synchronize()
        for b in range(len(lens)):
            r = slice(qsl_list[b], qsl_list[b + 1])
            err = float((out_t[r] - out_r[r]).norm() / out_r[r].norm())
            effect = float((out_plain[r] - out_r[r]).norm() / out_r[r].norm())
            kind = "verify" if query_lens[b] == 4 else "decode" if query_lens[b] == 1 else "prefill"
            rows.append((block_size, b, kind, lens[b], query_lens[b], flags[b],
                         f"{differing} / {sum(lens) * KV_HEADS}", err, effect,
                         err < 5e-3 and flags[b] == sink_first[b] and same_sink
                         and differing <= 1e-3 * sum(lens) * KV_HEADS))
    return rows


def bench(gen, batches, context, reps: int = 50) -> list[tuple]:
    import triton.testing

    codec, stats = random_layer_codec(KV_HEADS, HEAD_DIM, 2.0, 4.0, seed=2)
    dev = codec.to("cuda")
    ops = TritonOps()
    sink = sink_for(codec, stats, ops, gen, "cuda")
    rows = []
    block_size = 64
    for batch in batches:
        for nq in (1, 4):
            lens = [context] * batch
            cache, table, _, _, exact = build_cache(codec, stats, ops, lens, block_size, sink,
                                                    [True] * batch, gen, "cuda", window=128)
            qsl_cpu = torch.arange(batch + 1, dtype=torch.int32) * nq
            qsl = qsl_cpu.to("cuda")
            query = torch.randn(batch * nq, Q_HEADS, HEAD_DIM, generator=gen).to(
                "cuda", torch.bfloat16)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
            args = (query, cache, table, seq_lens, qsl, qsl_cpu, dev, SCALE, None, None, context)
            times = [triton.testing.do_bench(lambda e=e: kvtc_attention(ops, *args, exact=e),
                                             warmup=10, rep=reps)
                     for e in (None, ExactTokens(sink=sink), exact)]
            rows.append((batch, context, nq, *times))
    return rows


def profile(gen, batch: int = 4, context: int = 32768) -> None:
    """Where a decode step's time goes, without and with the exact tokens."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    codec, stats = random_layer_codec(KV_HEADS, HEAD_DIM, 2.0, 4.0, seed=2)
    dev = codec.to("cuda")
    ops = TritonOps()
    sink = sink_for(codec, stats, ops, gen, "cuda")
    lens = [context] * batch
    cache, table, _, _, exact = build_cache(codec, stats, ops, lens, 64, sink, [True] * batch,
                                            gen, "cuda", window=128)
    qsl_cpu = torch.arange(batch + 1, dtype=torch.int32)
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    args = (query, cache, table, torch.tensor(lens, dtype=torch.int32, device="cuda"),
            qsl_cpu.to("cuda"), qsl_cpu, dev, SCALE, None, None, context)
    for label, e in (("no exact tokens", None), ("sink + window 128", exact)):
        for _ in range(3):
            kvtc_attention(ops, *args, exact=e)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                kvtc_attention(ops, *args, exact=e)
            torch.cuda.synchronize()
        print(f"\n## Profile, {label} (batch {batch}, context {context}, 10 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--profile", action="store_true", help="torch profiler breakdown")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    gen = torch.Generator().manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = correctness(gen)
    print("\n## Glue on Triton ops vs glue on torch reference ops (same inputs, CUDA; "
          "exact sink + 128-token window)")
    print("| block size | seq | row | context | query tokens | sink flagged | slots differing "
          "| rel err vs reference | exact tokens change output by | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.2e} "
              f"| {r[8]:.3f} | {'OK' if r[9] else 'FAIL'} |")
    ok = all(r[9] for r in rows)
    timings = bench(gen, [int(b) for b in args.batches.split(",")], args.context)
    print("\n## Decode step through the glue (Triton ops), ms")
    print("| batch | context | query tokens | no exact tokens | sink | sink + window 128 |")
    print("|---|---|---|---|---|---|")
    for b, ctx, nq, plain, sink_only, both in timings:
        print(f"| {b} | {ctx} | {nq} | {plain:.3f} | {sink_only:.3f} | {both:.3f} |")
    if args.profile:
        profile(gen)
    print("\nALL OK" if ok else "\nFAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
