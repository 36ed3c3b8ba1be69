"""OptEmbed: surrogate gradient, threshold penalty, pruned rows = masked rows, deterministic search, e2e."""
import json

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from embtables.collection import build_embeddings
from embtables.config import load_config
from embtables.errors import ConfigError, EmbtablesError
from embtables.kernels import fbgemm_available
from embtables.methods.optembed import (BinaryStep, OptEmbed, OptEmbedCompact, OptEmbedOptions, compact_bytes,
                                        load_plan, save_plan)
from embtables.pipelines.train.evolution import crossover, evolve, mutate
from embtables.pipelines.data.holdout import held_out, subset_batch
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.train.local import Optimizers, make_model_optimizer, train
from embtables.specs import FeatureSpec

BACKENDS = ["torch"] + (["fbgemm"] if fbgemm_available() else [])


def test_surrogate_gradient_values():
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.1, 0.0, 0.25, 0.4, 0.41, 0.9, 1.0, 1.01, 3.0], requires_grad=True)
    out = BinaryStep.apply(x)
    assert out.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    out.backward(torch.full_like(x, 3.0))  # upstream gradient 3
    expected = [0, 0.4, 0.4, 2 - 1.6, 2 - 0.4, 2, 2 - 1.0, 2 - 1.6, 0.4, 0.4, 0.4, 0, 0]
    assert x.grad.tolist() == pytest.approx([3 * e for e in expected])


def _kjt(keys, bags_per_key):
    values, lengths = [], []
    for bags in bags_per_key:
        for bag in bags:
            values += bag
            lengths.append(len(bag))
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def _set_table(collection, name, weight):
    state = collection.lookup.lookup_state()
    state[f"{name}.weight"] = weight
    collection.lookup.load_lookup_state(state)


class _Model(torch.nn.Module):
    """What make_model_optimizer expects: .embeddings and .dense_parameters()."""

    def __init__(self, coll, width):
        super().__init__()
        self.embeddings, self.head = coll, torch.nn.Linear(width, 1)

    def dense_parameters(self):
        return [p for p in self.parameters() if id(p) not in {id(q) for q in self.embeddings.lookup.parameters()}]


def test_thresholds_move_under_the_penalty_on_their_own_sgd():
    feats = [FeatureSpec("a", 50), FeatureSpec("b", 30), FeatureSpec("m", 9, multi_hot=True)]
    methods = [OptEmbed(f, 8, OptEmbedOptions(alpha=0.5, threshold_lr=0.1)) for f in feats]
    coll = build_embeddings(feats, 8, methods, backend="torch")
    assert not methods[2].prunable and methods[2].param_groups() == []  # multi-hot: no threshold
    model = _Model(coll, 24)
    opt = make_model_optimizer({"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}, model)
    assert isinstance(opt, Optimizers) and isinstance(opt.optimizers[1], torch.optim.SGD)
    in_adam = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(m.threshold) in in_adam for m in methods[:2])
    # Penalty alone: plain SGD on α·exp(−t), t ← t + lr·α·exp(−t), step by step.
    t = 0.0
    for _ in range(5):
        opt.zero_grad()
        coll.regularization().backward()
        opt.step()
        t += 0.1 * 0.5 * np.exp(-t)
        assert [m.threshold.item() for m in methods[:2]] == pytest.approx([t, t], rel=1e-5)
    # With the click loss too, the penalty still lifts the thresholds.
    ids = _kjt(["a", "b", "m"], [[[1], [2], [3]], [[4], [5], [6]], [[0, 1], [], [2]]])
    for _ in range(20):
        opt.zero_grad()
        logits = model.head(coll(ids).flatten(1)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0]))
        (loss + coll.regularization()).backward()
        opt.step()
    assert all(m.threshold.item() > 0.5 for m in methods[:2])
    # And the mask follows the threshold: a row is zero exactly when its L1 norm is ≤ t.
    coll.eval()
    out = coll(ids)
    weights = coll.lookup.lookup_state()
    for k, (m, rows) in enumerate(zip(methods[:2], ([1, 2, 3], [4, 5, 6]))):
        w = weights[f"{m.table_name}.weight"][rows]
        kept = (w.abs().sum(1) > m.threshold.item()).float()[:, None]
        assert torch.equal(out[:, k], w * kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_rows_behave_exactly_as_their_masks(backend):
    dim = 8
    feats = [FeatureSpec("s", 10), FeatureSpec("m", 6, multi_hot=True)]
    sup = [OptEmbed(f, dim) for f in feats]
    coll = build_embeddings(feats, dim, sup, backend=backend)
    g = torch.Generator().manual_seed(0)
    ws = torch.randn(10, dim, generator=g)
    ws[[1, 4, 7]] *= 0.01  # small rows: below the threshold
    wm = torch.randn(6, dim, generator=g)
    _set_table(coll, "s/optembed", ws)
    _set_table(coll, "m/optembed", wm)
    with torch.no_grad():
        sup[0].threshold.fill_(0.5)
    coll.eval()
    ids = _kjt(["s", "m"], [[[0], [1], [4], [9], [7]], [[0, 2], [], [5], [1, 3, 4], [2]]])
    out_sup = coll(ids)
    keep = sup[0].keep_mask(ws)
    assert keep.tolist() == [i not in (1, 4, 7) for i in range(10)]
    # Hand formula: masked rows are zero; the multi-hot feature is never pruned.
    assert torch.equal(out_sup[:, 0], ws[[0, 1, 4, 9, 7]] * torch.tensor(keep[[0, 1, 4, 9, 7]]).float()[:, None])
    for d_s, d_m in [(dim, dim), (3, 5)]:
        compact = [OptEmbedCompact(feats[0], dim, keep, d_s), OptEmbedCompact(feats[1], dim, np.ones(6, bool), d_m)]
        cc = build_embeddings(feats, dim, compact, backend=backend)
        _set_table(cc, "s/optembed", ws[torch.from_numpy(keep)][:, :d_s])
        _set_table(cc, "m/optembed", wm[:, :d_m])
        cc.eval()
        expected = out_sup.clone()
        expected[:, 0, d_s:] = 0  # the supernet with its dims truncated to the searched ones
        expected[:, 1, d_m:] = 0
        assert torch.allclose(cc(ids), expected, atol=1e-6)
        assert compact[0].embedding_bytes() == compact_bytes(10, 7, d_s) == 7 * d_s * 4 + 10 * 4
        actual = sum(w.numel() * w.element_size() for w in cc.lookup.table_weights())
        actual += sum(t.numel() * t.element_size() for m in compact for t in m.state_dict().values())
        assert cc.embedding_bytes() == actual


def test_pruned_ids_drop_out_of_multi_hot_bags():
    f = FeatureSpec("m", 5, multi_hot=True)
    keep = np.array([True, False, True, False, True])
    m = OptEmbedCompact(f, 4, keep, 4)
    w = torch.arange(12, dtype=torch.float32).view(3, 4) + 1  # kept ids 0, 2, 4 → rows 0, 1, 2
    coll = build_embeddings([f], 4, [m], backend="torch")
    _set_table(coll, "m/optembed", w)
    out = coll(_kjt(["m"], [[[0, 1, 2], [1, 3], [], [4, 4]]]))[:, 0]
    assert torch.equal(out, torch.stack([w[0] + w[1], torch.zeros(4), torch.zeros(4), 2 * w[2]]))


def test_options_defaults_and_errors():
    import inspect
    from dataclasses import asdict

    sig = inspect.signature(OptEmbed.solve_group).parameters
    assert {k: sig[k].default for k in asdict(OptEmbedOptions())} == asdict(OptEmbedOptions())
    assert OptEmbedOptions(alpha="1e-3").alpha == 1e-3  # YAML reads 1e-3 as a string
    with pytest.raises(ConfigError, match="embedding.compression.holdout"):
        OptEmbedOptions(holdout=1.5)
    with pytest.raises(ConfigError, match="embedding.compression.stage"):
        OptEmbedOptions(stage="serach")
    with pytest.raises(ConfigError, match="single-process"):
        OptEmbed.solve_group([FeatureSpec("a", 5)], 8, stage="all")


def test_plan_round_trip_and_errors(tmp_path):
    keep = np.random.default_rng(0).random(1001) < 0.3
    save_plan(tmp_path / "plan.npz", {"a": (keep, 5), "b": (np.ones(3, bool), 16)})
    plan = load_plan(tmp_path / "plan.npz")
    assert np.array_equal(plan["a"][0], keep) and plan["a"][1] == 5 and plan["b"][1] == 16
    (tmp_path / "bad.npz").write_bytes(b"not a plan")
    with pytest.raises(EmbtablesError, match="bad.npz"):
        load_plan(tmp_path / "bad.npz")
    with pytest.raises(EmbtablesError, match="mask of 3 rows"):
        OptEmbedCompact(FeatureSpec("a", 4), 8, np.ones(3, bool), 4)


def _fitness(c):
    # Deterministic, with an interior optimum per field and interactions between neighbours.
    c = np.array(c, dtype=float)
    return float(-np.sum((c - np.array([3, 9, 5, 1, 12, 7])) ** 2) - 0.5 * np.sum(np.abs(np.diff(c))))


def test_search_is_deterministic_under_a_seed_and_respects_the_budget():
    calls = []

    def fitness(c):
        calls.append(c)
        return _fitness(c)

    cost = lambda c: float(np.dot(c, [10, 1, 1, 5, 1, 1]))  # noqa: E731
    kwargs = dict(cost=cost, budget=150.0, iterations=15, population=10, mutations=6, crossovers=6, keep=8)
    a = evolve((16,) * 6, fitness, seed=3, **kwargs)
    assert len(calls) == len(set(calls)) == a.evaluations  # each candidate scored once, never re-scored
    assert all(cost(c) <= 150 for c in calls)  # the repair keeps every candidate in the budget
    b = evolve((16,) * 6, _fitness, seed=3, **kwargs)
    assert (a.best, a.fitness, a.history) == (b.best, b.fitness, b.history)
    c = evolve((16,) * 6, _fitness, seed=4, **kwargs)
    assert c.history != a.history
    assert a.fitness >= max(h["best"] for h in a.history[:1])  # elitist: the best never gets worse
    assert [h["best"] for h in a.history] == sorted(h["best"] for h in a.history)


def test_mutation_and_crossover_work_over_fields():
    rng = np.random.default_rng(0)
    parent = (4, 4, 4, 4, 4)
    for _ in range(50):
        child = mutate(parent, (8,) * 5, 0.1, rng)
        assert child != parent and all(1 <= d <= 8 for d in child)
    a, b = (1, 2, 3, 4, 5, 6, 7, 8), (11, 12, 13, 14, 15, 16, 17, 18)
    kids = [crossover(a, b, rng) for _ in range(30)]
    assert all(k[i] in (a[i], b[i]) for k in kids for i in range(8))
    assert {k[7] for k in kids} == {8, 18}  # the last field (beyond any dim range) takes part too


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("data") / "synth", preset="tiny", rows=6000, seed=1)


def test_held_out_rows_do_not_depend_on_batching(synth):
    from embtables.pipelines.data.batches import iterate_batches

    def held_labels(batch_size, shuffle):
        keys = []
        for batch in iterate_batches(synth, "train", batch_size, shuffle=shuffle, seed=7):
            part = subset_batch(batch, held_out(batch, 0.2, seed=0))
            ids = part.sparse.values().view(len(part.sparse.keys()), part.rows).T
            keys += [tuple(r) + tuple(d) for r, d in zip(ids.tolist(), part.dense.tolist())]
        return sorted(keys)

    small = held_labels(100, False)
    assert small == held_labels(999, True)
    total = json.loads((synth / "stats.json").read_text())["splits"]["train"]["rows"]
    assert 0.15 * total < len(small) < 0.25 * total


def test_three_stages_end_to_end(tmp_path, synth):
    def cfg(*extra):
        path = tmp_path / "cfg.yaml"
        path.write_text(f"data: {{train: {synth}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [16]}}\n"
                        "embedding: {dim: 8, backend: torch, compression: {method: optembed, ratio: 3, "
                        "iterations: 2, population: 6, mutations: 3, crossovers: 3, keep: 4}}\n"
                        "train: {batch_size: 512, epochs: 1, threads: 1}\n")
        return load_config(path, list(extra))

    m = train(cfg(), tmp_path / "run", progress=False)
    oe = m["optembed"]
    assert m["method"] == "optembed" and m["compression_ratio"] >= 3
    assert set(oe["stage_auc"]) >= {"supernet", "search_held_out", "retrain"}
    assert all(0 < f["dim"] <= 8 and f["kept_rows"] <= f["rows"] for f in oe["fields"].values())
    # The supernet never saw the held-out rows the search scored; the retrain saw every row.
    train_rows = json.loads((synth / "stats.json").read_text())["splits"]["train"]["rows"]
    assert oe["supernet_train_rows_seen"] + oe["held_out_rows"] == train_rows == m["train_rows_seen"]
    plan = load_plan(tmp_path / "run" / "search" / "plan.npz")
    assert {n: f["dim"] for n, f in oe["fields"].items()} == {n: d for n, (_, d) in plan.items()}
    # The compact model is what the run dir rebuilds (eval/export), and it was rewound to the supernet's init.
    from embtables.pipelines.train.evaluate import evaluate
    from embtables.pipelines.train.build import load_run

    model, _, inputs = load_run(tmp_path / "run")
    assert evaluate(model, inputs.dataset, "valid", inputs.dense_index, 4096)["auc"] == pytest.approx(m["auc"])
    assert train(cfg(), tmp_path / "run", resume=True, progress=False)["auc"] == m["auc"]  # all done: nothing redone
    # Export → serve: the compact tables and remaps rebuild and score the same.
    from embtables.pipelines.serve.export import export_run
    from embtables.pipelines.serve.predict import predict

    export_run(tmp_path / "run", tmp_path / "export")
    served = predict(tmp_path / "export", synth, tmp_path / "pred.parquet", progress=False)
    assert served["auc"] == pytest.approx(m["auc"], abs=1e-4)  # the export contract: AUC to 1e-4
    # int8: pruned fields' id → row maps travel as one keep bit an id, rebuilt exactly at load.
    export_run(tmp_path / "run", tmp_path / "int8", quantize="int8")
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    kept = {d["encoding"] for e in manifest["methods"] for k, d in e["tensors"].items() if k == "row_of"}
    assert kept == ({"keep_bits"} if any(f["kept_rows"] < f["rows"] for f in oe["fields"].values()) else set())
    assert manifest["bytes"]["embedding"] <= 0.3 * m["embedding_bytes"]
    served8 = predict(tmp_path / "int8", synth, tmp_path / "pred8.parquet", progress=False)
    assert served8["auc"] == pytest.approx(m["auc"], abs=0.002)
    # Stage by stage into another dir: the same plan (the search is deterministic).
    for stage in ("supernet", "search"):
        train(cfg(f"embedding.compression.stage={stage}"), tmp_path / "staged", progress=False)
    with pytest.raises(EmbtablesError, match="already finished"):
        train(cfg("embedding.compression.stage=search"), tmp_path / "staged", progress=False)
    staged = load_plan(tmp_path / "staged" / "search" / "plan.npz")
    assert {n: (k.tolist(), d) for n, (k, d) in staged.items()} == {n: (k.tolist(), d) for n, (k, d) in plan.items()}
    with pytest.raises(EmbtablesError, match="run stage supernet first"):
        train(cfg("embedding.compression.stage=search"), tmp_path / "nothing", progress=False)
