"""Per-stage profile of the streaming merge: where the seconds of ``mlora-export merge`` go.

Runs every stage of the merge on its own, single-threaded, over every tensor of a base built by
``bench_merge.py`` (same tiles, same buffers as the real merge), and times it:

- start-up: ``import torch``, the transformers import behind the model-type check, ``import numpy``
  (each in a fresh process);
- read: ``pread`` of every tensor into a reused buffer (before), or its read-only map (after);
- bf16→f32, product (``s·B·A`` of the tile), add, round (f32→bf16): for the targeted weights, in
  three variants: ``torch`` (the merge before issue 16: row blocks of 256 Ki elements,
  ``.to(float32)``, ``addmm_``, ``copy_``; product and add also timed apart), ``numpy`` (the
  numpy kernels of :mod:`mlora_export.converters.merge_kernels`, the merge's first issue-16
  version and its fallback now) and ``c`` (the compiled kernel, all four in one pass);
- write: ``pwritev`` of every output tensor into a file in the page cache (deleted after), and
  through the ``O_DIRECT`` appender from a buffer it must copy (staged) or one placed as it lies
  in the file (written where it is).

Usage::

    python benchmarks/profile_merge.py --base /tmp/mlora-bench-merge/base-22-bf16 \
        --adapter /tmp/mlora-bench-merge/nested-22 --rank 64 [--variants torch,numpy]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _startup(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--variants", default="torch,numpy,c")
    args = ap.parse_args()
    variants = args.variants.split(",")

    import numpy as np

    from mlora_export.adapter import NestedAdapter
    from mlora_export.base import scan_base
    from mlora_export.converters import merge as merge_mod
    from mlora_export.converters import merge_kernels as mk
    from mlora_export.io.direct_io import ALIGN, DirectAppender
    from mlora_export.threads import blas_threads

    times: dict[str, float] = {}

    def tick(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        times[name] = times.get(name, 0.0) + t1 - t0
        return t1

    times["start-up: python + import numpy"] = _startup("import numpy")
    times["start-up: python + import torch"] = _startup("import torch")
    times["start-up: python + transformers' CONFIG_MAPPING_NAMES"] = _startup(
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES")

    nested = NestedAdapter.load(args.adapter)
    k = nested.check_rank(args.rank)
    base = scan_base(args.base)
    located = base.locate()
    mapping, _, _ = merge_mod.resolve_weight_keys(nested.modules, located)
    targets = {key: name for name, key in mapping.items()}
    buffers = merge_mod.BufferPool()
    scratch = mk.Scratch()
    if "torch" in variants:
        import torch

        torch.set_num_threads(1)
    out_file = args.base.parent / "profile-out.tmp"
    wfd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    direct = DirectAppender(args.base.parent / "profile-direct.tmp")
    placed_out = DirectAppender(args.base.parent / "profile-placed.tmp")
    placed_offset = 0
    offset = 0
    n_target = n_elems = 0
    try:
        with nested.reader() as rd, blas_threads(1):
            for shard in base.shards:
                fd = os.open(shard.path, os.O_RDONLY)
                try:
                    for name, info in shard.header.tensors.items():
                        t0 = time.perf_counter()
                        region = merge_mod.MappedRegion(fd, info.nbytes, shard.header.data_start + info.begin)
                        region.close()
                        t0 = tick("read: map with MAP_POPULATE (after), all tensors", t0)
                        raw = merge_mod.pread(fd, info.nbytes, shard.header.data_start + info.begin, buffers)
                        t0 = tick("read: pread into a reused buffer (before), all tensors", t0)
                        if name in targets:
                            n_target += 1
                            n_elems += info.nbytes // 2
                            module = targets[name]
                            a_bits, b_bits = rd.lora_A_data(module, k), rd.lora_B_data(module, k)
                            a = mk.as_float32(a_bits, nested.dtype)
                            bs = mk.as_float32(b_bits, nested.dtype) * np.float32(nested.scale(k))
                            del a_bits, b_bits
                            w = raw.view(np.uint16).reshape(info.shape)
                            if "numpy" in variants:
                                m, n = w.shape
                                cols = min(n, mk.TILE_COLUMNS)
                                rows = max(1, mk.TILE_ELEMENTS // cols)
                                tiles = [(r0, min(m, r0 + rows), c0, min(n, c0 + cols)) for c0 in range(0, n, cols) for r0 in range(0, m, rows)]
                                out = np.empty_like(w)
                                out.fill(0)  # its pages touched before the clock starts, as the merge's reused buffers are
                                t0 = time.perf_counter()
                                for r0, r1, c0, c1 in tiles:
                                    tile, _, _ = scratch.views(r1 - r0, c1 - c0)
                                    mk.widen_bf16(w[r0:r1, c0:c1], tile)
                                t0 = tick("numpy: bf16→f32", t0)
                                for r0, r1, c0, c1 in tiles:
                                    _, prod, _ = scratch.views(r1 - r0, c1 - c0)
                                    np.matmul(bs[r0:r1], a[:, c0:c1], out=prod)
                                t0 = tick("numpy: product s·B·A (sgemm)", t0)
                                for r0, r1, c0, c1 in tiles:
                                    tile, prod, _ = scratch.views(r1 - r0, c1 - c0)
                                    np.add(tile, prod, out=tile)
                                t0 = tick("numpy: add", t0)
                                for r0, r1, c0, c1 in tiles:
                                    tile, _, bits = scratch.views(r1 - r0, c1 - c0)
                                    mk.round_bf16(tile, out[r0:r1, c0:c1], bits)
                                t0 = tick("numpy: round f32→bf16", t0)
                                mk._merge_bf16_pairs(w, bs, a, out, scratch)
                                t0 = tick("numpy: all four, uint32 column pairs (the merge's path)", t0)
                                for r0, r1, c0, c1 in tiles:
                                    tile, prod, bits = scratch.views(r1 - r0, c1 - c0)
                                    mk.widen_bf16(w[r0:r1, c0:c1], tile)
                                    np.matmul(bs[r0:r1], a[:, c0:c1], out=prod)
                                    np.add(tile, prod, out=tile)
                                    mk.round_bf16(tile, out[r0:r1, c0:c1], bits)
                                t0 = tick("numpy: all four in one pass over the tiles (with casts)", t0)
                            if "c" in variants:
                                out = np.empty_like(w)
                                out.fill(0)
                                t0 = time.perf_counter()
                                mk.merge_tensor(w, "BF16", bs, a, out, "BF16", scratch, kernel="c")
                                t0 = tick("c: all four in one pass (the compiled kernel: the merge's path now)", t0)
                            if "torch" in variants:
                                tw = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
                                ta, tb = torch.from_numpy(a), torch.from_numpy(bs)
                                tout = torch.empty_like(tw).fill_(0)  # touched before the clock starts
                                rows = max(1, 256 * 1024 // tw.shape[1])
                                blocks = [(r0, min(tw.shape[0], r0 + rows)) for r0 in range(0, tw.shape[0], rows)]
                                t0 = time.perf_counter()
                                for r0, r1 in blocks:
                                    blk = tw[r0:r1].to(torch.float32)
                                t0 = tick("torch: bf16→f32", t0)
                                blk = torch.empty(rows, tw.shape[1])
                                prod = torch.empty(rows, tw.shape[1])
                                for r0, r1 in blocks:
                                    torch.mm(tb[r0:r1], ta, out=prod[: r1 - r0])
                                t0 = tick("torch: product s·B·A (mm)", t0)
                                for r0, r1 in blocks:
                                    blk[: r1 - r0].add_(prod[: r1 - r0])
                                t0 = tick("torch: add", t0)
                                for r0, r1 in blocks:
                                    tout[r0:r1].copy_(blk[: r1 - r0])
                                t0 = tick("torch: round f32→bf16", t0)
                                for r0, r1 in blocks:
                                    b2 = tw[r0:r1].to(torch.float32)
                                    b2.addmm_(tb[r0:r1], ta)
                                    tout[r0:r1].copy_(b2)
                                t0 = tick("torch: all fused as before (to, addmm_, copy_)", t0)
                        t0 = time.perf_counter()
                        os.pwrite(wfd, memoryview(raw), offset)
                        offset += info.nbytes
                        t0 = tick("write: pwrite into the page cache (before), all tensors", t0)
                        direct.write(memoryview(raw))
                        tick("write: O_DIRECT through the staging buffer (a copy), all tensors", t0)
                        placed = buffers.get(info.nbytes, placed_offset % ALIGN)  # as the merge places its output
                        placed[:] = raw
                        t0 = time.perf_counter()
                        placed_out.write(memoryview(placed))
                        tick("write: O_DIRECT from buffers placed as they lie in the file (the merge's path now), all tensors", t0)
                        placed_offset += info.nbytes
                        buffers.put([raw, placed])
                finally:
                    os.close(fd)
    finally:
        os.close(wfd)
        os.unlink(out_file)
        direct.close()
        os.unlink(args.base.parent / "profile-direct.tmp")
        placed_out.close()
        os.unlink(args.base.parent / "profile-placed.tmp")
    print(f"{n_target} targeted weights ({n_elems / 1e9:.2f} G elements), rank {k}, load average {os.getloadavg()}")
    print("| stage | seconds (one thread) |")
    print("|---|---:|")
    for name, sec in times.items():
        print(f"| {name} | {sec:.2f} |")


if __name__ == "__main__":
    main()
