"""TorchRec drop-in (issue 13): CompressedEmbeddingBagCollection inside TorchRec's own DLRM models,
its training loop and DistributedModelParallel; exports served by TorchRec's quantized EBC."""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.datasets.random import RandomRecDataset
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embtables import CompressedEmbeddingBagCollection
from embtables.frequency_order import FrequencyOrder
from helpers import end_spawned_rank, free_port

KEYS = [f"cat_{i}" for i in range(4)]
HASH = 2000
DIM = 8
METHODS = ["hash", "qr", "mixed_dim", "multiplexed", "low_rank", "binary_code"]


def configs(pooling=PoolingType.SUM) -> list[EmbeddingBagConfig]:
    """cat_0 and cat_1 share one table (TorchRec's several feature names per table)."""
    return [EmbeddingBagConfig(name="t_shared", embedding_dim=DIM, num_embeddings=HASH, feature_names=KEYS[:2]),
            EmbeddingBagConfig(name="t_2", embedding_dim=DIM, num_embeddings=HASH, feature_names=[KEYS[2]]),
            EmbeddingBagConfig(name="t_3", embedding_dim=DIM, num_embeddings=HASH // 2, feature_names=[KEYS[3]],
                               pooling=pooling)]


def batches(n_generated=2, batch_size=64, seed=0):
    return iter(RandomRecDataset(keys=KEYS, batch_size=batch_size, hash_sizes=[HASH, HASH, HASH, HASH // 2],
                                 ids_per_feature=2, num_dense=5, manual_seed=seed,
                                 num_generated_batches=n_generated))


def dlrm(ebc, kind=DLRM):
    extra = {"dcn_num_layers": 2, "dcn_low_rank_dim": 4} if kind is DLRM_DCN else {}
    if kind is DLRM_Projection:
        extra = {"interaction_branch1_layer_sizes": [16, 2 * DIM], "interaction_branch2_layer_sizes": [16, DIM]}
    return kind(embedding_bag_collection=ebc, dense_in_features=5, dense_arch_layer_sizes=[16, DIM],
                over_arch_layer_sizes=[16, 1], **extra)


def compressed(method, ratio=10.0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no counts: the frequency-agnostic form (tested below)
        return CompressedEmbeddingBagCollection(tables=configs(), compression={"method": method, "ratio": ratio},
                                                **kw)


def train(model, steps=50):
    """TorchRec's usual loop: DLRMTrain, fused sparse optimizer, a dense one on the other params."""
    train_model = DLRMTrain(model)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(train_model.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    it, losses = batches(), []
    for _ in range(steps):
        loss, _ = train_model(next(it))
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.item())
    return losses


# Two cases in the fast suite (each ~10 s on a busy 2-core machine); the whole matrix is `slow`.
FAST = {("qr", DLRM), ("mixed_dim", DLRM_DCN)}
MATRIX = [pytest.param(m, k, id=f"{m}-{k.__name__}", marks=() if (m, k) in FAST else pytest.mark.slow)
          for k in (DLRM, DLRM_DCN) for m in METHODS]


@pytest.mark.parametrize("method,kind", MATRIX)
def test_torchrec_dlrm_trains_with_compressed_tables(method, kind):
    torch.manual_seed(0)
    ebc = compressed(method)
    assert ebc.full_embedding_bytes() / ebc.embedding_bytes() >= 10 * (1 - 1e-9)
    model = dlrm(ebc, kind)
    losses = train(model)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert ebc.fused_optimizer(), "row-wise Adagrad is fused into the tables' backward"


def test_dlrm_projection_takes_it():
    torch.manual_seed(0)
    model = dlrm(compressed("hash"), DLRM_Projection)
    b = next(batches())
    assert model(b.dense_features, b.sparse_features).shape == (64, 1)


def test_full_method_equals_torchrec_ebc_given_the_same_weights():
    torch.manual_seed(0)
    tables = configs(PoolingType.MEAN)
    ours = dlrm(CompressedEmbeddingBagCollection(tables=tables, compression={"method": "full"}))
    theirs = dlrm(EmbeddingBagCollection(tables=configs(PoolingType.MEAN)))
    for arch in ("dense_arch", "inter_arch", "over_arch"):
        getattr(theirs, arch).load_state_dict(getattr(ours, arch).state_dict())
    ebc = ours.sparse_arch.embedding_bag_collection
    assert ebc.embedding_bag_configs() == tables
    with torch.no_grad():
        for m, w in zip(ebc.methods, ebc.lookup.table_weights()):
            theirs.sparse_arch.embedding_bag_collection.embedding_bags[m.feature_names[0]].weight.copy_(w)
    b = next(batches())
    kt = ebc(b.sparse_features)
    ref = theirs.sparse_arch.embedding_bag_collection(b.sparse_features)
    assert kt.keys() == ref.keys() == KEYS and kt.length_per_key() == ref.length_per_key()
    torch.testing.assert_close(kt.values(), ref.values(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(b.dense_features, b.sparse_features),
                               theirs(b.dense_features, b.sparse_features), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_multiplexed_mean_combiner_equals_the_plain_collection(weighted):
    """The mean combiner pools through per-sample weights w/Σw made in remap: the inner TorchRec
    EBC must apply them (and the input's own weights, when the collection is weighted)."""
    from helpers import kjt

    from embtables.collection import PooledEmbeddingCollection, lookup_layout
    from embtables.kernels import make_lookup
    from embtables.specs import FeatureSpec

    tables = [EmbeddingBagConfig(name=k, embedding_dim=DIM, num_embeddings=HASH, feature_names=[k]) for k in KEYS[:3]]
    ebc = CompressedEmbeddingBagCollection(tables=tables, is_weighted=weighted, optimizer=None, compression={
        "method": "multiplexed", "ratio": 10, "combiner": "mean"})
    bags = {k: [[1, 2, 3], [], [4], [5, 1999]] for k in KEYS[:3]}
    ws = {k: [[0.5, 1.0, 2.0], [], [3.0], [1.0, 0.25]] for k in KEYS[:3]} if weighted else None
    features = [FeatureSpec(t.name, t.num_embeddings) for t in tables]
    layer = ebc.methods[0]
    physical, _, key_tables = lookup_layout([layer])
    plain = PooledEmbeddingCollection(features, DIM, [layer], make_lookup(physical, key_tables, "torch"))
    for mine, theirs in zip(ebc.lookup.table_weights(), plain.lookup.table_weights()):
        torch.testing.assert_close(mine, theirs)  # both seeded alike
    got = ebc(kjt(bags, ws)).values().view(4, 3, DIM)
    torch.testing.assert_close(got, plain(kjt(bags, ws)), rtol=0, atol=1e-6)
    w = torch.tensor(ws[KEYS[0]][0]) if weighted else torch.ones(3)
    sums = CompressedEmbeddingBagCollection(tables=tables, optimizer=None, compression={
        "method": "multiplexed", "ratio": 10})(kjt({k: [[1], [2], [3], []] for k in KEYS[:3]}))
    first = (sums.values()[:3, :DIM] * (w / w.sum()).unsqueeze(1)).sum(0)  # bag [1, 2, 3] of feature 0
    torch.testing.assert_close(got[0, 0], first, rtol=0, atol=1e-6)


def mixed_dim_tables() -> list[EmbeddingBagConfig]:
    """Dims 12, 8, 12 in this order (the methods come grouped by dim: 8 first), one table shared."""
    return [EmbeddingBagConfig(name="a", embedding_dim=12, num_embeddings=300, feature_names=["a0", "a1"]),
            EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=200, feature_names=["b0"]),
            EmbeddingBagConfig(name="c", embedding_dim=12, num_embeddings=100, feature_names=["c0"],
                               pooling=PoolingType.MEAN)]


MIXED_BAGS = {"a0": [[1, 2], [], [299]], "a1": [[3], [4, 4], []], "b0": [[0], [199, 5], [7]], "c0": [[], [9], [1, 2, 3]]}


def test_tables_of_different_dims_equal_torchrec_ebc_with_full_tables():
    from helpers import kjt

    ours = CompressedEmbeddingBagCollection(tables=mixed_dim_tables(), optimizer=None)
    theirs = EmbeddingBagCollection(tables=mixed_dim_tables())
    with torch.no_grad():
        for m, w in zip(ours.methods, ours.lookup.table_weights()):  # full: one table per method
            theirs.embedding_bags[m.feature_names[0]].weight.copy_(w)
    got, ref = ours(kjt(MIXED_BAGS)), theirs(kjt(MIXED_BAGS))
    assert got.keys() == ref.keys() == ["a0", "a1", "b0", "c0"] and got.length_per_key() == [12, 12, 8, 12]
    torch.testing.assert_close(got.values(), ref.values(), rtol=0, atol=1e-6)


def test_tables_of_different_dims_combine_as_each_table_alone():
    """qr's multiplying combine (not a column gather) with dims that differ: every feature's
    columns equal those of a collection holding its table alone (tables are seeded by name; fixed
    collisions, so the sizes do not depend on the group)."""
    from helpers import kjt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = CompressedEmbeddingBagCollection(tables=mixed_dim_tables(), optimizer=None,
                                                compression={"method": "qr", "collisions": 5})
        got = both(kjt(MIXED_BAGS)).to_dict()
        for table in mixed_dim_tables():
            alone = CompressedEmbeddingBagCollection(tables=[table], optimizer=None,
                                                     compression={"method": "qr", "collisions": 5})
            assert alone.methods[0].hyperparameters()["op"] == "mult"
            ref = alone(kjt({f: MIXED_BAGS[f] for f in table.feature_names})).to_dict()
            for f in table.feature_names:
                torch.testing.assert_close(got[f], ref[f], rtol=0, atol=0)


def test_counts_order_ids_and_without_counts_the_agnostic_form_is_said():
    with pytest.warns(UserWarning, match="frequency-agnostic"):
        blind = CompressedEmbeddingBagCollection(tables=configs(), compression={"method": "mixed_dim", "ratio": 4})
    assert {d["frequency"]["t_2"] for d in blind.describe() if "t_2" in d["tables"]} == {"agnostic (no counts)"}
    assert blind.hyperparameters()["t_2"]["mode"] == "feature"
    # Raw ids whose frequent ones are scattered: counts put them first, in frequency order.
    rng = np.random.default_rng(0)
    counts = np.zeros(HASH)
    hot = rng.permutation(HASH)[:50]
    counts[hot] = np.arange(1000, 950, -1)
    counts[counts == 0] = 1
    ebc = CompressedEmbeddingBagCollection(tables=configs(), counts={"t_2": counts},
                                           compression={"t_2": {"method": "mixed_dim", "ratio": 4}})
    order = ebc.orders["t_2"]
    assert order(torch.as_tensor(hot[:5])).tolist() == [0, 1, 2, 3, 4]
    assert sorted(order(torch.arange(HASH)).tolist()) == list(range(HASH))  # a bijection
    assert ebc.hyperparameters()["t_2"]["mode"] == "block"
    assert ebc.full_embedding_bytes() / ebc.embedding_bytes() >= 1.0
    t2_full = HASH * DIM * 4
    t2 = next(d for d in ebc.describe() if "t_2" in d["tables"])
    assert t2["embedding_bytes"] + sum(b.numel() * 4 for b in order.buffers()) <= t2_full / 4
    # the same from a sample KJT
    sample = KeyedJaggedTensor.from_lengths_sync(keys=["cat_2"], values=torch.as_tensor(np.repeat(hot, 3)),
                                                 lengths=torch.ones(150, dtype=torch.int64))
    assert FrequencyOrder.fit(np.bincount(np.repeat(hot, 3), minlength=HASH), DIM, 4)[0] is not None
    ebc2 = CompressedEmbeddingBagCollection(tables=configs(), sample=sample,
                                            compression={"t_2": {"method": "mixed_dim", "ratio": 4}})
    assert ebc2.frequency["t_2"] == "counts" and "t_2" in ebc2.orders


def test_bad_ids_and_bad_compression_are_errors():
    ebc = compressed("hash")
    b = next(batches())
    bad = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=torch.tensor([0, 1, 2, HASH // 2]),
                                              lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(IndexError, match="cat_3"):
        ebc(bad)
    with pytest.raises(ValueError, match="unknown tables"):
        CompressedEmbeddingBagCollection(tables=configs(), compression={"t_9": {"method": "hash"}})
    assert ebc(b.sparse_features).values().shape == (64, 4 * DIM)


# --- DistributedModelParallel: TorchRec's own sharders and planner shard the physical tables ---------
def _dmp_matches_single_process(rank, world, port, result_dir):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = dlrm(compressed("mixed_dim", 4.0))  # odd block dims: padded to 4 inside the EBC
    user_model = dlrm(compressed("mixed_dim", 4.0, device=torch.device("meta")))
    dmp = DistributedModelParallel(user_model, device=torch.device("cpu"))  # no sharder of ours
    reference = ref.state_dict()
    with torch.no_grad():
        for name, value in dmp.state_dict().items():
            full = reference[name]
            if hasattr(value, "local_shards"):  # a sharded physical table: copy this rank's shards
                for shard in value.local_shards():
                    (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[r0:r0 + rows, c0:c0 + cols])
            else:
                value.copy_(full)
    b = next(batches())
    with torch.no_grad():
        diff = (dmp(b.dense_features, b.sparse_features) - ref(b.dense_features, b.sparse_features)).abs().max()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        dmp(b.dense_features, b.sparse_features).squeeze(1), b.labels.float())
    loss.backward()  # row-wise Adagrad runs inside the backward of the sharded tables
    state = dmp.fused_optimizer.state_dict()["state"]
    if rank == 0:
        torch.save({"diff": diff.item(), "fused_state": sorted(state), "plan": str(dmp.plan)},
                   Path(result_dir) / "dmp.pt")
    end_spawned_rank()


@pytest.mark.slow  # ~50 s on 2 cores: two processes import TorchRec and plan
def test_distributed_model_parallel_shards_it_and_matches_one_process(tmp_path):
    """A user's DLRM holding it on the meta device, wrapped in DMP with no sharder of ours: the
    planner shards the physical tables; outputs equal one process's to 1e-6."""
    import torch.multiprocessing as mp


    mp.spawn(_dmp_matches_single_process, args=(2, free_port(), tmp_path), nprocs=2)
    result = torch.load(tmp_path / "dmp.pt")
    assert result["diff"] < 1e-6
    assert result["fused_state"], "the fused row-wise Adagrad state shows in model.fused_optimizer"


# --- exports served by TorchRec's quantized EmbeddingBagCollection ------------------------------------
@pytest.fixture(scope="module")
def every_method_run(tmp_path_factory):
    """A short run in which the features use every method (test_export's data and config)."""
    from test_export import CARDS, other_methods, raw_table, run

    from embtables.pipelines.data.encode import prepare_parquet
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("torchrec_export")
    pq.write_table(raw_table(2000, 0), tmp / "train.parquet")
    pq.write_table(raw_table(400, 1), tmp / "valid.parquet")
    ds = prepare_parquet(tmp / "train.parquet", tmp / "valid.parquet", label="label", dense=["I1"],
                         sparse=[*CARDS, "tags"], out=tmp / "ds", row_group=512)
    # dim 10: odd block and factor dims for mixed_dim and low_rank, odd int4 rows
    features = {f: {"compression": {"method": m, "ratio": 4}} for f, m in zip([*CARDS, "tags"], other_methods())}
    run_dir, _ = run(tmp, ds, "every_method", features, dim=10)
    return run_dir, ds


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_torchrec_inference_export_scores_like_embtables_load(every_method_run, tmp_path, quantize):
    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.serve.export import export_run
    from embtables.serving.torchrec_lookup import TorchRecServingLookup
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    import embtables

    run_dir, ds = every_method_run
    out = export_run(run_dir, tmp_path / "ex", quantize=quantize)
    ours, theirs = embtables.load(out), embtables.load(out, backend="torchrec")
    assert isinstance(theirs.lookup, TorchRecServingLookup) and isinstance(theirs.lookup.ebc, QuantEBC)
    methods = {e["method"] for e in theirs.manifest["methods"]}
    assert set(METHODS) <= methods, methods
    dense = [theirs.manifest["dense"].index(n) for n in theirs.dense_names]
    batch = next(iterate_batches(ds, "valid", 400, shuffle=False))
    a = ours.predict_proba(batch.dense[:, dense], batch.sparse)
    b = theirs.predict_proba(batch.dense[:, dense], batch.sparse)
    diff = float(np.abs(a - b).max())
    print(f"{quantize}: max |p_embtables - p_torchrec| = {diff:.3g}")
    assert diff <= 1e-6, diff
