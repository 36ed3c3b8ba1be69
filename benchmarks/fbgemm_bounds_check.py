"""Cost of catching out-of-range ids on the FBGEMM CPU backend (issue 13): TBE forward under
each of its bounds-check modes, and FbgemmLookup's own vectorised check (what it runs instead).

    .venv/bin/python benchmarks/fbgemm_bounds_check.py [--tables 26] [--batch 4096] [--rows 100000]
"""
import argparse
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen,
)

from embtables.kernels.fbgemm_lookup import FbgemmLookup
from embtables.specs import TableSpec


def median_ms(fn, reps=5, calls=20):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return sorted(times)[reps // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    tables = [TableSpec(f"t{i}", args.rows, 16) for i in range(args.tables)]
    n = args.tables * args.batch
    indices, offsets = torch.randint(0, args.rows, (n,)), torch.arange(n + 1)  # one id a bag
    for mode in (BoundsCheckMode.WARNING, BoundsCheckMode.FATAL, BoundsCheckMode.NONE):
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(t.rows, t.dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, weights_precision=SparseType.FP32,
            pooling_mode=PoolingMode.SUM, device="cpu", bounds_check_mode=mode)
        print(f"TBE forward, bounds_check_mode {mode.name}: {median_ms(lambda: tbe(indices, offsets)):.3f} ms")
    lookup = FbgemmLookup(tables)
    print(f"FbgemmLookup.check_bounds: {median_ms(lambda: lookup.check_bounds(indices, offsets)):.3f} ms")
    print(f"FbgemmLookup forward (check + TBE NONE): {median_ms(lambda: lookup(indices, offsets)):.3f} ms")


if __name__ == "__main__":
    main()
