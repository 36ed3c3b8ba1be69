"""Fused pooled embedding lookups: FBGEMM TBE where it imports, pure torch everywhere."""
from embtables.kernels.fbgemm_lookup import FbgemmLookup, fbgemm_available
from embtables.kernels.fused import BACKENDS, FusedLookup
from embtables.kernels.optimizer import RowwiseAdagrad
from embtables.kernels.torch_lookup import TorchLookup

__all__ = ["BACKENDS", "FbgemmLookup", "FusedLookup", "RowwiseAdagrad", "TorchLookup", "fbgemm_available"]
