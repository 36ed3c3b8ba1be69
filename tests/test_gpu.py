"""GPU tests (marker `gpu`; `make test-gpu`): skipped without CUDA.

Compiled Triton kernels against the CPU torch reference with long bags and hot rows; the
dispatching lookup on CUDA with mixed dims; `embtables train` on CUDA for backends auto, torch
and triton against the same job on CPU; resume across devices; serving on CUDA; TBE only where
the CUDA build of fbgemm_gpu is installed. Nothing here imports Ray.
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    # Run this file alone (make test-gpu): tests/test_triton.py switches Triton to its CPU interpreter.
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels not compiled"),
]

from torchrec import KeyedJaggedTensor  # noqa: E402

from embtables.config import load_config  # noqa: E402
from embtables.kernels.fbgemm_lookup import fbgemm_cuda_available  # noqa: E402
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth  # noqa: E402
from embtables.pipelines.train.build import build_model, resolve_inputs  # noqa: E402
from embtables.pipelines.train.checkpoint import model_state  # noqa: E402
from embtables.pipelines.train.local import train  # noqa: E402
from embtables.specs import TableSpec  # noqa: E402

CUDA = torch.device("cuda")
needs_fbgemm_cuda = pytest.mark.skipif(not fbgemm_cuda_available(),
                                       reason="fbgemm_gpu has no CUDA kernels here (CPU build or none)")
# One feature per Triton-supported method, cardinalities big enough for each to compress.
MIXED = {"C1": "full", "C2": "hash", "C3": "qr", "C4": "binary_code", "C5": "multiplexed"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("gpu") / "synth", preset="tiny", rows=20000, seed=3,
                        cardinalities=[200, 3000, 5000, 8000, 20000])


def config(tmp_path, data, *overrides, mixed=True):
    path = tmp_path / "cfg.yaml"
    features = ", ".join(f"{f}: {{compression: {{method: {m}, ratio: 4}}}}" for f, m in MIXED.items() if m != "full")
    path.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [16], top_mlp: [32]}}\n"
                    f"embedding: {{dim: 8, backend: torch, features: {{{features if mixed else ''}}}}}\n"
                    "train: {batch_size: 512, epochs: 1, threads: 2, eval_batch_size: 8192, prefetch: 2}\n")
    return load_config(path, list(overrides))


def long_hot_bags(inputs, keys, batch, seed, weighted=False):
    """Bags of 0..39 ids (> 16: several Triton chunks), skewed so ids repeat hundreds of times."""
    g = torch.Generator().manual_seed(seed)
    rows = {f.name: f.rows for f in inputs.features}
    lengths = torch.randint(0, 40, (len(keys) * batch,), generator=g)
    values = torch.cat([(torch.rand(int(lengths[i * batch:(i + 1) * batch].sum()), generator=g).pow(4)
                         * rows[k]).long().clamp_max(rows[k] - 1) for i, k in enumerate(keys)])
    weights = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def assert_tables_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        got, want = a[name].cpu(), b[name].cpu()
        if name.endswith(".momentum"):  # sums of squares reach 1e8 on hot rows: compare relatively
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_triton_kernels_match_the_reference_with_long_bags_and_hot_rows(tmp_path, synth):
    cfg = config(tmp_path, synth)
    inputs = resolve_inputs(cfg)
    ref = build_model(cfg, inputs, backend="torch", device="cpu")
    fast = build_model(cfg, inputs, backend="triton", device=CUDA)
    keys = ref.embeddings.input_keys
    for step in range(3):
        batch = long_hot_bags(inputs, keys, 128, seed=10 + step)
        assert int(batch.lengths().max()) > 16 and int(torch.bincount(batch.values()).max()) > 32
        expected = ref.embeddings(batch)
        got = fast.embeddings(fast.embeddings.order_input(batch).to(CUDA))
        torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
        target = torch.linspace(-1, 1, expected.numel()).view_as(expected)
        ((expected - target) ** 2).sum().backward()
        ((got - target.to(CUDA)) ** 2).sum().backward()
    assert_tables_close(model_state(fast)["tables"], model_state(ref)["tables"])


def test_dispatching_lookup_on_cuda_with_mixed_dims():
    from embtables.kernels import make_lookup

    tables = [TableSpec("a", 500, 8), TableSpec("b", 300, 6), TableSpec("c", 200, 8)]
    ref = make_lookup(tables, backend="torch", device="cpu", seed=1)
    dev = make_lookup(tables, backend="auto", device=CUDA, seed=1)  # TBE for dims 8 where its CUDA build is
    assert all(p.device.type == CUDA.type for p in [*dev.parameters(), *dev.buffers()])
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 30, (3 * 64,), generator=g)
    values = torch.cat([torch.randint(0, t.rows, (int(lengths[i * 64:(i + 1) * 64].sum()),), generator=g)
                        for i, t in enumerate(tables)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out_ref = ref(values, offsets)
    out = dev(values.to(CUDA), offsets.to(CUDA))
    assert out.shape == (64, 22)
    torch.testing.assert_close(out.cpu(), out_ref.detach(), rtol=1e-5, atol=1e-5)
    out_ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    for name, want in ref.lookup_state().items():
        torch.testing.assert_close(dev.lookup_state()[name].cpu(), want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, synth):
    tmp = tmp_path_factory.mktemp("cpu_run")
    return train(config(tmp, synth, "train.device=cpu"), tmp / "run", progress=False)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_train_on_cuda_matches_the_cpu_run(tmp_path, synth, cpu_run, backend):
    metrics = train(config(tmp_path, synth, "train.device=cuda", f"embedding.backend={backend}"),
                    tmp_path / "run", progress=False)
    assert metrics["device"].startswith("cuda")
    expected = {"auto": ["fbgemm", "torch"] if fbgemm_cuda_available() else ["triton"],
                "torch": ["torch"], "triton": ["triton"]}[backend]
    assert set(metrics["backends"]) <= set(expected) and metrics["backends"]
    assert metrics["train_rows_seen"] == cpu_run["train_rows_seen"]
    assert abs(metrics["auc"] - cpu_run["auc"]) < 1e-3, (metrics["auc"], cpu_run["auc"])


@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_devices(tmp_path, synth, first, second):
    steps = ["train.max_steps=10"]
    train(config(tmp_path, synth, f"train.device={first}", *steps), tmp_path / "run", progress=False)
    resumed = train(config(tmp_path, synth, f"train.device={second}", "train.max_steps=25"),
                    tmp_path / "run", resume=True, progress=False)
    straight = train(config(tmp_path, synth, f"train.device={second}", "train.max_steps=25"),
                     tmp_path / "straight", progress=False)
    assert resumed["steps"] == straight["steps"] == 25
    assert resumed["device"].startswith(second)
    assert abs(resumed["auc"] - straight["auc"]) < 1e-3, (resumed["auc"], straight["auc"])


def test_serving_on_cuda_matches_cpu(tmp_path, synth):
    import embtables
    from embtables.pipelines.serve.export import export_run
    from embtables.pipelines.data.batches import iterate_batches

    cfg = config(tmp_path, synth, "train.device=cuda", "train.max_steps=10", mixed=False)
    train(cfg, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "export", quantize="int8")
    on_cpu = embtables.load(tmp_path / "export", device="cpu")
    on_gpu = embtables.load(tmp_path / "export", device="cuda")
    batch = next(iterate_batches(synth, "valid", 1024, shuffle=False))
    dense = batch.dense[:, resolve_inputs(cfg).dense_index]
    torch.testing.assert_close(torch.as_tensor(on_gpu.predict_proba(dense, batch.sparse)),
                               torch.as_tensor(on_cpu.predict_proba(dense, batch.sparse)), rtol=1e-4, atol=1e-5)


@needs_fbgemm_cuda
def test_tbe_on_cuda_matches_the_cpu_run(tmp_path, synth, cpu_run):
    metrics = train(config(tmp_path, synth, "train.device=cuda", "embedding.backend=fbgemm"),
                    tmp_path / "run", progress=False)
    assert "fbgemm" in metrics["backends"]
    assert abs(metrics["auc"] - cpu_run["auc"]) < 1e-3


@needs_fbgemm_cuda
def test_sharded_nccl_run_on_cuda(tmp_path, synth):
    pytest.importorskip("ray", reason="distributed runs need Ray")
    from embtables.pipelines.train.distributed import train_distributed

    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"a sharded NCCL run needs 2 GPUs, this machine has {n}")
    metrics = train_distributed(config(tmp_path, synth, "train.device=cuda", "train.workers=2",
                                       "train.sharding=row_wise"), tmp_path / "run")
    assert metrics["device"].startswith("cuda") and metrics["auc"] > 0.55
