"""Pooled embedding lookups behind one protocol (lookup.PooledLookup) and one factory
(lookup.make_lookup): FBGEMM TBE, the compiled CPU kernels (cpu_fused), the torch reference.
The Triton lookup (kernels/triton/), which reads raw ids, and the TorchRec one (torchrec_lookup:
the drop-in's and the sharded tables) are imported on demand."""
from embtables.kernels.cpu_fused import CpuFusedLookup, cpu_fused_available
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available, fbgemm_cuda_available
from embtables.kernels.lookup import BACKENDS, PooledLookup, TableGroupLookup, make_lookup, resolve_backend
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.torch_lookup import TorchLookup

__all__ = ["BACKENDS", "CpuFusedLookup", "FbgemmLookup", "PooledLookup", "RowwiseAdagrad", "TableGroupLookup",
           "TorchLookup", "cpu_fused_available", "fbgemm_available", "fbgemm_cuda_available", "make_lookup",
           "resolve_backend"]
