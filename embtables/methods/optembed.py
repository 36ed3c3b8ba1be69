"""optembed: OptEmbed (Lyu et al., CIKM 2022) — learned row pruning + per-field dimension search.

Two shapes of the same method, chosen by `stage` (the 3-stage run is pipelines/train/optembed_stages.py):

* `OptEmbed` (stage "supernet"): the full n×D table of a feature, a learnable threshold t per
  field (init 0) and, in combine,
      row mask   m = step(‖e‖₁ − t)      straight-through, gradient = the paper's surrogate
      dim mask   keep the first j dims, j ~ U{1..D} per sample (training only; all dims at eval)
  with the penalty α·exp(−t) (`regularization`) pushing t up, and t on its own SGD
  (`param_groups`). The mask is computed on the pooled vector, which IS the row for a single-hot
  feature. A multi-hot bag pools several rows before combine sees them and every table has
  exactly B bags in the fused lookup (TBE's fixed batch), so per-row norms of a bag are not
  observable there: multi-hot features keep all rows (no threshold) and only get the dimension
  search. They are tiny in every dataset here (MovieLens genres: 20 rows).
* `OptEmbedCompact` (stage "retrain"): kept rows only, at the searched dim d_f, plus an id → row
  remap (int32, −1 = pruned; omitted when nothing is pruned). A pruned id is dropped from its bag,
  so it contributes the zero vector — exactly what its mask did in the supernet. Rows are
  zero-padded from d_f to D: that is what dimension truncation did during supernet training and
  it keeps DLRM's dot interaction meaningful (a projection would add parameters and a new space).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from embtables.atomic import atomic_file
from embtables.errors import ConfigError, EmbtablesError
from embtables.methods.base import Method
from embtables.specs import FP32_BYTES, FeatureSpec, TableSpec

REMAP_BYTES = 4  # int32 per id
STAGES = ("all", "supernet", "search", "retrain")


@dataclass(frozen=True)
class OptEmbedOptions:
    """Every `embedding.compression.*` option of optembed (besides method and ratio)."""

    stage: str = "all"                # all | supernet | search | retrain
    plan: str | None = None           # search result (plan.npz) the retrain builds from
    # The paper runs ~10^5 steps with SGD lr 1e-4 on t; runs here take a few hundred, where small
    # lrs leave t ≈ 0 (MovieLens, 320 steps: α 1e-3, lr 1e-2 → t 0.004). A large α makes t follow
    # the penalty's own schedule log(1 + lr·α·steps) (α 0.3, lr 1e-2 → 0.72); a small α with a
    # large lr lets the click loss decide where t stops (α 0.03, lr 0.2: movieId's t held at 1.0).
    alpha: float = 0.03               # penalty α·Σ exp(−t)
    threshold_lr: float = 0.2         # SGD on the thresholds
    threshold_init: float = 0.0
    init_std: float = 0.01
    supernet_epochs: int | None = None  # default: train.epochs
    holdout: float = 0.1              # share of training rows held out for the search's fitness
    search_rows: int = 200_000        # at most this many held-out rows are scored
    search_seed: int | None = None    # default: train.seed
    iterations: int = 30
    population: int = 20
    mutations: int = 10
    crossovers: int = 10
    keep: int = 15
    p_mutation: float = 0.1

    def __post_init__(self):
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"embedding.compression.{key} {what}")

        for key in ("alpha", "threshold_lr", "threshold_init", "init_std", "holdout", "p_mutation"):
            value = getattr(self, key)
            try:  # YAML reads 1e-3 (no dot) as a string
                object.__setattr__(self, key, float(value))
            except (TypeError, ValueError):
                need(False, key, f"must be a number, got {value!r}")

        need(self.stage in STAGES, "stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        need(0 < self.holdout < 1, "holdout", "must be in (0, 1)")
        need(self.alpha >= 0, "alpha", "must be >= 0")
        need(self.threshold_lr >= 0, "threshold_lr", "must be >= 0")
        for key in ("iterations", "population", "keep", "search_rows"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key, "must be a positive integer")
        for key in ("mutations", "crossovers"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "must be an integer >= 0")
        need(0 <= self.p_mutation <= 1, "p_mutation", "must be in [0, 1]")
        need(self.supernet_epochs is None or (isinstance(self.supernet_epochs, int) and self.supernet_epochs > 0),
             "supernet_epochs", "must be a positive integer")

    @classmethod
    def from_compression(cls, compression: dict) -> "OptEmbedOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in compression.items() if k in known})


class BinaryStep(torch.autograd.Function):
    """step(x) = 1[x > 0]; backward: OptEmbed's surrogate 2−4|x| (|x|≤0.4), 0.4 (≤1), else 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_gradient(x)


def surrogate_gradient(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


def row_l1(rows: torch.Tensor) -> torch.Tensor:
    """L1 norm per row; the one definition both the forward mask and the frozen masks use."""
    return rows.abs().sum(dim=1)


def _table_name(feature: FeatureSpec) -> str:
    return f"{feature.name}/optembed"


class OptEmbed(Method):
    """The supernet of one feature: full table, learnable row threshold, sampled dimensions."""

    name = "optembed"

    def __init__(self, feature: FeatureSpec, dim: int, options: OptEmbedOptions = OptEmbedOptions()):
        super().__init__([feature], dim)
        self.options = options
        self.prunable = not feature.multi_hot
        if self.prunable:
            self.threshold = torch.nn.Parameter(torch.tensor(float(options.threshold_init)))

    @property
    def table_name(self) -> str:
        return _table_name(self.features[0])

    def physical_tables(self) -> list[TableSpec]:
        return [TableSpec(self.table_name, self.features[0].rows, self.dim, init_std=self.options.init_std)]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(keys=[self.table_name], values=ids.values(), lengths=ids.lengths(),
                                 weights=ids.weights_or_none())

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        e = pooled[self.table_name]
        if self.prunable:
            e = e * BinaryStep.apply(row_l1(e) - self.threshold).unsqueeze(1)
        if self.training:  # uniform dimension sampling: keep the first j dims, j ~ U{1..D}
            j = torch.randint(1, self.dim + 1, (e.shape[0], 1), device=e.device)
            e = e * (torch.arange(self.dim, device=e.device) < j).to(e.dtype)
        return e.unsqueeze(1)

    def regularization(self) -> torch.Tensor | None:
        if not self.prunable or self.options.alpha == 0:
            return None
        return self.options.alpha * torch.exp(-self.threshold)

    def param_groups(self) -> list[dict]:
        if not self.prunable:
            return []
        return [{"params": [self.threshold], "optimizer": "sgd", "lr": self.options.threshold_lr}]

    def init_arguments(self) -> dict:
        return {"dim": self.dim, "options": asdict(self.options)}

    @classmethod
    def from_export(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> Method:
        """Either shape back from an export: a compact table (it has a table_dim) or a supernet."""
        init, feature = entry["init"], FeatureSpec(**entry["feature_specs"][0])
        if "table_dim" in init:
            row_of = tensors.get("row_of")
            keep = np.ones(feature.rows, dtype=bool) if row_of is None else row_of.numpy() >= 0
            method = OptEmbedCompact(feature, init["dim"], keep, init["table_dim"], init.get("init_std", 0.01))
        else:
            method = cls(feature, init["dim"], OptEmbedOptions(**init["options"]))
        method.load_state_dict(tensors, strict=True)
        return method

    @torch.no_grad()
    def keep_mask(self, weight: torch.Tensor) -> np.ndarray:
        """Rows the mask keeps, from this feature's trained table weight (frozen for the search)."""
        if not self.prunable:
            return np.ones(weight.shape[0], dtype=bool)
        return (row_l1(weight.float()) - self.threshold.detach() > 0).numpy()

    def hyperparameters(self) -> dict:
        h = {"stage": "supernet", "prunable": self.prunable}
        if self.prunable:
            h["threshold"] = float(self.threshold.detach())
        return h

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float = 1.0, **options) -> "OptEmbed":
        return cls.solve_group([feature], dim, ratio, **options)[0]

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float = 1.0, *, stage: str = "all",
                    plan: str | None = None, alpha: float = 0.03, threshold_lr: float = 0.2,
                    threshold_init: float = 0.0, init_std: float = 0.01, supernet_epochs: int | None = None,
                    holdout: float = 0.1, search_rows: int = 200_000, search_seed: int | None = None,
                    iterations: int = 30, population: int = 20, mutations: int = 10, crossovers: int = 10,
                    keep: int = 15, p_mutation: float = 0.1) -> list[Method]:
        """Supernets (stage supernet) or the compact tables of a search plan (stage retrain).

        `ratio` is not met here: the search stage meets it by choosing dims for the pruned rows.
        """
        given = dict(locals())
        opts = OptEmbedOptions(**{f.name: given[f.name] for f in fields(OptEmbedOptions)})
        if stage == "supernet":
            return [cls(f, dim, opts) for f in features]
        if stage == "retrain":
            if plan is None:
                raise ConfigError("embedding.compression.plan: the retrain stage needs the search's plan.npz")
            found = load_plan(plan)
            missing = [f.name for f in features if f.name not in found]
            if missing:
                raise ConfigError(f"embedding.compression.plan: {plan} has no entry for features {missing}")
            return [OptEmbedCompact(f, dim, found[f.name][0], found[f.name][1], init_std) for f in features]
        raise ConfigError("optembed runs as the global embedding.compression.method of a single-process "
                          "`embtables train` (train.workers: 1), which builds it stage by stage; "
                          f"stage {stage!r} cannot build a model by itself")


class OptEmbedCompact(Method):
    """The retrained table: kept rows × searched dim, an id → row remap, zero-padded to D."""

    name = "optembed"

    def __init__(self, feature: FeatureSpec, dim: int, keep: np.ndarray, table_dim: int, init_std: float = 0.01):
        super().__init__([feature], dim)
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (feature.rows,):
            raise EmbtablesError(f"optembed plan for {feature.name!r}: mask of {keep.shape[0]} rows, "
                                 f"the feature has {feature.rows}")
        if not 1 <= table_dim <= dim:
            raise EmbtablesError(f"optembed plan for {feature.name!r}: dim {table_dim} outside [1, {dim}]")
        self.table_dim = int(table_dim)
        self.kept_rows = int(keep.sum())
        self.init_std = init_std
        self.pruned = self.kept_rows < feature.rows
        if self.pruned:  # identity remaps are not stored
            row_of = np.full(feature.rows, -1, dtype=np.int32)
            row_of[keep] = np.arange(self.kept_rows, dtype=np.int32)
            self.register_buffer("row_of", torch.from_numpy(row_of))

    @property
    def table_name(self) -> str:
        return _table_name(self.features[0])

    def physical_tables(self) -> list[TableSpec]:
        # All rows pruned: a 1-row table nothing maps to keeps the collection's layout uniform.
        return [TableSpec(self.table_name, max(self.kept_rows, 1), self.table_dim, init_std=self.init_std)]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        values, lengths, weights = ids.values().long(), ids.lengths(), ids.weights_or_none()
        if self.pruned:
            rows = self.row_of[values].long()
            kept = rows >= 0
            bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths.long())
            lengths = torch.bincount(bag[kept], minlength=lengths.numel()).to(lengths.dtype)
            values = rows[kept]
            weights = None if weights is None else weights[kept]
        return KeyedJaggedTensor(keys=[self.table_name], values=values, lengths=lengths, weights=weights)

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pad(pooled[self.table_name], (0, self.dim - self.table_dim)).unsqueeze(1)

    def init_arguments(self) -> dict:
        return {"dim": self.dim, "table_dim": self.table_dim, "init_std": self.init_std}

    def hyperparameters(self) -> dict:
        return {"stage": "retrain", "rows": self.features[0].rows, "kept_rows": self.kept_rows,
                "dim": self.table_dim, "remap": self.pruned}


def compact_bytes(rows: int, kept_rows: int, dim: int) -> int:
    """embedding_bytes of an OptEmbedCompact, without building it (the search's cost model)."""
    return max(kept_rows, 1) * dim * FP32_BYTES + (rows * REMAP_BYTES if kept_rows < rows else 0)


def save_plan(path: Path, plan: dict[str, tuple[np.ndarray, int]]) -> None:
    """Per feature: the kept-row mask (bit-packed) and the searched dim; written atomically."""
    path = Path(path)
    arrays = {}
    for name, (keep, dim) in plan.items():
        arrays[f"keep/{name}"] = np.packbits(np.asarray(keep, dtype=bool))
        arrays[f"rows/{name}"] = np.array(len(keep), dtype=np.int64)
        arrays[f"dim/{name}"] = np.array(dim, dtype=np.int64)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_plan(path) -> dict[str, tuple[np.ndarray, int]]:
    path = Path(path)
    try:
        with np.load(path) as data:
            names = [k[len("dim/"):] for k in data.files if k.startswith("dim/")]
            return {n: (np.unpackbits(data[f"keep/{n}"], count=int(data[f"rows/{n}"])).astype(bool),
                        int(data[f"dim/{n}"])) for n in names}
    except (OSError, ValueError, KeyError) as e:
        raise EmbtablesError(f"cannot read optembed plan {path}: {e}") from None
