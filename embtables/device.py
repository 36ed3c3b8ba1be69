"""`train.device` / `--device`: one spec string (`auto | cpu | cuda | cuda:N`) resolved to a torch.device."""
from __future__ import annotations

import re

import torch

from embtables.errors import ConfigError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str) -> torch.device:
    """`auto` is CUDA device 0 when CUDA is available, else the CPU; an explicit CUDA request
    without CUDA (or with an index past the last GPU) is an error, never a silent CPU fallback."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(spec)
    if match is None:
        raise ConfigError(f"device {spec!r} is unknown; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asks for CUDA, but CUDA is not available here "
                          f"(torch {torch.__version__}); use device auto or cpu")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {spec!r} is out of range: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)
