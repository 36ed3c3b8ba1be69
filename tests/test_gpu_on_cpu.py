"""Issue 12 on a CPU machine: placement on `meta`, no fbgemm op in a step after the host-side key
ordering, the CLI's CUDA errors, a whole Triton job in the interpreter, bench gpu at CPU sizes, Ray's
GPU request. (The resolver itself: tests/test_device.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from embtables.errors import ConfigError
from embtables.jagged import kjt_offsets, order_keys
from embtables.pipelines.data.batches import iterate_batches
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.train.build import build_model, resolve_inputs
from embtables.pipelines.train.local import make_model_optimizer
from embtables.pipelines.train.placement import to_device
from tests.helpers import kjt, tiny_config


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ingest_synth(tmp_path_factory.mktemp("data") / "synth", preset="tiny", rows=3000, seed=1)


def config(tmp_path, data, *overrides):
    return tiny_config(tmp_path, data, *overrides, epochs=1)


def test_config_key_defaults_to_auto_and_rejects_garbage(tmp_path, synth):
    assert config(tmp_path, synth)["train"]["device"] == "auto"
    with pytest.raises(ConfigError, match="config key 'train.device': device 'gpu0' is unknown"):
        config(tmp_path, synth, "train.device=gpu0")


def test_load_on_cuda_without_cuda_is_a_clear_error(tmp_path):
    import embtables

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="asks for CUDA, but CUDA is not available"):
        embtables.load(tmp_path / "no-export-needed", device="cuda")


def test_cli_train_on_cuda_without_cuda_is_one_error_line(tmp_path, synth):
    """`embtables train … --set train.device=cuda` here: exit 2, one `error:` line naming CUDA."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {synth}}}\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: no CUDA device visible
    r = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "train", str(cfg), "--out",
                        str(tmp_path / "run"), "--set", "train.device=cuda"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "CUDA" in errors[0], r.stderr
    assert not (tmp_path / "run").exists()


# --- KJT steps without fbgemm ---------------------------------------------------------------
def test_order_keys_matches_torchrec_permute():
    batch = kjt({"a": [[1, 2], [], [3]], "b": [[4], [5, 6, 7], []], "c": [[8], [9], [10, 11]]},
                weights={"a": [[.1, .2], [], [.3]], "b": [[.4], [.5, .6, .7], []], "c": [[.8], [.9], [1., 1.1]]})
    for keys in (["c", "a", "b"], ["b"], ["a", "b", "c"], ["c", "a"]):
        ours = order_keys(batch, keys)
        index = {k: i for i, k in enumerate(batch.keys())}
        ref = batch.permute([index[k] for k in keys])
        assert ours.keys() == keys
        assert torch.equal(ours.values(), ref.values()) and torch.equal(ours.weights(), ref.weights())
        assert torch.equal(ours.lengths(), ref.lengths().to(ours.lengths().dtype))
        assert torch.equal(ours.offsets_or_none(), ref.offsets())  # filled in, not computed later
        assert ours.length_per_key() == ref.length_per_key()
    with pytest.raises(KeyError, match="lacks sparse features \\['z'\\]"):
        order_keys(batch, ["a", "z"])
    plain = kjt({"a": [[1, 2], [3]]})
    assert plain.offsets_or_none() is None
    assert kjt_offsets(plain).tolist() == [0, 2, 3]


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _one_batch(cfg, inputs, model):
    batch = next(iterate_batches(inputs.dataset, "train", 128, shuffle=True, seed=0))
    return to_device(batch, model.embeddings.input_keys, model.device)  # the host-side ordering


@pytest.mark.parametrize("method", ["full", "hash", "qr", "mixed_dim"])
def test_a_torch_backend_step_dispatches_no_fbgemm_op(tmp_path, synth, method):
    """After the host-side ordering, forward + backward (tables updated) + the dense optimizer step
    run only plain torch ops, so they run on CUDA with the CPU build of fbgemm_gpu."""
    cfg = config(tmp_path, synth, f"embedding.compression.method={method}",
                 f"embedding.compression.ratio={1 if method == 'full' else 4}")
    inputs = resolve_inputs(cfg)
    model = build_model(cfg, inputs, device="cpu")
    optimizer = make_model_optimizer(cfg["train"], model)
    batch = _one_batch(cfg, inputs, model)
    # The probe sees fbgemm ops: TorchRec's own permute of a lengths-only KJT dispatches one.
    raw = next(iterate_batches(inputs.dataset, "train", 16, shuffle=False))
    with _OpNames() as probe:
        raw.sparse.permute(list(reversed(range(len(raw.sparse.keys())))))
        raw.sparse.offsets()
    assert any(n.startswith("fbgemm") for n in probe.names)

    before = [w.clone() for w in model.embeddings.lookup.table_weights()]
    with _OpNames() as probe:
        logits = model(batch.dense[:, inputs.dense_index], batch.sparse)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert probe.names, "the probe recorded nothing"
    assert not [n for n in probe.names if n.startswith("fbgemm")], sorted(set(probe.names))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.embeddings.lookup.table_weights()))


# --- placement ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "qr", "mixed_dim", "multiplexed", "low_rank", "binary_code"])
def test_every_parameter_and_buffer_is_built_on_the_device(tmp_path, synth, method):
    cfg = config(tmp_path, synth, f"embedding.compression.method={method}",
                 f"embedding.compression.ratio={1 if method == 'full' else 4}")
    model = build_model(cfg, resolve_inputs(cfg), device="meta")
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not stray, stray
    assert model.device.type == "meta"
    optimizer = make_model_optimizer(cfg["train"], model)
    assert optimizer is not None


# --- a whole Triton job in the interpreter --------------------------------------------------
def test_a_triton_training_job_runs_in_the_interpreter(tmp_path, synth):
    pytest.importorskip("triton")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"data: {{train: {synth}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [8]}}\n"
                   "embedding: {dim: 8, backend: triton, compression: {method: qr, ratio: 4}}\n"
                   "train: {batch_size: 64, max_steps: 3, eval_batch_size: 4096, threads: 1, device: cpu}\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "train", str(cfg), "--out",
                        str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backends"] == ["triton"] and metrics["device"] == "cpu"
    assert metrics["steps"] == 3 and metrics["valid_rows"] > 0 and 0.0 < metrics["auc"] < 1.0


# --- the GPU benchmark at CPU sizes ---------------------------------------------------------
def test_bench_gpu_runs_on_cpu_and_writes_its_schema(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "bench", "gpu", "--device", "cpu",
                        "--rows", "3000", "--batch", "64", "--iters", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["copy_gbps"] > 0 and "rows read" in result["bytes_counted"]
    methods = {(row["method"], row["backend"]) for row in result["lookup"]}
    assert {("full", "torch"), ("hash", "torch"), ("qr", "torch")} <= methods
    for row in result["lookup"]:
        assert row["bytes_train_step"] > row["bytes_forward"] > 0
        assert row["forward_gbps"] == pytest.approx(row["bytes_forward"] / row["forward_ms"] / 1e6)
        assert row["forward_fraction_of_copy"] == pytest.approx(row["forward_gbps"] / result["copy_gbps"])
    assert [d["backend"] for d in result["dlrm"]][0] == "torch"
    assert all(d["samples_per_sec"] > 0 for d in result["dlrm"])
    tried = methods | {(s["method"], s["backend"]) for s in result["skipped"]}
    assert len(tried) == 3 * 3  # every method × backend is timed or skipped with its reason
    assert all(s["reason"] for s in result["skipped"])


def test_bench_gpu_on_cuda_without_cuda_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "embtables.pipelines.cli.main", "bench", "gpu", "--device", "cuda"],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: device 'cuda' asks for CUDA"), r.stderr


def test_ray_workers_take_gpus_only_as_asked_and_never_fall_back_silently():
    from embtables.pipelines.train.distributed import _use_gpu

    assert _use_gpu("auto", 2, 2.0) and not _use_gpu("auto", 2, 1.0)
    assert not _use_gpu("cpu", 2, 8.0)
    assert _use_gpu("cuda", 2, 4.0)
    with pytest.raises(ConfigError, match="2 workers need 2 GPUs, the Ray cluster has 1"):
        _use_gpu("cuda", 2, 1.0)
    with pytest.raises(ConfigError, match="the Ray cluster has 0"):
        _use_gpu("cuda:0", 1, 0.0)
