"""The method contract: remap ids → one shared fused lookup → combine.

A method never owns an embedding table. It declares plain tables (`physical_tables`), turns
raw ids into rows of those tables (`remap`, index arithmetic only) and turns the pooled rows
into one d-dim vector per feature (`combine`, small dense parameters only). The collection
runs every method's tables through one fused, shardable lookup.
"""
from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from embtables.specs import FeatureSpec, FusedFeature, TableSpec


class Method(nn.Module):
    """One compression method for one feature (or a group of features, e.g. multiplexing)."""

    name: ClassVar[str]

    def __init__(self, features: list[FeatureSpec], dim: int):
        super().__init__()
        self.features = list(features)
        self.dim = dim

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    # --- the contract -------------------------------------------------------------------
    def physical_tables(self) -> list[TableSpec]:
        raise NotImplementedError

    def lookups(self) -> list[tuple[str, str]]:
        """(key remap emits, physical table it reads), in remap's key order.

        One per table by default; a table shared by several slots (multiplexing) lists each
        slot, and each slot is pooled on its own.
        """
        return [(t.name, t.name) for t in self.physical_tables()]

    def remap(self, ids: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw ids (keys = this method's features) → rows (keys = its `lookups()` keys)."""
        raise NotImplementedError

    def combine(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled rows per lookup key ([B, table dim]) → [B, len(features), dim]."""
        raise NotImplementedError

    def combine_columns(self, starts: dict[str, int]) -> list[int] | None:
        """When `combine` only places pooled columns (no arithmetic): the columns of its output
        ([B, F, d] flattened per sample), as positions in the lookup's output, where `starts`
        gives each lookup key's first column. Lets the collection combine every such method
        in one gather. None (the default): call `combine`."""
        return None

    def fused_parts(self) -> list[FusedFeature]:
        """This method's remap + combine as the fused (Triton) kernels compute them: one
        FusedFeature per feature, in order (see specs.FusedPart). ValueError, saying why, when
        the method has no fused form."""
        raise ValueError(f"method {self.name!r} has no fused (Triton) form; the Triton lookup runs full, hash, "
                         f"qr, binary_code and multiplexed (sum combiner)")

    @classmethod
    def solve(cls, feature: FeatureSpec, dim: int, ratio: float, **options) -> "Method":
        """The method's hyperparameters chosen so that embedding_bytes ≤ full_bytes / ratio."""
        raise NotImplementedError

    @classmethod
    def solve_group(cls, features: list[FeatureSpec], dim: int, ratio: float, **options) -> list["Method"]:
        """Methods for all features given this method; per-feature by default."""
        return [cls.solve(f, dim, ratio, **options) for f in features]

    def regularization(self) -> torch.Tensor | None:
        """A term added to the training loss (e.g. OptEmbed's threshold penalty); None = nothing."""
        return None

    def param_groups(self) -> list[dict]:
        """Own parameters that need their own optimizer, kept out of the dense one:
        [{"params": [...], "optimizer": "sgd", "lr": 1e-4}, …]."""
        return []

    def hyperparameters(self) -> dict:
        """What `solve` chose, for metrics.json and the export manifest."""
        return {}

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The method's own tensors (tables excluded: the collection exports those) + manifest entry."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        manifest = {"method": self.name, "features": self.feature_names, "dim": self.dim,
                    "tables": [t.name for t in self.physical_tables()],
                    "hyperparameters": self.hyperparameters(),
                    "feature_specs": [{"name": f.name, "rows": f.rows, "multi_hot": f.multi_hot,
                                       "mean_length": f.mean_length} for f in self.features],
                    "init": self.init_arguments()}
        return tensors, manifest

    def init_arguments(self) -> dict:
        """Constructor keywords (besides the features) that rebuild this method's structure.

        Generic: each constructor parameter is read from the attribute of the same name, else
        from hyperparameters(); tensors are left out (they come back from the state dict).
        Override when a constructor parameter is stored under another name.
        """
        hyper, args = self.hyperparameters(), {}
        for name, p in list(inspect.signature(type(self).__init__).parameters.items())[1:]:
            if name in ("feature", "features") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if hasattr(self, name):
                value = getattr(self, name)
            elif name in hyper:
                value = hyper[name]
            elif p.default is not p.empty:
                continue
            else:
                raise NotImplementedError(f"method {self.name!r}: constructor argument {name!r} is neither an "
                                          f"attribute nor a hyperparameter; override init_arguments()")
            if isinstance(value, torch.Tensor):
                if p.default is p.empty:
                    raise NotImplementedError(f"method {self.name!r}: tensor argument {name!r} has no default; "
                                              f"override init_arguments() and from_export()")
                continue
            args[name] = value
        return args

    @classmethod
    def from_export(cls, entry: dict, tensors: dict[str, torch.Tensor]) -> "Method":
        """The method rebuilt from its manifest entry and tensors (the inverse of `export`)."""
        features = [FeatureSpec(**f) for f in entry["feature_specs"]]
        params = inspect.signature(cls.__init__).parameters
        first = features[0] if "feature" in params else features
        method = cls(first, **entry["init"])
        method.load_state_dict(tensors, strict=True)
        return method

    # --- accounting ---------------------------------------------------------------------
    def embedding_bytes(self) -> int:
        """Every tensor needed at inference: tables plus the method's params and buffers."""
        own = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return sum(t.bytes for t in self.physical_tables()) + own

    def full_bytes(self) -> int:
        return sum(f.full_bytes(self.dim) for f in self.features)


def single_feature_kjt(key: str, ids: KeyedJaggedTensor, values: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """A KJT for one physical table sharing the bags of `ids` (one feature) unless lengths differ."""
    return KeyedJaggedTensor(keys=[key], values=values,
                             lengths=ids.lengths() if lengths is None else lengths,
                             weights=ids.weights_or_none())


def concat_remapped(parts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """The methods' remap outputs as one KJT. When some carry weights (e.g. a mean combiner's
    1/length) and others not, the unweighted get weight 1, which pools the same sum."""
    if len({p.weights_or_none() is None for p in parts}) > 1:
        parts = [p if p.weights_or_none() is not None else
                 KeyedJaggedTensor(keys=p.keys(), values=p.values(), lengths=p.lengths(),
                                   weights=torch.ones(p.values().numel(), device=p.values().device))
                 for p in parts]
    return KeyedJaggedTensor.concat(parts)
