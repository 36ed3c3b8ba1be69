"""`embtables bench gpu --json OUT`: the embedding layer and a DLRM train step on the device.

Per method (full tables, and the compressed hash and qr) and backend (torch reference, Triton,
FBGEMM TBE where its CUDA build is installed; on CPU: torch, cpu_fused, TBE):

  (what is counted: BYTES_COUNTED below)

Both as a fraction of the device's measured copy bandwidth (read + write of one large buffer).
The whole embedding layer is timed (remap → lookup → combine, or Triton's one fused kernel), so
the compressed methods compare "Triton fused remap" against "materialised indices → TBE/torch".
DLRM samples/s: a whole train step (forward, BCE, backward with the fused table update, dense
Adam step) on synthetic batches already on the device. Runs on CPU too, at small sizes.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torchrec import KeyedJaggedTensor

BYTES_COUNTED = """\
  forward GB/s     = (rows read + output written) / forward time, where rows read = for every id
                     and every physical row it derives (qr: two), that row's dim × 4 bytes, and
                     output written = B × F × d × 4. Index bytes are not counted.
  train-step GB/s  = (forward bytes + for every distinct physical row touched, its weights and its
                     row-wise Adagrad state read and written once) / (forward + backward) time.
                     The backward's gradient traffic is not counted, so this is a lower bound.
"""

SIZES = {  # (features, rows per feature, dim, batch, ids per bag, timed iterations)
    "cuda": dict(features=8, rows=2_000_000, dim=64, batch=32768, pooling=8, iters=20,
                 bottom_mlp=[512, 256], top_mlp=[1024, 1024, 512, 256]),
    "cpu": dict(features=4, rows=20_000, dim=16, batch=512, pooling=4, iters=3, bottom_mlp=[32], top_mlp=[64]),
}
METHODS = (("full", 1.0), ("hash", 10.0), ("qr", 10.0))


def add_gpu_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: by device)")
    parser.add_argument("--rows", type=int, default=None, help="rows per feature (default: by device)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: by device)")


def run_gpu_bench(args) -> dict:
    from embtables.device import resolve_device

    device = resolve_device(args.device)
    sizes = dict(SIZES["cuda" if device.type == "cuda" else "cpu"])
    for key in ("iters", "rows", "batch"):
        if getattr(args, key, None):
            sizes[key] = getattr(args, key)
    copy = copy_bandwidth(device)
    result = {"device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
              "triton": _version("triton"), "fbgemm_cuda": _fbgemm_cuda(), "sizes": sizes,
              "copy_gbps": copy, "bytes_counted": " ".join(BYTES_COUNTED.split()),
              "lookup": [], "dlrm": [], "skipped": []}
    for method, ratio in METHODS:
        for backend in backends_for(device):
            try:
                row = time_layer(method, ratio, backend, device, sizes)
            except _Unavailable as e:
                result["skipped"].append({"method": method, "backend": backend, "reason": str(e)})
                continue
            row["forward_fraction_of_copy"] = row["forward_gbps"] / copy
            row["train_step_fraction_of_copy"] = row["train_step_gbps"] / copy
            result["lookup"].append(row)
            print(f"{method:5s} {backend:9s} forward {row['forward_ms']:8.3f} ms {row['forward_gbps']:8.1f} GB/s "
                  f"({row['forward_fraction_of_copy']:.0%} of copy)  train step {row['train_step_ms']:8.3f} ms "
                  f"{row['train_step_gbps']:8.1f} GB/s", flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    for backend in backends_for(device):
        try:
            row = time_dlrm(backend, device, sizes)
        except _Unavailable as e:
            result["skipped"].append({"method": "dlrm", "backend": backend, "reason": str(e)})
            continue
        result["dlrm"].append(row)
        print(f"dlrm  {backend:9s} {row['samples_per_sec']:,.0f} samples/s ({row['step_ms']:.2f} ms/step)", flush=True)
    return result


class _Unavailable(Exception):
    pass


def backends_for(device: torch.device) -> list[str]:
    return ["torch", "triton", "fbgemm"] if device.type == "cuda" else ["torch", "cpu_fused", "fbgemm"]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _fbgemm_cuda() -> bool:
    from embtables.kernels.fbgemm_lookup import fbgemm_cuda_available

    return fbgemm_cuda_available()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of y.copy_(x) over a buffer far larger than the caches (bytes read + written)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    seconds = _median_time(lambda: y.copy_(x), device, iters=10)
    del x, y
    return 2 * n * 4 / seconds / 1e9


def _median_time(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- the embedding layer --------------------------------------------------------------------
def _model(method: str, ratio: float, backend: str, device: torch.device, sizes: dict, dense: int = 0):
    from embtables.config import load_config
    from embtables.errors import EmbtablesError
    from embtables.pipelines.train.build import RunInputs, build_model
    from embtables.specs import FeatureSpec

    features = [FeatureSpec(f"C{i + 1}", sizes["rows"], multi_hot=True, mean_length=sizes["pooling"])
                for i in range(sizes["features"])]
    cfg = load_config(None, ["data.train=synthetic", f"embedding.dim={sizes['dim']}",
                             f"embedding.compression.method={method}", f"embedding.compression.ratio={ratio}",
                             f"embedding.backend={backend}", f"model.bottom_mlp={sizes['bottom_mlp']}",
                             f"model.top_mlp={sizes['top_mlp']}"])
    inputs = RunInputs(Path("."), {}, features, [f"I{i}" for i in range(dense)], list(range(dense)))
    try:
        return build_model(cfg, inputs, backend=backend, device=device)
    except (EmbtablesError, ValueError, RuntimeError, ImportError) as e:
        raise _Unavailable(str(e).splitlines()[0]) from None


def _batch(sizes: dict, seed: int) -> KeyedJaggedTensor:
    """`pooling` uniform ids per bag: no locality, so rows come from memory, not caches."""
    g = torch.Generator().manual_seed(seed)
    n, b, p = sizes["features"], sizes["batch"], sizes["pooling"]
    return KeyedJaggedTensor(keys=[f"C{i + 1}" for i in range(n)],
                             values=torch.randint(0, sizes["rows"], (n * b * p,), generator=g),
                             lengths=torch.full((n * b,), p, dtype=torch.int32))


def counted_bytes(embeddings, sparse: KeyedJaggedTensor) -> tuple[int, int]:
    """(forward bytes, train-step bytes) as the module docstring defines them, from the methods'
    own remap of this batch (on the host)."""
    from torchrec import KeyedJaggedTensor as KJT

    ordered = embeddings.order_input(sparse)
    dims = {t.name: t.dim for m in embeddings.methods for t in m.physical_tables()}
    read, touched = 0, {}
    parts = ordered.split([len(m.features) for m in embeddings.methods])
    for m, part in zip(embeddings.methods, parts):
        physical: KJT = m.remap(part)
        tables = dict(m.lookups())
        for key, values in zip(physical.keys(), physical.split([1] * len(physical.keys()))):
            table = tables[key]
            read += values.values().numel() * dims[table] * 4
            touched.setdefault(table, []).append(values.values())
    written = ordered.stride() * len(ordered.keys()) * embeddings.dim * 4
    updated = sum(torch.cat(v).unique().numel() * (dims[t] * 4 + 4) * 2 for t, v in touched.items())
    return read + written, read + written + updated


def time_layer(method: str, ratio: float, backend: str, device: torch.device, sizes: dict) -> dict:
    model = _model(method, ratio, backend, device, sizes)
    emb = model.embeddings
    host = _batch(sizes, seed=0)
    fwd_bytes, step_bytes = counted_bytes(emb, host)
    sparse = emb.order_input(host).to(device)
    out = emb(sparse)
    grad = torch.randn(out.shape, device=device) * 1e-3

    def forward():
        with torch.no_grad():
            emb(sparse)

    def step():
        (emb(sparse) * grad).sum().backward()

    fwd = _median_time(forward, device, sizes["iters"])
    train_step = _median_time(step, device, sizes["iters"])
    backends = sorted(set(emb.lookup.backends)) if hasattr(emb, "lookup") else [backend]
    return {"method": method, "ratio": ratio, "backend": backend, "kernels": backends,
            "embedding_bytes": emb.embedding_bytes(), "bytes_forward": fwd_bytes, "bytes_train_step": step_bytes,
            "forward_ms": fwd * 1e3, "forward_gbps": fwd_bytes / fwd / 1e9,
            "train_step_ms": train_step * 1e3, "train_step_gbps": step_bytes / train_step / 1e9}


# --- DLRM -----------------------------------------------------------------------------------
def time_dlrm(backend: str, device: torch.device, sizes: dict, dense: int = 13) -> dict:
    from embtables.pipelines.train.local import make_model_optimizer

    model = _model("full", 1.0, backend, device, sizes, dense=dense)
    optimizer = make_model_optimizer({"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}, model)
    g = torch.Generator().manual_seed(1)
    b = sizes["batch"]
    sparse = model.embeddings.order_input(_batch(sizes, seed=1)).to(device)
    dense_x = torch.rand(b, dense, generator=g).to(device)
    label = (torch.rand(b, generator=g) < 0.25).float().to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        loss = loss_fn(model(dense_x, sparse), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _median_time(step, device, sizes["iters"])
    return {"backend": backend, "kernels": sorted(set(model.embeddings.lookup.backends))
            if hasattr(model.embeddings, "lookup") else [backend],
            "step_ms": seconds * 1e3, "samples_per_sec": b / seconds, "batch": b}
