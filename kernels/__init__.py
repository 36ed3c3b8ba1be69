"""Fused pooled embedding lookups: FBGEMM TBE where it imports, pure torch everywhere, the compiled
CPU kernels (cpu_fused) when built. The Triton lookup (triton_lookup) is imported on demand."""
from embtables.kernels.cpu_fused import CpuFusedLookup, cpu_fused_available
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available
from embtables.kernels.fused import BACKENDS, FusedLookup
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.torch_lookup import TorchLookup

__all__ = ["BACKENDS", "CpuFusedLookup", "FbgemmLookup", "FusedLookup", "RowwiseAdagrad", "TorchLookup",
           "cpu_fused_available", "fbgemm_available"]
