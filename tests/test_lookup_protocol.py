"""The one lookup protocol: make_lookup's backends, the policy's errors, the collection given a lookup."""
import pytest
import torch

from embtables.collection import PooledEmbeddingCollection, build_embeddings, lookup_layout
from embtables.config import load_config
from embtables.errors import ConfigError
from embtables.kernels import PooledLookup, make_lookup
from embtables.kernels.lookup import resolve_backend
from embtables.methods.full import Full
from embtables.methods.multiplexed import Multiplexed
from embtables.specs import FeatureSpec, TableSpec
from helpers import random_batch

TABLES = [TableSpec("a", 30, 8), TableSpec("b", 20, 6)]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_every_lookup_follows_the_protocol_in_key_order(backend):
    lookup = make_lookup(TABLES, key_tables=[1, 0, 1], backend=backend, seed=1)
    assert isinstance(lookup, PooledLookup) and len(lookup.backends) == len(TABLES)
    values, offsets = torch.tensor([3, 7, 19, 0]), torch.tensor([0, 1, 2, 3, 3, 4, 4])  # 3 keys × 2 bags
    out = lookup(values, offsets)
    a, b = lookup.table_weights()
    expected = torch.cat([torch.stack([b[3], b[7]]), torch.stack([a[19], torch.zeros(8)]),
                          torch.stack([b[0], torch.zeros(6)])], dim=1)
    torch.testing.assert_close(out, expected)


def test_the_backend_policy_refuses_what_cannot_run_here():
    with pytest.raises(ConfigError, match="unknown"):
        resolve_backend("sharded", "cpu")
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_backend("cpu_fused", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA kernels"):
            resolve_backend("fbgemm", "cuda")
        with pytest.raises(ConfigError, match="triton"):
            resolve_backend("triton", "cuda", triton_ok=True)
        assert resolve_backend("auto", "cuda") == "torch"  # nothing faster can run on this machine's CUDA
    with pytest.raises(ConfigError, match="raw ids"):
        make_lookup(TABLES, backend="triton")


@pytest.mark.parametrize("backend", ["sharded", "tbe"])
def test_an_unknown_embedding_backend_is_a_config_error(backend):
    with pytest.raises(ConfigError, match="embedding.backend"):
        load_config(None, ["data.train=x", f"embedding.backend={backend}"])


def test_the_collection_runs_any_lookup_it_is_given():
    """A lookup that is not one of make_lookup's (here: one that scales the torch reference)
    is run as given: the collection never asks which lookup it has."""
    features = [FeatureSpec("x", 50), FeatureSpec("y", 40), FeatureSpec("z", 30)]
    methods = [Full(features[0], 8), *Multiplexed.solve_group(features[1:], 8, 2.0, chunks=2)]
    ref = build_embeddings(features, 8, methods, backend="torch", seed=3)
    tables, _, key_tables = lookup_layout(methods)
    inner = make_lookup(tables, key_tables, "torch", seed=3)

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.tables, self.backends = inner, inner.tables, ["doubled"] * len(tables)

        def forward(self, values, offsets, weights=None):
            return 2 * self.inner(values, offsets, weights)

    doubled = PooledEmbeddingCollection(features, 8, methods, Doubled())
    batch = random_batch(features, 16, 0)
    torch.testing.assert_close(doubled(batch), 2 * ref(batch))
