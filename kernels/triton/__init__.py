"""The Triton lookup (lookup.TritonFusedLookup): raw ids → [B, F, d] with remap, gather, pool and
combine in one kernel (kernels.py), driven by descriptor tensors built from the methods' fused
parts (plan.py). Nothing here is imported until the Triton backend is asked for."""
