"""Generated click logs with power-law ids and a planted model whose best AUC is known.

Ids of each feature follow p_i ∝ (i+1)^-zipf and are written scrambled, so the stats pass
really has to reorder them. Labels are Bernoulli(sigmoid(logit)) of a planted model:

    logit = bias + Σ_f w_f[id_f] + Σ_(f,g) <u_f[id_f], u_g[id_g]> + v · log1p(dense)

(a few feature pairs only, latent dim 4; multi-hot features add the mean of their items'
weights). Its scale is calibrated so the planted (Bayes) AUC is ~0.80 at a base CTR ~0.25.
Rows are generated and written one row group at a time, so any row count fits in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from embtables.errors import ConfigError, DataError
from embtables.pipelines.data.parquet_io import PartWriter, scratch_dir
from embtables.pipelines.data.encode import check_target, prepare_parquet

PRESETS = {
    # Criteo-like: a few 1e5–3e5 id features, many small ones; ~1.43M ids in all.
    "criteo26": {"rows": 400_000, "dense": 13, "multi_hot": 0, "cardinalities": [
        1460, 583, 300_000, 150_000, 305, 24, 12_517, 633, 3, 40_000, 5683, 280_000, 3194,
        27, 14_992, 200_000, 10, 5652, 2173, 4, 250_000, 18, 15, 100_000, 105, 60_000]},
    # The same shape with a heavy tail: the eight large features ×4 (1.2M ids in the largest) and a
    # flatter power law, so ~1.4M distinct ids show up in 400k rows (~2.5M in 1M rows), most of them
    # rare — the regime where compression has to decide which ids keep their own row.
    "criteo26-tail": {"rows": 400_000, "dense": 13, "multi_hot": 0, "zipf": 0.8, "cardinalities": [
        1460, 583, 1_200_000, 600_000, 305, 24, 12_517, 633, 3, 160_000, 5683, 1_120_000, 3194,
        27, 14_992, 800_000, 10, 5652, 2173, 4, 1_000_000, 18, 15, 400_000, 105, 240_000]},
    "tiny": {"rows": 4000, "dense": 2, "multi_hot": 0, "cardinalities": [3, 10, 100, 1000]},
}
TARGET_AUC, TARGET_CTR = 0.80, 0.25
LATENT_DIM, MAX_PAIRS = 4, 8
MULTI_HOT_CARD, MULTI_HOT_MAX_LEN = 500, 5
DENSE_MISSING = 0.05
SCRAMBLE_BITS = 40
AUC_BINS = 1 << 16


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def expected_auc(p: np.ndarray) -> float:
    """AUC of scores p against labels ~ Bernoulli(p), in expectation (no sampling noise)."""
    p = np.sort(p)
    neg_below = np.cumsum(1.0 - p) - (1.0 - p)
    return float((p * neg_below).sum() / (p.sum() * (1.0 - p).sum()))


class PlantedModel:
    """Feature distributions and the true click model; all parameters fixed by `seed`."""

    def __init__(self, cardinalities: list[int], n_dense: int, zipf: float, multi_hot: int, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.cards = list(cardinalities)
        self.mh_cards = [MULTI_HOT_CARD] * multi_hot
        self.n_dense = n_dense
        all_cards = self.cards + self.mh_cards
        self.cdfs = []
        for c in all_cards:
            w = np.arange(1, c + 1, dtype=np.float64) ** -zipf
            self.cdfs.append(np.cumsum(w) / w.sum())
        self.w = [rng.normal(0.0, rng.uniform(0.3, 1.0), c) for c in all_cards]
        pairs = [(f, g) for f in range(len(self.cards)) for g in range(f + 1, len(self.cards))]
        pick = rng.permutation(len(pairs))[:MAX_PAIRS]
        self.pairs = sorted(pairs[i] for i in pick)
        self.u = {f: rng.normal(0.0, 1.0, (self.cards[f], LATENT_DIM)) for f in sorted({x for p in self.pairs for x in p})}
        self.v = rng.normal(0.0, 1.0, n_dense)
        self.scramble = [(int(rng.integers(1, 1 << SCRAMBLE_BITS)) | 1, int(rng.integers(0, 1 << SCRAMBLE_BITS)))
                         for _ in all_cards]
        self._calibrate(np.random.default_rng([seed, 2]))

    # ---- drawing rows
    def draw(self, rng: np.random.Generator, n: int) -> dict:
        """Ranks (0 = most frequent) per feature, multi-hot (lengths, ranks), dense raw values."""
        ranks = [self._power_law(rng, f, n) for f in range(len(self.cards))]
        multi = []
        for k in range(len(self.mh_cards)):
            lengths = rng.integers(1, MULTI_HOT_MAX_LEN + 1, n)
            multi.append((lengths, self._power_law(rng, len(self.cards) + k, int(lengths.sum()))))
        dense = np.floor(rng.lognormal(1.0, 1.5, (n, self.n_dense)))
        dense[rng.random((n, self.n_dense)) < DENSE_MISSING] = np.nan
        return {"ranks": ranks, "multi": multi, "dense": dense}

    def _power_law(self, rng, f: int, n: int) -> np.ndarray:
        cdf = self.cdfs[f]
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)

    # ---- the true model
    def _parts(self, rows: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first-order, pairwise, dense) logit components, before scaling."""
        lin = sum(self.w[f][r] for f, r in enumerate(rows["ranks"]))
        for k, (lengths, ranks) in enumerate(rows["multi"]):
            owner = np.repeat(np.arange(len(lengths)), lengths)
            lin = lin + np.bincount(owner, self.w[len(self.cards) + k][ranks], len(lengths)) / lengths
        n = len(rows["ranks"][0]) if rows["ranks"] else len(rows["dense"])
        pair = np.zeros(n)
        for f, g in self.pairs:
            pair += (self.u[f][rows["ranks"][f]] * self.u[g][rows["ranks"][g]]).sum(1)
        dense = np.log1p(np.nan_to_num(rows["dense"], nan=0.0)) @ self.v if self.n_dense else np.zeros(n)
        return np.asarray(lin, dtype=np.float64), pair, dense

    def logit(self, rows: dict) -> np.ndarray:
        lin, pair, dense = self._parts(rows)
        return self.bias + self.scale * (self.k[0] * lin + self.k[1] * pair + self.k[2] * dense)

    def _calibrate(self, rng: np.random.Generator, n: int = 20_000) -> None:
        """Pick the logit scale and bias so expected AUC ≈ TARGET_AUC and mean CTR ≈ TARGET_CTR."""
        parts = self._parts(self.draw(rng, n))
        # Unit-variance components mixed ~55% first-order, 30% pairwise, 15% dense (by variance).
        share = (0.74, 0.55, 0.39)
        self.k = [s / c.std() if c.std() > 0 else 0.0 for s, c in zip(share, parts)]
        z = sum(k * c for k, c in zip(self.k, parts))
        z = z - z.mean()

        def bias_for(scale):
            lo, hi = -30.0, 30.0
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _sigmoid(scale * z + mid).mean() < TARGET_CTR else (lo, mid)
            return (lo + hi) / 2

        lo, hi = 0.01, 20.0
        for _ in range(30):
            mid = (lo + hi) / 2
            auc = expected_auc(_sigmoid(mid * z + bias_for(mid)))
            lo, hi = (mid, hi) if auc < TARGET_AUC else (lo, mid)
        self.scale = (lo + hi) / 2
        self.bias = bias_for(self.scale) - self.scale * sum(k * c for k, c in zip(self.k, parts)).mean()

    def raw_ids(self, f: int, ranks: np.ndarray) -> np.ndarray:
        """Scramble ranks into 40-bit ids (a bijection: multiply by an odd number mod 2^40)."""
        a, b = self.scramble[f]
        with np.errstate(over="ignore"):
            x = ranks.astype(np.uint64) * np.uint64(a) + np.uint64(b)
        return (x & np.uint64((1 << SCRAMBLE_BITS) - 1)).astype(np.int64)


class _Metrics:
    """Streaming AUC (fine histogram of p) and log loss of the true probabilities."""

    def __init__(self):
        self.pos = np.zeros(AUC_BINS)
        self.neg = np.zeros(AUC_BINS)
        self.loss = 0.0
        self.rows = 0

    def add(self, p: np.ndarray, y: np.ndarray) -> None:
        bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        self.pos += np.bincount(bins[y], minlength=AUC_BINS)
        self.neg += np.bincount(bins[~y], minlength=AUC_BINS)
        q = np.clip(p, 1e-7, 1 - 1e-7)
        self.loss -= float(np.where(y, np.log(q), np.log(1 - q)).sum())
        self.rows += len(p)

    def auc(self) -> float:
        neg_below = np.cumsum(self.neg) - self.neg
        pairs = self.pos.sum() * self.neg.sum()
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / pairs) if pairs else float("nan")

    def logloss(self) -> float:
        return self.loss / self.rows if self.rows else float("nan")


def _table(model: PlantedModel, rows: dict, y: np.ndarray, keep: np.ndarray) -> pa.Table:
    cols = {"label": pa.array(y[keep].astype(np.int64))}
    for j in range(model.n_dense):
        cols[f"I{j + 1}"] = pa.array(rows["dense"][keep, j], from_pandas=True)  # NaN → null (missing)
    for f, ranks in enumerate(rows["ranks"]):
        cols[f"C{f + 1}"] = pa.array(model.raw_ids(f, ranks[keep]))
    for k, (lengths, ranks) in enumerate(rows["multi"]):
        ids = model.raw_ids(len(model.cards) + k, ranks)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
        cols[f"M{k + 1}"] = lists.filter(pa.array(keep))
    return pa.table(cols)


def ingest(out, *, preset: str = "criteo26", rows: int | None = None, cardinalities: list[int] | None = None,
           dense: int | None = None, zipf: float | None = None, multi_hot: int | None = None, seed: int = 0,
           valid_fraction: float = 0.1, row_group: int = 65536, min_count: int = 1) -> Path:
    """Generate `rows` click-log rows (preset values unless given) and encode them into `out`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown synth preset {preset!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    rows = p["rows"] if rows is None else rows
    cards = list(p["cardinalities"] if cardinalities is None else cardinalities)
    n_dense = p["dense"] if dense is None else dense
    multi_hot = p["multi_hot"] if multi_hot is None else multi_hot
    zipf = p.get("zipf", 1.15) if zipf is None else zipf
    if rows < 2 or not cards or min(cards) < 1 or n_dense < 0 or multi_hot < 0 or zipf <= 0:
        raise ConfigError("synth needs rows >= 2, cardinalities >= 1, dense >= 0, multi_hot >= 0, zipf > 0")
    check_target(out, valid_fraction)

    model = PlantedModel(cards, n_dense, zipf, multi_hot, seed)
    metrics = {"train": _Metrics(), "valid": _Metrics()}
    with scratch_dir(out, "raw") as tmp:
        writers = {}
        for chunk, start in enumerate(range(0, rows, row_group)):
            rng = np.random.default_rng([seed, 1, chunk])
            n = min(row_group, rows - start)
            drawn = model.draw(rng, n)
            prob = _sigmoid(model.logit(drawn))
            y = rng.random(n) < prob
            is_valid = rng.random(n) < valid_fraction
            for split, keep in (("train", ~is_valid), ("valid", is_valid)):
                metrics[split].add(prob[keep], y[keep])
                table = _table(model, drawn, y, keep)
                if split not in writers:
                    writers[split] = PartWriter(tmp / split, table.schema, row_group=row_group)
                writers[split].write(table)
        for w in writers.values():
            w.close()
        planted = {"train_auc": metrics["train"].auc(), "valid_auc": metrics["valid"].auc(),
                   "valid_logloss": metrics["valid"].logloss(), "train_logloss": metrics["train"].logloss(),
                   "train_ctr": float(metrics["train"].pos.sum() / max(metrics["train"].rows, 1))}
        settings = {"rows": rows, "cardinalities": cards, "dense": n_dense, "zipf": zipf,
                    "multi_hot": multi_hot, "seed": seed, "valid_fraction": valid_fraction}
        sparse = [f"C{f + 1}" for f in range(len(cards))] + [f"M{k + 1}" for k in range(multi_hot)]
        if not metrics["valid"].rows:
            raise DataError(f"synth: no validation rows among {rows} rows; use more --rows or a larger "
                            f"--valid-fraction")
        return prepare_parquet(tmp / "train", tmp / "valid", label="label", dense=[f"I{j + 1}" for j in range(n_dense)],
                               sparse=sparse, out=out, min_count=min_count, source="synth",
                               extra_stats={"planted": planted, "synth": settings},
                               valid_fraction=0.0, row_group=row_group)
