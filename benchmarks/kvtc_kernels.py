"""KVTC GPU kernels: correctness at GPU sizes, then decode-attention and
compress-on-write timings against dense bf16 / fp8 paged decode and torch
SDPA, with byte counts and the measured-bandwidth floor. One run does it all:

    PYTHONUNBUFFERED=1 python benchmarks/kvtc_kernels.py --out $OUT [--quick]

Prints a table last; writes kvtc_kernels.json and kvtc_kernels.png to --out.
The KVTC column times lnarize_serve's decode_attention (the shipped kernel);
--sweep, --unpack-ab and the per-formulation checks run the experimental
split kernels of kvtc_decode_variants.py beside it.
Shape: Qwen3.6-27B full attention (24 query heads, 4 KV heads, head_dim 256),
KVTC K2V4 (64 + 128 = 192 bytes per token per KV head; bf16 1024).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvtc_decode_variants import KNOBS as VARIANT_KNOBS  # noqa: E402
from kvtc_decode_variants import decoder  # noqa: E402
from paged_dense_decode import dense_paged_decode  # noqa: E402

from lnarize_serve.kvtc.format.attention import attention_on_slots, dense_attention  # noqa: E402
from lnarize_serve.kvtc.format.bitpack import bit_offsets  # noqa: E402
from lnarize_serve.kvtc.format.codec import KindCodec, LayerCodec, encode_kv  # noqa: E402
from lnarize_serve.kvtc.format.fit import random_layer_codec, sample_from_statistics  # noqa: E402
from lnarize_serve.kvtc.kernels import (decode_attention, default_num_splits,  # noqa: E402
                                        prepare_layer_tables, write_slots)

Q_HEADS, KV_HEADS, HEAD_DIM = 24, 4, 256
SCALE = HEAD_DIM ** -0.5
# KVTC_BENCH_DEVICE=cpu (with TRITON_INTERPRET=1) runs the script's Python paths on
# tiny sizes through Triton's interpreter, to catch bugs before spending GPU time.
DEV = os.environ.get("KVTC_BENCH_DEVICE", "cuda")


# ---------------------------------------------------------------- utilities
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timer:
    """Median of CUDA-graph replays, L2 flushed before each (cold cache, as a
    decode step that streamed other layers' weights in between would see)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 * 1024 * 1024 if DEV == "cuda" else 1, dtype=torch.uint8,
                                 device=DEV)

    def __call__(self, fn) -> float:
        if DEV == "cpu":
            fn()
            return float("nan")
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    if DEV == "cpu":
        return float("nan")
    src = torch.randn(512 * 1024 * 1024 // 4, device=DEV)  # 512 MiB... x2 below
    src = torch.cat([src, src])
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    t = statistics.median(times[3:]) / 1e3
    bw = 2 * src.numel() * 4 / t
    del src, dst
    return bw


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def paged_layout(seq_lens: list[int], block_size: int, generator: torch.Generator):
    """Random (fragmented) block tables for the given lengths."""
    blocks_per = [math.ceil(n / block_size) for n in seq_lens]
    total = sum(blocks_per)
    perm = torch.randperm(total, generator=generator)
    table = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per):
        table[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    return table.to(DEV), total


def slot_mapping_for(table: torch.Tensor, seq: int, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=DEV)
    return table[seq, pos // block_size].long() * block_size + pos % block_size


def prefix_offset_codec(layer: LayerCodec) -> LayerCodec:
    """The same calibration with prefix-sum offsets (codes straddle words):
    the kernels' general (slower) path."""
    def repack(part: KindCodec) -> KindCodec:
        order = torch.argsort(part.bits, dim=1, descending=True, stable=True)
        pick = lambda t: torch.gather(t, 1, order)  # noqa: E731
        bits = pick(part.bits)
        basis = torch.gather(part.basis, 1, order[..., None].expand_as(part.basis))
        return KindCodec(part.mean, basis, bits, pick(part.scale), pick(part.zero),
                         bit_offsets(bits) * (bits > 0), part.num_bytes)
    return LayerCodec(repack(layer.keys), repack(layer.values))


# ------------------------------------------------------------- correctness
def check_write(layer, stats, tables, results, num_tokens: int, block_size: int, gen) -> None:
    """write_slots vs the reference encoder, byte for byte, poisoned cache."""
    k = sample_from_statistics(stats["keys"], num_tokens, gen).to(DEV, torch.bfloat16)
    v = sample_from_statistics(stats["values"], num_tokens, gen).to(DEV, torch.bfloat16)
    num_blocks = math.ceil(num_tokens / block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEV)
    slots[::97] = -1  # vLLM's padding slots: must be skipped
    cache = torch.full((num_blocks, KV_HEADS, block_size, layer.slot_bytes), 0xA5,
                       dtype=torch.uint8, device=DEV)
    write_slots(k, v, slots, cache, tables)
    expect = torch.full_like(cache, 0xA5)
    keep = slots >= 0
    ref = encode_kv(k[keep].float(), v[keep].float(), layer)
    s = slots[keep]
    expect[s // block_size, :, s % block_size] = ref
    mismatched = int((cache != expect).sum())
    # a different fp32 summation order may flip a code sitting exactly on a
    # rounding boundary; anything beyond a handful of bytes is a bug
    ok = mismatched <= max(8, cache.numel() // 1_000_000)
    results.append({"check": f"write {num_tokens} tok bs{block_size}", "mismatched_bytes": mismatched,
                    "ok": ok})
    log(f"check write N={num_tokens} bs={block_size}: {mismatched} mismatched bytes -> {'OK' if ok else 'FAIL'}")


def check_decode(layer, stats, tables, results, seq_lens, nqs, block_size, gen, data: str,
                 label: str, cfg: dict, num_splits=None, tol: float = 1e-2) -> None:
    table, total_blocks = paged_layout(seq_lens, block_size, gen)
    cache = torch.full((total_blocks, KV_HEADS, block_size, layer.slot_bytes), 0x5A,
                       dtype=torch.uint8, device=DEV)
    for b, n in enumerate(seq_lens):
        if data == "calibrated":
            k = sample_from_statistics(stats["keys"], n, gen)
            v = sample_from_statistics(stats["values"], n, gen)
        else:  # off-distribution: heavy tails, clamped codes
            k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen) * 2.0
            v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).pow(3)
        write_slots(k.to(DEV), v.to(DEV), slot_mapping_for(table, b, n, block_size), cache, tables)
    qsl = torch.tensor([0] + list(torch.tensor(nqs).cumsum(0)), dtype=torch.int32, device=DEV)
    q = (torch.randn(int(qsl[-1]), Q_HEADS, HEAD_DIM, generator=gen) * 1.5).to(DEV, torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    out = torch.full((q.shape[0], Q_HEADS, HEAD_DIM), float("nan"), dtype=torch.float32, device=DEV)
    decode = kvtc_decode(cfg)
    out, lse = decode(q, cache, table, lens, qsl, tables, SCALE, max(nqs), max(seq_lens),
                      num_splits=num_splits, out=out, return_lse=True, **tunables(cfg))
    sync()
    ref = attention_on_slots(q.float(), cache, table, lens, qsl, layer, SCALE)
    err = rel_err(out, ref)
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    ok = finite and err < tol
    kernel = "production" if decode is decode_attention else "variants"
    results.append({"check": label, "kernel": kernel, "variant": cfg.get("variant"),
                    "rel_err": err, "finite": finite, "ok": ok})
    log(f"check {label} ({kernel}): rel err {err:.2e} finite={finite} -> {'OK' if ok else 'FAIL'}")
    del cache, ref


def check_dense_baseline(results, gen) -> None:
    """The bf16 Triton baseline against plain attention (so its times count)."""
    seq_lens, nqs, block_size = [700, 33, 2048], [1, 3, 4], 16
    table, total_blocks = paged_layout(seq_lens, block_size, gen)
    kc = torch.randn(total_blocks, KV_HEADS, block_size, HEAD_DIM, generator=gen).to(DEV, torch.bfloat16)
    vc = torch.randn(total_blocks, KV_HEADS, block_size, HEAD_DIM, generator=gen).to(DEV, torch.bfloat16)
    qsl = torch.tensor([0] + list(torch.tensor(nqs).cumsum(0)), dtype=torch.int32, device=DEV)
    q = torch.randn(int(qsl[-1]), Q_HEADS, HEAD_DIM, generator=gen).to(DEV, torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    out = dense_paged_decode(q, kc, vc, table, lens, qsl, SCALE, 4, max(seq_lens), num_splits=5)
    keys, values = [], []
    for b, n in enumerate(seq_lens):
        pos = torch.arange(n, device=DEV)
        blk = table[b, pos // block_size].long()
        keys.append(kc[blk, :, pos % block_size].float())
        values.append(vc[blk, :, pos % block_size].float())
    ref = dense_attention(q.float(), keys, values, qsl, SCALE)
    err = rel_err(out, ref)
    ok = err < 1e-2
    results.append({"check": "dense bf16 baseline", "rel_err": err, "ok": ok})
    log(f"check dense bf16 baseline: rel err {err:.2e} -> {'OK' if ok else 'FAIL'}")


# ------------------------------------------------------------------ timing
def bench_cell(timer, tables, layer, batch, ctx, nq, block_size, copy_bw, kvtc_cfg, gen,
               unpack_ab=(), head_decode=None):
    lens_list = [ctx] * batch
    table, total_blocks = paged_layout(lens_list, block_size, gen)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEV)
    qsl = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * nq
    q = torch.randn(batch * nq, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    row = {"batch": batch, "context": ctx, "q_tokens": nq}
    tokens = batch * ctx
    q_out_bytes = 2 * q.numel() * 2

    # KVTC: random code bytes are valid slots (every bit pattern decodes)
    cache = torch.randint(0, 256, (total_blocks, KV_HEADS, block_size, layer.slot_bytes),
                          dtype=torch.uint8, device=DEV)
    splits = default_num_splits(batch, KV_HEADS, ctx, kvtc_cfg["block_t"],
                                programs_per_sm=kvtc_cfg.get("programs_per_sm", 8))
    fn = kvtc_call(q, cache, table, lens, qsl, tables, nq, ctx, kvtc_cfg)
    row["kvtc_kernel"] = "production" if kvtc_decode(kvtc_cfg) is decode_attention else "variants"
    table_bytes = 4 * KV_HEADS * HEAD_DIM * (int((layer.keys.bits > 0).sum(1).max())
                                             + int((layer.values.bits > 0).sum(1).max()) + 2)
    kvtc_bytes = tokens * KV_HEADS * layer.slot_bytes + q_out_bytes + table_bytes
    row["kvtc_ms"] = timer(fn)
    for unpack in unpack_ab:  # the experimental kernel with another code decoding, side by side
        fn = kvtc_call(q, cache, table, lens, qsl, tables, nq, ctx, {**kvtc_cfg, "unpack": unpack})
        try:
            row[f"kvtc_ms_unpack{unpack}"] = timer(fn)
        except Exception as exc:  # an experimental decoding must not end the run
            log(f"unpack {unpack} failed: {type(exc).__name__}: {exc}"[:400])
            row[f"kvtc_ms_unpack{unpack}"] = float("nan")
    if head_decode is not None:  # the earlier kernels with their own defaults, same inputs
        knobs = {k: HEAD_CONFIG[k] for k in KERNEL_KNOBS if k in HEAD_CONFIG}
        head_splits = default_num_splits(batch, KV_HEADS, ctx, HEAD_CONFIG["block_t"],
                                         programs_per_sm=HEAD_CONFIG["programs_per_sm"])
        row["kvtc_ms_head"] = timer(lambda: head_decode(q, cache, table, lens, qsl, tables, SCALE,
                                                        nq, ctx, num_splits=head_splits, **knobs))
    row["kvtc_bytes"] = kvtc_bytes
    row["kvtc_floor_ms"] = kvtc_bytes / copy_bw * 1e3
    del cache

    dense_splits = default_num_splits(batch, KV_HEADS, ctx, 32)
    kc = torch.randn(total_blocks, KV_HEADS, block_size, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    fn = lambda: dense_paged_decode(q, kc, vc, table, lens, qsl, SCALE, nq, ctx,  # noqa: E731
                                    num_splits=dense_splits)
    bf16_bytes = tokens * KV_HEADS * HEAD_DIM * 2 * 2 + q_out_bytes
    row["bf16_triton_ms"] = timer(fn)
    row["bf16_bytes"] = bf16_bytes
    row["bf16_floor_ms"] = bf16_bytes / copy_bw * 1e3

    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    del kc, vc
    fn = lambda: dense_paged_decode(q, k8, v8, table, lens, qsl, SCALE, nq, ctx,  # noqa: E731
                                    num_splits=dense_splits)
    fp8_bytes = tokens * KV_HEADS * HEAD_DIM * 2 + q_out_bytes
    row["fp8_triton_ms"] = timer(fn)
    row["fp8_floor_ms"] = fp8_bytes / copy_bw * 1e3
    del k8, v8

    # SDPA over an already gathered contiguous cache (gather not timed)
    kg = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    vg = torch.randn_like(kg)
    qg = q.view(batch, nq, Q_HEADS, HEAD_DIM).transpose(1, 2)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True)  # noqa: E731
    row["sdpa_ms"] = timer(fn)
    del kg, vg
    row["kvtc_frac_of_floor"] = row["kvtc_floor_ms"] / row["kvtc_ms"]
    row["speedup_vs_bf16_triton"] = row["bf16_triton_ms"] / row["kvtc_ms"]
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["kvtc_ms"]
    row["speedup_vs_bf16_floor"] = row["bf16_floor_ms"] / row["kvtc_ms"]
    row["splits"] = splits
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_write(timer, tables, layer, stats, sizes, gen) -> list[dict]:
    rows = []
    for n in sizes:
        k = sample_from_statistics(stats["keys"], n, gen).to(DEV, torch.bfloat16)
        v = sample_from_statistics(stats["values"], n, gen).to(DEV, torch.bfloat16)
        block_size = 16
        nb = math.ceil(n / block_size)
        cache = torch.zeros(nb, KV_HEADS, block_size, layer.slot_bytes, dtype=torch.uint8, device=DEV)
        slots = torch.randperm(nb * block_size, device=DEV)[:n]
        ms = timer(lambda: write_slots(k, v, slots, cache, tables))
        flops = 2 * n * KV_HEADS * HEAD_DIM * (tables.keys.columns + tables.values.columns)
        rows.append({"tokens": n, "ms": ms, "tokens_per_s": n / ms * 1e3,
                     "tflops_padded": flops / ms / 1e9})
        log(f"write {n} tokens: {ms:.3f} ms, {n / ms * 1e3 / 1e6:.2f} M tok/s")
    return rows


# What decode_attention's callers (the vLLM backend) should pass, per query
# tokens per sequence; measured by --sweep (docs/kvtc-kernels.md). variant 1
# with tables_in_loop is the production kernel's formulation (kvtc_decode).
DEFAULT_CONFIG = {
    1: {"variant": 1, "tables_in_loop": True, "block_t": 128, "num_warps": 4, "num_stages": 2,
        "programs_per_sm": 8},
    4: {"variant": 1, "tables_in_loop": True, "block_t": 128, "num_warps": 4, "num_stages": 2,
        "programs_per_sm": 8},
}
# What the kernels before the unit-fp16 decode (commit 61e0ef7) were run with,
# for --head-baseline: their own defaults (BLOCK_T 64).
HEAD_CONFIG = {"variant": 1, "tables_in_loop": True, "block_t": 64, "num_warps": 4,
               "num_stages": 2, "programs_per_sm": 8}
TUNABLES = ("block_t", "num_warps", "num_stages")  # launch parameters of either kernel
# an earlier decode.py (--head-baseline) also took the experimental kernel's knobs
KERNEL_KNOBS = TUNABLES + VARIANT_KNOBS


def tunables(cfg: dict) -> dict:
    return {k: cfg[k] for k in TUNABLES if k in cfg}


def kvtc_decode(cfg: dict):
    """lnarize_serve's decode_attention when cfg asks for the production
    formulation (or names none), else benchmarks/kvtc_decode_variants.py's
    with cfg's knobs: the tables time the shipped kernel as the default."""
    return decoder(**{k: cfg[k] for k in VARIANT_KNOBS if k in cfg})


def kvtc_call(q, cache, table, lens, qsl, tables, nq, ctx, cfg, compiled=None):
    splits = default_num_splits(lens.shape[0], KV_HEADS, ctx, cfg["block_t"],
                                programs_per_sm=cfg.get("programs_per_sm", 8))
    decode = kvtc_decode(cfg)
    return lambda: decode(q, cache, table, lens, qsl, tables, SCALE, nq, ctx,
                          num_splits=splits, compiled=compiled, **tunables(cfg))


def sweep_configs(timer, tables, layer, gen, mode: str) -> tuple[dict, list]:
    """Pick the split kernel's formulation, tile, warps and split count per
    query-token count, timing each at batch 1 / 64K and batch 16 / 16K context
    and ranking by the sum of the two times relative to each cell's fastest."""
    best, report = {}, []
    ctx = 65536
    table, total_blocks = paged_layout([ctx], 16, gen)
    lens = torch.full((1,), ctx, dtype=torch.int32, device=DEV)
    cache = torch.randint(0, 256, (total_blocks, KV_HEADS, 16, layer.slot_bytes),
                          dtype=torch.uint8, device=DEV)
    table16, blocks16 = paged_layout([16384] * 16, 16, gen)
    lens16 = torch.full((16,), 16384, dtype=torch.int32, device=DEV)
    cache16 = torch.randint(0, 256, (blocks16, KV_HEADS, 16, layer.slot_bytes),
                            dtype=torch.uint8, device=DEV)
    qsl16 = {n: torch.arange(17, dtype=torch.int32, device=DEV) * n for n in (1, 4)}
    q16 = {n: torch.randn(16 * n, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
           for n in (1, 4)}
    for nq in (1, 4):
        qsl = torch.tensor([0, nq], dtype=torch.int32, device=DEV)
        q = torch.randn(nq, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
        options = []
        grid = [(v, t, bt, w, pps) for v in (1, 2) for t in (False, True)
                for bt in (32, 64) for w in (4, 8) for pps in (4, 8, 16)]
        if mode == "quick":  # what the earlier full sweeps left open
            grid = [(v, True, bt, 4, pps) for v in (1, 2) for bt in (32, 64) for pps in (4, 8, 16)]
        elif mode == "wide":  # bigger tiles, now that the unit-fp16 decode frees registers
            grid = [(1, True, bt, w, pps) for bt in (64, 128) for w in (4, 8) for pps in (8, 16)]
        for variant, in_loop, block_t, warps, per_sm in grid:
            cfg = {"variant": variant, "tables_in_loop": in_loop, "block_t": block_t,
                   "num_warps": warps, "num_stages": 2, "programs_per_sm": per_sm}
            compiled: list = []
            try:
                ms = timer(kvtc_call(q, cache, table, lens, qsl, tables, nq, ctx, cfg, compiled))
                ms16 = timer(kvtc_call(q16[nq], cache16, table16, lens16, qsl16[nq], tables, nq,
                                       16384, cfg))
            except Exception as exc:  # e.g. out of shared memory
                log(f"config {cfg} nq={nq} failed: {type(exc).__name__}: {exc}"[:300])
                continue
            k = compiled[0]
            stats = {"regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None),
                     "smem": k.metadata.shared if hasattr(k, "metadata") else None}
            options.append((ms, ms16, cfg))
            report.append({"q_tokens": nq, **cfg, "ms_b1_64k": ms, "ms_b16_16k": ms16, **stats})
            log(f"sweep nq={nq} {cfg}: B1 64K {ms:.4f} ms, B16 16K {ms16:.4f} ms {stats}")
        fastest = (min(o[0] for o in options), min(o[1] for o in options))
        best[nq] = min(options, key=lambda o: o[0] / fastest[0] + o[1] / fastest[1])[2]
        log(f"best for nq={nq}: {best[nq]}")
    del cache, cache16
    return best, report


def kernel_breakdown(tables, layer, cfgs, gen) -> list[dict]:
    """Per-kernel device time (profiler) of one decode call, for a few cells."""
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for batch, ctx in ((1, 65536), (16, 16384), (16, 65536)):
        table, total_blocks = paged_layout([ctx] * batch, 16, gen)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        cache = torch.randint(0, 256, (total_blocks, KV_HEADS, 16, layer.slot_bytes),
                              dtype=torch.uint8, device=DEV)
        for nq in (1, 4):
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * nq
            q = torch.randn(batch * nq, Q_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
            fn = kvtc_call(q, cache, table, lens, qsl, tables, nq, ctx, cfgs[nq])
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            times: dict[str, float] = {}
            for evt in prof.key_averages():
                if "_kvtc_" in evt.key and evt.device_time_total > 0:
                    times[evt.key] = evt.device_time_total / evt.count / 1e3  # ms
            row = {"batch": batch, "context": ctx, "q_tokens": nq, **times}
            rows.append(row)
            log(f"breakdown B={batch} ctx={ctx} q={nq}: "
                + ", ".join(f"{k.replace('_kvtc_', '')} {v:.4f} ms" for k, v in times.items()))
        del cache
    return rows


# -------------------------------------------------------------------- main
def print_table(rows, copy_bw, gpu) -> None:
    print()
    kernels = "/".join(sorted({r["kvtc_kernel"] for r in rows}))
    print(f"KVTC decode attention ({kernels} kernel), {gpu}, copy bandwidth "
          f"{copy_bw / 1e12:.2f} TB/s, Hq={Q_HEADS} Hkv={KV_HEADS} d={HEAD_DIM}, "
          f"K2V4 192 B/token/head, block 16")
    hdr = ("B", "ctx", "q", "kvtc ms", "floor", "frac", "bf16 tri", "bf16 flr", "fp8 tri",
           "sdpa", "x bf16tri", "x sdpa", "x bf16flr")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print(f"| {r['batch']} | {r['context'] // 1024}K | {r['q_tokens']} | {r['kvtc_ms']:.4f} | "
              f"{r['kvtc_floor_ms']:.4f} | {r['kvtc_frac_of_floor']:.2f} | {r['bf16_triton_ms']:.4f} | "
              f"{r['bf16_floor_ms']:.4f} | {r['fp8_triton_ms']:.4f} | {r['sdpa_ms']:.4f} | "
              f"{r['speedup_vs_bf16_triton']:.2f} | {r['speedup_vs_sdpa']:.2f} | "
              f"{r['speedup_vs_bf16_floor']:.2f} |")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    for i, nq in enumerate((1, 4)):
        for j, batch in enumerate((1, 4, 16)):
            ax = axes[i][j]
            cell = [r for r in rows if r["q_tokens"] == nq and r["batch"] == batch]
            if not cell:
                ax.set_visible(False)
                continue
            ctx = [r["context"] for r in cell]
            for key, label, style in (("kvtc_ms", "KVTC (Triton)", "o-"),
                                      ("kvtc_floor_ms", "KVTC byte floor", "o:"),
                                      ("bf16_triton_ms", "bf16 paged (Triton)", "s-"),
                                      ("bf16_floor_ms", "bf16 byte floor", "s:"),
                                      ("fp8_triton_ms", "fp8 paged (Triton)", "^-"),
                                      ("sdpa_ms", "SDPA, gathered bf16", "x--")):
                ax.plot(ctx, [r[key] for r in cell], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"batch {batch}, {nq} query token(s)")
            ax.set_xlabel("context tokens")
            ax.set_ylabel("ms per layer-step")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and reps")
    parser.add_argument("--sweep", choices=("full", "quick", "wide", "none"), default="none",
                        help="time kernel configurations and use the best (default: use the "
                             "kernels' defaults)")
    parser.add_argument("--unpack-ab", default="",
                        help="comma-separated UNPACK modes of the experimental kernel (0 = "
                             "original 0x6400 decode, 1 = unit-fp16, 2 = unit-fp16 pairs in PTX) "
                             "also timed in every cell")
    parser.add_argument("--head-baseline", type=Path, default=None,
                        help="a copy of an earlier kernels/decode.py, timed beside (before/after)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (override)")
    parser.add_argument("--contexts", default="", help="comma-separated contexts (override)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="stop after the configuration sweep and the correctness checks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import triton
    cpu = DEV == "cpu"
    gpu = torch.cuda.get_device_name() if not cpu else "cpu (Triton interpreter smoke)"
    log(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}")
    gen = torch.Generator().manual_seed(0)
    timer = Timer(reps=10 if args.quick else 25)
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)")

    layer_cpu, stats = random_layer_codec(KV_HEADS, HEAD_DIM, 2.0, 4.0, seed=0)
    layer = layer_cpu.to(DEV)
    tables = prepare_layer_tables(layer)
    straddle_layer = prefix_offset_codec(layer_cpu).to(DEV)
    straddle_tables = prepare_layer_tables(straddle_layer)
    info = {"gpu": gpu, "copy_bw": copy_bw, "slot_bytes": layer.slot_bytes,
            "key_columns": tables.keys.columns, "value_columns": tables.values.columns,
            "key_components_max": int((layer.keys.bits > 0).sum(1).max()),
            "value_components_max": int((layer.values.bits > 0).sum(1).max())}
    log(f"layout: {info}")

    checks: list[dict] = []
    s = 16 if cpu else 1  # shrink factor for the CPU smoke
    check_write(layer, stats, tables, checks, 64 if cpu else 4096 if args.quick else 65536, 16, gen)
    check_write(straddle_layer, stats, straddle_tables, checks, 2048 // s, 32, gen)
    if not cpu:
        check_dense_baseline(checks, gen)

    if cpu:
        small = {"block_t": 16, "num_warps": 4, "num_stages": 2, "variant": 0}
        best, sweep = {1: small, 4: small}, []
    elif args.sweep == "none":
        best, sweep = {1: DEFAULT_CONFIG[1], 4: DEFAULT_CONFIG[4]}, []
    else:
        best, sweep = sweep_configs(timer, tables, layer, gen, args.sweep)
    unpack_ab = tuple(int(u) for u in args.unpack_ab.split(",") if u)
    head_decode = None
    if args.head_baseline is not None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("kvtc_decode_head", args.head_baseline)
        head_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(head_module)
        head_decode = head_module.decode_attention
    for variant, unpack in ((0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
        cfg = {**best[4], "variant": variant, "unpack": unpack}
        label = f"ragged calibrated bs16 v{variant} unpack{unpack}"
        try:
            check_decode(layer, stats, tables, checks, [1, 300 // s, 5000 // s], [1, 4, 3], 16,
                         gen, "calibrated", label, cfg)
        except Exception as exc:  # e.g. inline PTX the installed ptxas refuses
            log(f"check {label} raised {type(exc).__name__}: {exc}"[:600])
            checks.append({"check": label, "error": f"{type(exc).__name__}: {exc}"[:600],
                           "ok": False})
        if unpack == 0:  # straddling codes always take the original decode
            check_decode(straddle_layer, stats, straddle_tables, checks, [2500 // s, 7], [4, 1],
                         16, gen, "calibrated", f"prefix offsets (straddling) bs16 v{variant}",
                         {**cfg, "unpack": None})
    check_decode(layer, stats, tables, checks, [4096 // s, 17, 2], [4, 2, 1], 32, gen,
                 "off-distribution", "ragged off-distribution bs32", best[4])
    check_decode(layer, stats, tables, checks, [3000 // s, 64], [4, 1], 64, gen,
                 "calibrated", "one split", best[4], num_splits=1)
    big = [] if cpu else [16384] if args.quick else [65536, 262144]
    for n in big:
        # every decoding at 64K; at 256K the default and the original one only
        for unpack in sorted({None, 0} if n > 65536 else {None, *unpack_ab}, key=str):
            tag = "" if unpack is None else f" unpack{unpack}"
            check_decode(layer, stats, tables, checks, [n], [4], 16, gen, "calibrated",
                         f"B1 {n // 1024}K q4 bs16{tag}", {**best[4], "unpack": unpack})
            check_decode(layer, stats, tables, checks, [n], [1], 16, gen, "off-distribution",
                         f"B1 {n // 1024}K q1 bs16 off-distribution{tag}",
                         {**best[1], "unpack": unpack})
    if not args.quick and not cpu:
        check_decode(layer, stats, tables, checks, [65536, 1000, 30000, 5], [1, 4, 2, 3], 128, gen,
                     "calibrated", "B4 ragged up to 64K bs128", best[4])
    all_ok = all(c["ok"] for c in checks)
    log(f"correctness: {'ALL OK' if all_ok else 'FAILURES'}")
    breakdown = [] if cpu else kernel_breakdown(tables, layer, best, gen)
    if args.sweep_only:
        (args.out / "kvtc_sweep.json").write_text(json.dumps(
            {"info": info, "checks": checks, "best": best, "sweep": sweep,
             "breakdown": breakdown}, indent=2))
        return 0 if all_ok else 1

    write_rows = bench_write(timer, tables, layer, stats,
                             [32] if cpu else [2048, 16384] if args.quick
                             else [512, 2048, 8192, 32768], gen)

    rows = []
    batches = (1,) if cpu else (1, 16) if args.quick else (1, 4, 16)
    contexts = (64,) if cpu else (4096, 65536) if args.quick else (4096, 16384, 65536, 262144)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.contexts and not cpu:
        contexts = tuple(int(c) for c in args.contexts.split(","))
    for nq in (1, 4):
        for batch in batches:
            for ctx in contexts:
                row = bench_cell(timer, tables, layer, batch, ctx, nq, 16, copy_bw, best[nq], gen,
                                 unpack_ab, head_decode)
                rows.append(row)
                ab = " ".join(f"unpack{u} {row[f'kvtc_ms_unpack{u}']:.4f}" for u in unpack_ab)
                ab += f" head {row['kvtc_ms_head']:.4f}" if head_decode else ""
                log(f"B={batch} ctx={ctx} q={nq}: kvtc {row['kvtc_ms']:.4f} ms {ab} "
                    f"(floor {row['kvtc_floor_ms']:.4f}), bf16 {row['bf16_triton_ms']:.4f}, "
                    f"fp8 {row['fp8_triton_ms']:.4f}, sdpa {row['sdpa_ms']:.4f}")

    result = {"info": info, "checks": checks, "best_configs": {str(k): v for k, v in best.items()},
              "sweep": sweep, "breakdown": breakdown,
              "write": write_rows, "decode": rows}
    (args.out / "kvtc_kernels.json").write_text(json.dumps(result, indent=2))
    if not cpu:
        plot(rows, args.out / "kvtc_kernels.png")
    print()
    print("correctness:", "ALL OK" if all_ok else "FAILURES")
    for c in checks:
        print("  ", c)
    print("compress-on-write:")
    for w in write_rows:
        print(f"   {w['tokens']:>6} tokens: {w['ms']:.3f} ms, {w['tokens_per_s'] / 1e6:.2f} M tok/s")
    print("split-kernel configs:", best)
    print_table(rows, copy_bw, gpu)
    if unpack_ab or head_decode:
        cols = (["head"] if head_decode else []) + [f"unpack{u}" for u in unpack_ab]
        base_key = "kvtc_ms_head" if head_decode else "kvtc_ms_unpack0"
        print()
        print(f"side by side (same run, same cells): ms; x = {base_key[8:]} / this")
        print("| B | ctx | q | default | " + " | ".join(cols) + " | x default | "
              + " | ".join(f"x {c}" for c in cols[1:]) + " |")
        print("|" + "---|" * (5 + 2 * len(cols)))
        for r in rows:
            base = r.get(base_key, float("nan"))
            print(f"| {r['batch']} | {r['context'] // 1024}K | {r['q_tokens']} | {r['kvtc_ms']:.4f} | "
                  + " | ".join(f"{r['kvtc_ms_' + c]:.4f}" for c in cols)
                  + f" | {base / r['kvtc_ms']:.2f} | "
                  + " | ".join(f"{base / r['kvtc_ms_' + c]:.2f}" for c in cols[1:]) + " |")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
