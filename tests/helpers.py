"""Shared test helpers: hand-made id batches, Zipf-counted features and backend markers."""
import socket

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from embtables.kernels import cpu_fused_available, fbgemm_available
from embtables.specs import FeatureSpec

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm_gpu does not import")
needs_cpu_fused = pytest.mark.skipif(not cpu_fused_available(), reason="cpu_fused kernels are not built")


def kjt(bags: dict[str, list[list[int]]], weights: dict | None = None) -> KeyedJaggedTensor:
    """{feature: [bag of ids per sample]} (and optional per-id weights, same shape) → a KJT."""
    keys = list(bags)
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    w = None if weights is None else torch.tensor([x for k in keys for bag in weights[k] for x in bag])
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int64), weights=w)


def zipf(name: str, rows: int, s: float = 1.0) -> FeatureSpec:
    """A feature whose id i was seen ∝ (i+1)^-s times (ids are frequency-ordered)."""
    return FeatureSpec(name, rows, counts=(1e6 / np.arange(1, rows + 1) ** s).astype(np.int64) + 1)


def random_batch(features: list[FeatureSpec], batch: int, seed: int) -> KeyedJaggedTensor:
    """0–3 ids a bag, skewed to the frequent (low) ids."""
    g = torch.Generator().manual_seed(seed)
    bags = {}
    for f in features:
        lengths = torch.randint(0, 4, (batch,), generator=g)
        bags[f.name] = [(torch.rand(int(n), generator=g).pow(3) * f.rows).long().tolist() for n in lengths]
    return kjt(bags)


def assert_torch_and_fbgemm_agree(make, features: list[FeatureSpec]):
    """`make(backend)` builds one collection; both backends give the same [64, F, 16] outputs.
    Returns the FBGEMM collection (for backend assertions)."""
    ref, fused = make("torch"), make("fbgemm")
    assert "fbgemm" in fused.lookup.backends
    batch = random_batch(features, 64, 0)
    with torch.no_grad():
        a, b = ref(batch), fused(batch)
    assert a.shape == (64, len(features), 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return fused


def assert_a_step_changes_every_table(coll, features: list[FeatureSpec]) -> None:
    """One backward of a squared-sum loss moves every physical table (row-wise Adagrad in backward)."""
    before = [w.clone() for w in coll.lookup.table_weights()]
    (coll(random_batch(features, 256, 1)) ** 2).sum().backward()
    for t, w0, w1 in zip(coll.tables, before, coll.lookup.table_weights()):
        assert not torch.equal(w0, w1), f"table {t.name} did not change"


def free_port() -> int:
    """A port nobody listens on now (the OS picks it), for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(tmp_path, data, *overrides, epochs: int = 2) -> dict:
    """A small DLRM config over `data` (torch lookup, one thread), with `--set`-style overrides."""
    from embtables.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                    f"embedding: {{dim: 8, backend: torch}}\ntrain: {{batch_size: 256, epochs: {epochs}, threads: 1}}\n")
    return load_config(path, list(overrides))


def end_spawned_rank() -> None:
    """Leave a torch.multiprocessing.spawn rank once its results are written: destroy the
    process group, then exit without running C++ static destructors (a gloo thread torn down
    at interpreter exit sometimes aborted a finished rank with "terminate called without an
    active exception", failing a test whose work had passed)."""
    import os
    import sys

    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
