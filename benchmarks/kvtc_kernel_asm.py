"""Dump the KVTC split kernel's TTGIR / PTX / SASS and an opcode histogram of
its main loop, for reading what the compiler made of it (no timing). The
defaults dump lnarize_serve's (production) kernel; --variant / --unpack /
--tables-in-registers the experimental ones of kvtc_decode_variants.py.

    python benchmarks/kvtc_kernel_asm.py --out $OUT [--variant 1] [--block-t 64]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvtc_decode_variants import decoder  # noqa: E402

from lnarize_serve.kvtc.format.fit import random_layer_codec  # noqa: E402
from lnarize_serve.kvtc.kernels import decode_attention, prepare_layer_tables  # noqa: E402


def sass_of(kernel) -> str:
    cubin = kernel.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends" / "nvidia"
                                                / "bin" / "cuobjdump")
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", type=int, default=1)
    parser.add_argument("--block-t", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--q-tokens", type=int, default=1)
    parser.add_argument("--unpack", type=int, default=None, help="UNPACK mode (default: kernels')")
    parser.add_argument("--tables-in-registers", action="store_true",
                        help="pin the shift/mask tables instead of re-reading them per iteration")
    args = parser.parse_args()
    layer, _ = random_layer_codec(4, 256, 2.0, 4.0, seed=0)
    tables = prepare_layer_tables(layer.to("cuda"))
    ctx, nq = 4096, args.q_tokens
    cache = torch.randint(0, 256, (ctx // 16, 4, 16, layer.slot_bytes), dtype=torch.uint8, device="cuda")
    table = torch.arange(ctx // 16, dtype=torch.int32, device="cuda")[None]
    lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, nq], dtype=torch.int32, device="cuda")
    q = torch.randn(nq, 24, 256, device="cuda", dtype=torch.bfloat16)
    compiled: list = []
    decode = decoder(args.variant, not args.tables_in_registers, args.unpack)
    decode(q, cache, table, lens, qsl, tables, 0.0625, nq, ctx, block_t=args.block_t,
           num_warps=args.warps, compiled=compiled)
    k = compiled[0]
    kernel = "production" if decode is decode_attention else "variants"
    tag = (f"{kernel}_v{args.variant}{'_regtables' if args.tables_in_registers else ''}"
           f"_bt{args.block_t}_w{args.warps}_q{nq}_u{args.unpack}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"split_{tag}.ttgir").write_text(k.asm["ttgir"])
    sass = sass_of(k)
    (args.out / f"split_{tag}.sass").write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    print(f"{tag}: regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared}")
    print("static SASS opcode counts:", dict(ops.most_common(40)))
    print("convert_layout ops in TTGIR:", k.asm["ttgir"].count("convert_layout"))
    print("local_alloc/store/load:", k.asm["ttgir"].count("local_alloc"), k.asm["ttgir"].count("local_load"))


if __name__ == "__main__":
    main()
