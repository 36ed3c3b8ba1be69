"""What the Triton lookup computes, as small descriptor tensors built from the fused parts.

Each logical feature is 1..P *parts* (embtables.specs.FusedFeature, from Method.fused_parts);
part p of feature f derives a row of one table from the raw id, pools it over the bag, and the
feature's output combines its parts:

    kind  IDENTITY  row = id                               (full)
          HASH      row = h_a(id) mod b                    (hash, multiplexed chunks; a = mixed salt)
          DIV / MOD row = id // a,  id mod a               (qr's quotient / remainder)
          BITS      row = b + pext(code(id), a)            (binary_code block: a = the block's code bits)
    op    CONCAT    each part into its own columns         (full, hash, multiplexed, qr/bc concat)
          SUM       parts added                            (binary_code sum, qr add)
          MULT      parts multiplied (two)                 (qr mult; the bag weight goes to part 0 only,
                                                            or to both with qr's weight_both)

The same arithmetic as the methods' `remap` + `combine` (tests check the two agree); nothing
here imports triton, so plans can be built and inspected anywhere.
"""
from __future__ import annotations

import torch

from embtables.specs import BITS, MULT, FusedFeature, TableSpec


class Plan:
    """All features' parts as [F, P] int64 tensors, and the tables as offsets into flat buffers."""

    def __init__(self, features: list[FusedFeature], tables: list[TableSpec], dim: int):
        self.features = list(features)
        self.dim = dim
        self.tables = list(tables)
        index = {t.name: i for i, t in enumerate(self.tables)}
        P = max(len(f.parts) for f in self.features)
        self.max_parts = P

        def grid(get, fill=0):
            return torch.tensor([[get(f.parts[p]) if p < len(f.parts) else fill for p in range(P)]
                                 for f in self.features], dtype=torch.long)

        self.kind, self.a, self.b = grid(lambda p: p.kind), grid(lambda p: p.a), grid(lambda p: p.b)
        self.col, self.weighted = grid(lambda p: p.col), grid(lambda p: int(p.weighted))
        self.table = grid(lambda p: index[p.table])
        self.n_parts = torch.tensor([len(f.parts) for f in self.features])
        self.op = torch.tensor([f.op for f in self.features])
        self.scramble = torch.tensor([list(f.scramble) if f.scramble else [0, 0, 0] for f in self.features])
        self.has_scramble = torch.tensor([f.scramble is not None for f in self.features], dtype=torch.long)
        rows = torch.tensor([t.rows for t in self.tables])
        dims = torch.tensor([t.dim for t in self.tables])
        self.table_rows, self.table_dim = rows, dims
        self.table_offset = torch.cat([torch.zeros(1, dtype=torch.long), (rows * dims).cumsum(0)[:-1]])
        self.state_offset = torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)[:-1]])
        self.total_elems, self.total_rows = int((rows * dims).sum()), int(rows.sum())
        self.part_dim = torch.where(self.kind >= 0, dims[self.table], 0) * (torch.arange(P) < self.n_parts[:, None])
        self.block_d = max(4, 1 << (max(self.dim, int(dims.max())) - 1).bit_length())
        bit_masks = [p.a for f in self.features for p in f.parts if p.kind == BITS]
        self.code_bits = max([m.bit_length() for m in bit_masks] + [1])
        # compile-time switches: bit k set when some part has kind k; whether any feature multiplies
        self.kinds = sum(1 << k for k in {p.kind for f in self.features for p in f.parts})
        self.has_mult = any(f.op == MULT for f in self.features)

    def tensors(self, device) -> dict[str, torch.Tensor]:
        names = ("kind", "a", "b", "col", "weighted", "table", "n_parts", "op", "scramble", "has_scramble",
                 "table_rows", "table_dim", "table_offset", "state_offset", "part_dim")
        return {n: getattr(self, n).to(device).contiguous() for n in names}
