"""resolve_device: auto/cpu/cuda/cuda:N with CUDA availability and the device count mocked."""
import importlib.metadata
from unittest import mock

import pytest
import torch

from embtables.device import resolve_device
from embtables.errors import ConfigError


def cuda(available: bool, count: int = 0):
    """Pretend this machine has `count` CUDA devices (or none)."""
    return mock.patch.multiple(torch.cuda, is_available=lambda: available, device_count=lambda: count)


def test_auto_picks_cuda_only_when_available():
    with cuda(False):
        assert resolve_device("auto") == torch.device("cpu")
    with cuda(True, 2):
        assert resolve_device("auto") == torch.device("cuda", 0)


def test_cpu_is_cpu_even_with_cuda():
    with cuda(True, 1):
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device(" CPU ") == torch.device("cpu")


def test_explicit_cuda_and_index():
    with cuda(True, 2):
        assert resolve_device("cuda") == torch.device("cuda", 0)
        assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line_error(spec):
    with cuda(False), pytest.raises(ConfigError, match="CUDA is not available") as err:
        resolve_device(spec)
    assert "\n" not in str(err.value)


def test_index_out_of_range():
    with cuda(True, 2), pytest.raises(ConfigError, match=r"'cuda:2' is out of range: .* 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "mps", ""])
def test_unknown_spec(spec):
    with cuda(True, 1), pytest.raises(ConfigError, match="is unknown; use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


# fbgemm_cuda_available: the CPU build of fbgemm_gpu imports too, so the probe asks the dispatcher.
from embtables.kernels import fbgemm_lookup  # noqa: E402


def test_fbgemm_cuda_probe_follows_the_dispatcher():
    asked = []

    def has_kernel(op, key):
        asked.append((op, key))
        return key == "CUDA"

    with mock.patch.object(fbgemm_lookup, "fbgemm_available", lambda: True), \
            mock.patch.object(torch._C, "_dispatch_has_kernel_for_dispatch_key", has_kernel):
        assert fbgemm_lookup.fbgemm_cuda_available()
    assert asked == [(fbgemm_lookup.TBE_FORWARD_OP, "CUDA")]


def test_fbgemm_cuda_probe_false_without_fbgemm_or_op():
    with mock.patch.object(fbgemm_lookup, "fbgemm_available", lambda: False):
        assert not fbgemm_lookup.fbgemm_cuda_available()

    def missing(op, key):
        raise RuntimeError(f"operator {op} does not exist")

    with mock.patch.object(fbgemm_lookup, "fbgemm_available", lambda: True), \
            mock.patch.object(torch._C, "_dispatch_has_kernel_for_dispatch_key", missing):
        assert not fbgemm_lookup.fbgemm_cuda_available()


def installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not (installed("fbgemm-gpu-cpu") and fbgemm_lookup.fbgemm_available()),
                    reason="needs the CPU build of fbgemm_gpu (fbgemm-gpu-cpu) importing")
def test_fbgemm_cuda_probe_real_cpu_build():
    # The CPU build's TBE forward has a CPU kernel (so the probe is known to
    # see registrations) and no CUDA one.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(fbgemm_lookup.TBE_FORWARD_OP, "CPU")
    assert not fbgemm_lookup.fbgemm_cuda_available()
