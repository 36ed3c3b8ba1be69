"""What the Triton lookup computes, as small descriptor tensors built from the methods.

Each logical feature is 1..P *parts*; part p of feature f derives a row of one table from the
raw id, pools it over the bag, and the feature's output combines its parts:

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

from dataclasses import dataclass

import torch

from embtables.hashing import _signed, mix64_int
from embtables.specs import TableSpec

IDENTITY, HASH, DIV, MOD, BITS = range(5)
CONCAT, SUM, MULT = range(3)
SUPPORTED = ("full", "hash", "qr", "binary_code", "multiplexed")


@dataclass
class Part:
    kind: int
    table: str
    col: int = 0            # first output column (CONCAT)
    a: int = 0
    b: int = 0
    weighted: bool = True   # multiply by the bag's per-sample weight


@dataclass
class FeaturePlan:
    parts: list[Part]
    op: int = CONCAT
    scramble: tuple[int, int, int] | None = None  # binary_code: (bits, half, multiplier) of its code


def method_plans(method) -> list[FeaturePlan]:
    """One plan per feature of `method`, in the method's feature order."""
    name = method.name
    if name == "full":
        return [FeaturePlan([Part(IDENTITY, method.table_name)])]
    if name == "hash":
        return [FeaturePlan([Part(HASH, method.table_name, a=_signed(mix64_int(method.salt)), b=method.rows)])]
    if name == "qr":
        q_kind, r_kind, a = (MOD, DIV, method.q_rows) if method.frequency_aware else (DIV, MOD, method.c)
        op = {"mult": MULT, "add": SUM, "concat": CONCAT}[method.op]
        parts = [Part(q_kind, method.q_name, a=a),
                 Part(r_kind, method.r_name, a=a, col=method.q_dim if method.op == "concat" else 0,
                      weighted=method.op != "mult" or method.weight_both)]
        return [FeaturePlan(parts, op)]
    if name == "binary_code":
        masks = [0] * method.k
        for bit, owner in enumerate(method._owner.tolist()):
            masks[owner] |= 1 << bit
        names = method.table_names()
        if method.fusion == "sum":
            parts = [Part(BITS, names[0], a=m, b=off) for m, off in zip(masks, method.offsets)]
            op = SUM
        else:
            width = method.dim // method.k
            parts = [Part(BITS, n, a=m, col=i * width) for i, (n, m) in enumerate(zip(names, masks))]
            op = CONCAT
        scramble = None
        if method.scramble:
            from embtables.methods.binary_code import _SCRAMBLE_MULT

            mask = (1 << method.bits) - 1
            scramble = (method.bits, max(1, method.bits // 2), _SCRAMBLE_MULT & mask)
        return [FeaturePlan(parts, op, scramble)]
    if name == "multiplexed":
        if method.combiner != "sum":
            raise ValueError(f"the Triton lookup pools bags by sum; multiplexed combiner {method.combiner!r} has "
                             f"no plan (use another backend)")
        names = method.table_names()
        plans = []
        n = len(method.features)
        for i in range(n):
            parts = []
            for j in range(method.chunks):
                slot = j * n + i  # slots are chunk-major
                parts.append(Part(HASH, names[method.slot_table[slot]], col=j * method.chunk_dim,
                                  a=_signed(mix64_int(method.salts[slot])), b=method.rows))
            plans.append(FeaturePlan(parts))
        return plans
    raise ValueError(f"the Triton lookup has no plan for method {name!r} (supported: {', '.join(SUPPORTED)})")


class Plan:
    """All features' parts as [F, P] int64 tensors, and the tables as offsets into flat buffers."""

    def __init__(self, methods, tables: list[TableSpec]):
        self.features = [p for m in methods for p in method_plans(m)]
        self.dim = methods[0].dim
        if any(m.dim != self.dim for m in methods):
            raise ValueError("the Triton lookup needs one output dim for every method")
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

    def tensors(self, device) -> dict[str, torch.Tensor]:
        names = ("kind", "a", "b", "col", "weighted", "table", "n_parts", "op", "scramble", "has_scramble",
                 "table_rows", "table_dim", "table_offset", "state_offset", "part_dim")
        return {n: getattr(self, n).to(device).contiguous() for n in names}
