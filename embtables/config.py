"""YAML job configs: defaults, `--set a.b=v` overrides, and validation that names the bad key."""
from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from embtables.device import resolve_device
from embtables.errors import ConfigError

# Every key a config may hold, with its default. `None` marks "required or optional, no default".
# Dicts marked OPEN accept any sub-key (method options, per-feature overrides).
OPEN = "__open__"
DEFAULTS: dict[str, Any] = {
    "data": {
        "train": None,            # encoded dataset dir (embtables data …) or plain Parquet files/dirs/globs
        "valid": None,            # plain Parquet only; encoded datasets carry their own split
        "label": None,            # None: the encoded dataset's own label (plain Parquet: "label")
        "dense": None,            # column names; None = all dense columns of an encoded dataset
        "sparse": None,           # [{name: C1}, …] or [C1, …]; None = all sparse features
        "min_count": 1,           # rarer values map to the feature's OOV id
    },
    "model": {
        "name": "dlrm",           # dlrm | dcnv2
        "bottom_mlp": [64, 32],   # DLRM: dense → … → embedding.dim
        "top_mlp": [128, 64],     # DLRM: interactions → … → 1
        "cross_layers": 3,        # DCNv2
        "deep_mlp": [256, 128],   # DCNv2
        "dropout": 0.0,
    },
    "embedding": {
        "dim": 16,
        "backend": "auto",        # auto | cpu_fused | fbgemm | torch | triton (kernels/lookup.py)
        "lr": 0.05,               # row-wise Adagrad fused into the lookup's backward
        "eps": 1e-8,
        "init_std": 0.01,
        "compression": {OPEN: True, "method": "full", "ratio": 1.0},
        "features": {OPEN: True},  # NAME: {compression: {method, ratio, …}}
    },
    "train": {
        "batch_size": 2048,
        "epochs": 1,
        "workers": 1,
        "seed": 0,
        "checkpoint_every_steps": 0,  # 0 = only at epoch end
        "optimizer": "adam",      # dense params: adam | adagrad
        "lr": 1e-3,
        "weight_decay": 0.0,
        "max_steps": None,        # stop early (smoke runs)
        "eval_batch_size": 16384,
        "log_every": 20,
        "threads": None,          # torch intra-op threads; None = all cores
        "precision": "fp32",      # fp32 | bf16 | auto (bf16 autocast for the dense network where bf16
                                  # products measure faster: CUDA, or AVX512_BF16/AMX + a probe; tables and loss stay fp32)
        "prefetch": "auto",       # batches prepared ahead on a background thread: auto (sized for the
                                  # machine, inline below 4 cores: pipelines/data/prefetch.py), a number, 0 = inline
        "sharding": None,         # table_wise | column_wise | row_wise (distributed runs)
        "max_failures": 0,
        "device": "auto",         # auto (CUDA when available) | cpu | cuda | cuda:N
    },
}


SHARDINGS = ("table_wise", "column_wise", "row_wise", "table_row_wise")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e9` (no dot) as a string; read it as the number anyone means (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(defaults: dict) -> dict:
    """The defaults without the OPEN markers."""
    return {k: _plain(v) if isinstance(v, dict) else copy.deepcopy(v) for k, v in defaults.items() if k != OPEN}


def _merge(defaults: dict, given: dict, path: str) -> dict:
    out = _plain(defaults)
    for key, value in given.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in defaults and not defaults.get(OPEN):
            known = [k for k in defaults if k != OPEN]
            raise ConfigError(f"unknown config key {where!r}{_did_you_mean(str(key), known)}; "
                              f"known keys here: {', '.join(known)}")
        default = defaults.get(key)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
            out[key] = _merge(default, value, where)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 10, 0.5, true, [1,2], hash."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    node = raw
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a mapping")
    node[parts[-1]] = parse_value(text)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The validated config: file (if any) + overrides, merged over DEFAULTS."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            raw = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = _merge(DEFAULTS, raw, "")
    check_config(cfg)
    if path is not None:
        cfg["_config_dir"] = str(Path(path).resolve().parent)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg: dict) -> None:
    """Every value within its allowed range, so nothing fails (or is silently ignored) mid-run."""
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            value = cfg
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            raise ConfigError(f"config key {key!r} {what}, got {value!r}")

    def integer(key: str, low: int, allow_none: bool = False) -> None:
        section, name = key.split(".")
        value = cfg[section][name]
        if allow_none and value is None:
            return
        need(_is_int(value) and value >= low, key, f"must be an integer >= {low}" + (" or null" if allow_none else ""))

    def positive(key: str, value, zero: bool = False) -> None:
        ok = _is_number(value) and (value >= 0 if zero else value > 0)
        need(ok, key, "must be a finite number " + (">= 0" if zero else "> 0"))

    data, model, emb, tcfg = cfg["data"], cfg["model"], cfg["embedding"], cfg["train"]
    need(data["train"] is not None, "data.train", "is required")
    need(data["label"] is None or isinstance(data["label"], str), "data.label",
         "must be a column name (or unset: the encoded dataset's own label)")
    integer("data.min_count", 1)
    need(model["name"] in ("dlrm", "dcnv2"), "model.name", "must be dlrm or dcnv2")
    for key in ("bottom_mlp", "top_mlp", "deep_mlp"):
        need(isinstance(model[key], list) and all(_is_int(w) and w > 0 for w in model[key]), f"model.{key}",
             "must be a list of positive integers")
    integer("model.cross_layers", 0)
    need(_is_number(model["dropout"]) and 0 <= model["dropout"] < 1, "model.dropout", "must be a number in [0, 1)")
    integer("embedding.dim", 1)
    from embtables.kernels.lookup import BACKENDS  # the one list, beside the policy that reads it

    need(emb["backend"] in BACKENDS, "embedding.backend", f"must be one of {', '.join(BACKENDS)}")
    need(emb["backend"] != "fbgemm" or not _is_int(emb["dim"]) or emb["dim"] % 4 == 0, "embedding.dim",
         "must be a multiple of 4 with embedding.backend fbgemm (FBGEMM TBE needs row widths in multiples of 4)")
    for key in ("lr", "eps", "init_std"):
        positive(f"embedding.{key}", emb[key])
    _check_compression(need, "embedding.compression", emb["compression"])
    for name, override in emb["features"].items():
        need(isinstance(override, dict) and set(override) <= {"compression"},
             f"embedding.features.{name}", "may only hold a 'compression' mapping")
        if isinstance(override.get("compression"), dict):
            _check_compression(need, f"embedding.features.{name}.compression", override["compression"])
    for key in ("batch_size", "epochs", "workers", "eval_batch_size", "log_every"):
        integer(f"train.{key}", 1)
    integer("train.seed", 0)
    integer("train.checkpoint_every_steps", 0)
    need(tcfg["prefetch"] == "auto" or _is_int(tcfg["prefetch"]) and tcfg["prefetch"] >= 0, "train.prefetch",
         "must be auto or an integer >= 0 (batches prepared ahead; 0 = off)")
    integer("train.max_failures", 0)
    integer("train.max_steps", 1, allow_none=True)
    integer("train.threads", 1, allow_none=True)
    positive("train.lr", tcfg["lr"])
    positive("train.weight_decay", tcfg["weight_decay"], zero=True)
    need(tcfg["optimizer"] in ("adam", "adagrad"), "train.optimizer", "must be adam or adagrad")
    need(tcfg["precision"] in ("fp32", "bf16", "auto"), "train.precision", "must be fp32, bf16 or auto")
    need(tcfg["sharding"] is None or tcfg["sharding"] in SHARDINGS, "train.sharding",
         f"must be one of {', '.join(SHARDINGS)} (or unset)")
    try:  # well formed, and an explicit CUDA request only where CUDA is
        resolve_device(tcfg["device"])
    except ConfigError as e:
        raise ConfigError(f"config key 'train.device': {e}") from None


def _check_compression(need, key: str, compression: dict) -> None:
    ratio = compression.get("ratio", 1.0)
    need(_is_number(ratio) and ratio >= 1, f"{key}.ratio", "must be a finite number >= 1")
    need(isinstance(compression.get("method", "full"), str), f"{key}.method", "must be a method name")


def sparse_names(cfg: dict) -> list[str] | None:
    sparse = cfg["data"]["sparse"]
    if sparse is None:
        return None
    names = []
    for i, item in enumerate(sparse):
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and "name" in item:
            names.append(item["name"])
        else:
            raise ConfigError(f"config key 'data.sparse[{i}]' must be a name or {{name: …}}, got {item!r}")
    return names
