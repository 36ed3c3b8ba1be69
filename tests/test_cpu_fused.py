"""The compiled CPU lookup equals the torch reference: outputs, gradients, weights and state."""
import sys

import pytest
import torch
import torch.nn.functional as F

from embtables.kernels import RowwiseAdagrad, make_lookup
from embtables.kernels import cpu_fused
from embtables.kernels.cpu_fused import CpuFusedLookup
from embtables.kernels.torch_lookup import TorchLookup
from embtables.specs import TableSpec

from helpers import needs_cpu_fused
from test_kernels import random_bags, train_steps


# Dims with and without a specialised inner loop (4, 8, 16, 64, 128) and odd ones.
TABLES = [TableSpec("a", 50, 8), TableSpec("b", 7, 4), TableSpec("c", 300, 16), TableSpec("d", 20, 3),
          TableSpec("e", 40, 64), TableSpec("f", 9, 128), TableSpec("g", 30, 33)]


@pytest.fixture(autouse=True)
def every_call_threaded(monkeypatch):
    """Tiny test shapes would run single-threaded (grain size): force the threaded paths."""
    monkeypatch.setattr(cpu_fused, "GRAIN", 1)


def initial(tables, seed=0):
    return [t.init_weight(torch.Generator().manual_seed(seed + i)) for i, t in enumerate(tables)]


def assert_same_tables(ref, fast):
    for a, b in zip(ref.table_weights(), fast.table_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.optimizer_states(), fast.optimizer_states()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cpu_fused
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_torch_reference_over_several_steps(weighted, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        opt = RowwiseAdagrad(lr=0.1)
        ref = TorchLookup(TABLES, opt, initial=initial(TABLES))
        fast = CpuFusedLookup(TABLES, opt, initial=initial(TABLES))
        for a, b in zip(train_steps(ref, TABLES, 4, weighted), train_steps(fast, TABLES, 4, weighted)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(before)
    assert_same_tables(ref, fast)
    assert all(float(s.abs().sum()) > 0 for s in fast.optimizer_states())


@needs_cpu_fused
@pytest.mark.parametrize("weighted", [False, True])
def test_long_bags_heavy_duplicates_and_mixed_dims_match_the_reference(weighted):
    """Batches far longer than the kernels' prefetch distances, bags of up to 64 ids, a 3-row
    table every id of which repeats hundreds of times, odd and wide dims, two threads."""
    tables = [TableSpec("tiny", 3, 16), TableSpec("wide", 500, 128), TableSpec("odd", 90, 33),
              TableSpec("narrow", 2000, 4)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt = RowwiseAdagrad(lr=0.05)
        ref = TorchLookup(tables, opt, initial=initial(tables))
        fast = CpuFusedLookup(tables, opt, initial=initial(tables))
        for step in range(3):
            indices, offsets = random_bags(tables, batch=300, max_len=64, seed=10 + step)
            psw = torch.rand(indices.numel(), generator=torch.Generator().manual_seed(step)) if weighted else None
            grad = torch.randn(300, fast.out_dim, generator=torch.Generator().manual_seed(50 + step))
            outs = [m(indices, offsets, psw) for m in (ref, fast)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)  # sums of up to 64 rows
            for out in outs:
                out.backward(grad)
    finally:
        torch.set_num_threads(before)
    assert_same_tables(ref, fast)


@needs_cpu_fused
def test_duplicates_are_merged_before_one_update_and_empty_bags_are_zero():
    table = TableSpec("t", 5, 4)
    fast = CpuFusedLookup([table], RowwiseAdagrad(lr=0.5), initial=initial([table]))
    w0 = fast.table_weights()[0].clone()
    indices = torch.tensor([1, 1, 3, 1])        # bags: [1, 1], [], [3, 1]
    offsets = torch.tensor([0, 2, 2, 4])
    out = fast(indices, offsets)
    torch.testing.assert_close(out, torch.stack([2 * w0[1], torch.zeros(4), w0[3] + w0[1]]))
    out.sum().backward()                        # d/dw[1] = 3 (three occurrences), d/dw[3] = 1
    for row, g in ((1, 3.0), (3, 1.0)):
        torch.testing.assert_close(fast.table_weights()[0][row], w0[row] - 0.5 * g / (g + 1e-8))
        assert float(fast.optimizer_states()[0][row]) == pytest.approx(g * g)
    torch.testing.assert_close(fast.table_weights()[0][[0, 2, 4]], w0[[0, 2, 4]])


@needs_cpu_fused
@pytest.mark.parametrize("threads", [1, 2])
def test_shared_table_merges_gradients_of_every_group_reading_it(threads):
    # Groups 0 and 2 read table 0 (as multiplexing does): one merged update per row.
    tables = [TableSpec("shared", 30, 8), TableSpec("own", 10, 8)]
    groups = [0, 1, 0]
    opt = RowwiseAdagrad(lr=0.2)
    fast = CpuFusedLookup(tables, opt, initial=initial(tables), feature_tables=groups)
    ref = [w.clone().requires_grad_() for w in initial(tables)]
    ref_state = [torch.zeros(t.rows) for t in tables]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(3):
            indices, offsets = random_bags([tables[t] for t in groups], batch=12, max_len=4, seed=step)
            batch = 12
            outs = []
            for gi, t in enumerate(groups):
                bags = offsets[gi * batch:(gi + 1) * batch + 1]
                outs.append(F.embedding_bag(indices[bags[0]:bags[-1]], ref[t], bags[:-1] - bags[0], mode="sum"))
            expected = torch.cat(outs, 1)
            target = torch.linspace(-1, 1, expected.shape[1])
            ((expected - target) ** 2).sum().backward()
            with torch.no_grad():
                for t, w in enumerate(ref):
                    used = torch.unique(torch.cat([indices[offsets[gi * batch]:offsets[(gi + 1) * batch]]
                                                   for gi, tt in enumerate(groups) if tt == t]))
                    opt.apply_(w.data, ref_state[t], used, w.grad[used])
                    w.grad = None
            out = fast(indices, offsets)
            torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
            ((out - target) ** 2).sum().backward()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(ref, fast.table_weights()):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref_state, fast.optimizer_states()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cpu_fused
def test_one_large_table_is_split_across_threads_exactly():
    table = [TableSpec("big", 1000, 16)]
    opt = RowwiseAdagrad(lr=0.05)
    ref = TorchLookup(table, opt, initial=initial(table))
    fast = CpuFusedLookup(table, opt, initial=initial(table))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # one table, two threads: rows are partitioned
    try:
        for a, b in zip(train_steps(ref, table, 3, False), train_steps(fast, table, 3, False)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(before)
    assert_same_tables(ref, fast)


@needs_cpu_fused
def test_learnable_per_sample_weights_get_the_reference_gradient():
    tables = TABLES[:3]
    indices, offsets = random_bags(tables, batch=8, max_len=3, seed=4)
    results = []
    for cls in (TorchLookup, CpuFusedLookup):
        lookup = cls(tables, RowwiseAdagrad(lr=0.1), initial=initial(tables))
        psw = torch.rand(indices.numel(), generator=torch.Generator().manual_seed(2)).requires_grad_()
        (lookup(indices, offsets, psw) * torch.linspace(-1, 1, 28)).sum().backward()
        results.append((psw.grad, lookup.table_weights()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cpu_fused
def test_eval_and_no_grad_leave_tables_alone():
    fast = CpuFusedLookup(TABLES, initial=initial(TABLES)).eval()
    before = [w.clone() for w in fast.table_weights()]
    indices, offsets = random_bags(TABLES, 8, 3, seed=5)
    fast(indices, offsets).sum().backward()  # eval mode: backward runs, no update
    with torch.no_grad():
        fast(indices, offsets)
    for a, b in zip(before, fast.table_weights()):
        assert torch.equal(a, b)


@needs_cpu_fused
def test_out_of_range_index_names_the_table():
    fast = CpuFusedLookup(TABLES[:2], initial=initial(TABLES[:2]))
    indices = torch.tensor([3, 1, 7])           # table "b" has 7 rows: 7 is out of range
    offsets = torch.tensor([0, 1, 2, 3, 3])     # batch 2: a0=[3] a1=[1] b0=[7] b1=[]
    with pytest.raises(IndexError, match="table 'b'.*index 7"):
        fast(indices, offsets)


@needs_cpu_fused
def test_fused_lookup_backend_and_state_round_trip():
    opt = RowwiseAdagrad(lr=0.1)
    ref = make_lookup(TABLES, backend="torch", optimizer=opt, seed=3)
    fast = make_lookup(TABLES, backend="cpu_fused", optimizer=opt, seed=3)
    assert fast.backends == ["cpu_fused"] * len(TABLES)
    for a, b in zip(train_steps(ref, TABLES, 3, True), train_steps(fast, TABLES, 3, True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_same_tables(ref, fast)
    dst = make_lookup(TABLES, backend="cpu_fused", seed=9)
    dst.load_lookup_state(fast.lookup_state())
    assert_same_tables(fast, dst)


@needs_cpu_fused
def test_a_replaced_table_buffer_is_the_one_read_and_updated():
    """The kernels' table addresses are cached: replacing a buffer (not copying into it) must
    still reach the new tensor, in the forward and in the update."""
    tables = [TableSpec("a", 10, 4), TableSpec("b", 6, 8)]
    fast = CpuFusedLookup(tables, RowwiseAdagrad(lr=0.5), initial=initial(tables))
    indices, offsets = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 4])
    fast(indices, offsets).sum().backward()  # builds the cache
    fast.weight_1 = torch.full((6, 8), 2.0)
    fast.momentum_1 = torch.zeros(6)
    out = fast(indices, offsets)
    assert torch.equal(out[:, 4:], torch.full((2, 8), 2.0))
    out.sum().backward()
    assert bool((fast.weight_1[3] < 2.0).all()) and float(fast.momentum_1[3]) > 0.0
    assert torch.equal(fast.weight_1[0], torch.full((8,), 2.0))


def test_missing_kernels_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_library", lambda: None)
    monkeypatch.setattr("embtables.kernels.lookup.cpu_fused_available", lambda: False)
    with pytest.warns(UserWarning, match="not built"):
        lookup = make_lookup(TABLES, backend="cpu_fused", seed=0)
    assert lookup.backends == ["torch"] * len(TABLES)
    with pytest.raises(RuntimeError, match="not built"):
        CpuFusedLookup(TABLES)


@needs_cpu_fused
def test_kernel_bench_reports_every_backend_and_the_speedup():
    import argparse

    from embtables.pipelines.bench.kernels import add_kernel_args, run_kernel_bench

    parser = argparse.ArgumentParser()
    add_kernel_args(parser)
    args = parser.parse_args(["--tables", "3", "--rows", "500", "--dims", "8,12", "--batch", "64",
                              "--iters", "2", "--warmup", "1", "--batches", "2", "--copy-mb", "8"])
    report = run_kernel_bench(args)
    assert report["memcpy_gbps"] > 0
    for dim in ("8", "12"):
        result = report["by_dim"][dim]
        for name in report["backends"]:
            assert result[name]["forward_ms"] > 0 and result[name]["train_step_ms"] > 0
            assert 0 < result[name]["train_step_bw_fraction"]
        if "fbgemm" in report["backends"]:
            diff = result["cpu_fused"]["max_abs_diff_vs_fbgemm"]
            assert diff["outputs"] < 1e-5 and diff["weights"] < 1e-5  # same results as FBGEMM
    if "fbgemm" in report["backends"]:
        assert report["speedup_vs_fbgemm_train_step"] > 0


@needs_cpu_fused
def test_kernel_bench_sweeps_one_axis_at_a_time():
    import argparse

    from embtables.pipelines.bench.kernels import add_kernel_args, run_kernel_bench

    parser = argparse.ArgumentParser()
    add_kernel_args(parser)
    args = parser.parse_args(["--tables", "2", "--rows", "300", "--dims", "8", "--batch", "32", "--iters", "1",
                              "--warmup", "0", "--batches", "1", "--copy-mb", "8", "--backends", "cpu_fused",
                              "--sweep", "tables=1,3", "--sweep", "pooling=4"])
    report = run_kernel_bench(args)
    assert report["cpu"]["model"] and "by_dim" not in report  # only the sweeps' shapes ran
    assert [p["tables"] for p in report["sweeps"]["tables"]] == [1, 3]
    pooled = report["sweeps"]["pooling"][0]
    assert pooled["pooling"] == 4 and pooled["by_dim"]["8"]["cpu_fused"]["train_step_ms"] > 0
    # more tables move more bytes (the other settings held)
    by_tables = [p["by_dim"]["8"]["train_step_bytes"] for p in report["sweeps"]["tables"]]
    assert by_tables[1] > 2 * by_tables[0]
    for bad in ("dims=8", "tables=", "rows=0", "pooling=x"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--sweep", bad])
        assert exit_.value.code == 2


@needs_cpu_fused
def test_auto_picks_cpu_fused_on_cpu_only():
    from embtables.errors import ConfigError
    from embtables.kernels.lookup import resolve_backend

    assert resolve_backend("auto", "cpu") == "cpu_fused"
    assert resolve_backend("auto", "cuda") != "cpu_fused"  # GPUs: TBE, Triton or torch
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_backend("cpu_fused", "cuda")


@needs_cpu_fused
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_kernels_share_torchs_openmp_runtime():
    """One OpenMP runtime in the process: the kernels' threads are torch's (a second runtime
    would bring a second pool competing with torch's for the cores)."""
    assert cpu_fused._library() is not None
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "gomp" in line.rsplit("/", 1)[-1] or "iomp" in line}
    assert len(runtimes) <= 1, runtimes
