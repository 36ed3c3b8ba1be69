"""Mixed precision (bf16 dense network, fp32 tables/loss/master weights) and the batch prefetcher."""
import json
import threading
import time

import pytest
import torch
from torch import nn

from embtables.config import load_config
from embtables.errors import ConfigError
from embtables.pipelines.train import precision
from embtables.pipelines.data.ingest_synth import ingest as ingest_synth
from embtables.pipelines.train.precision import autocast_network, resolve_precision
from embtables.pipelines.data.prefetch import Prefetcher
from embtables.pipelines.train.local import train

needs_bf16 = pytest.mark.skipif(not precision.bf16_supported("cpu"), reason="no bf16 kernels on this CPU")
pytestmark = pytest.mark.filterwarnings("ignore:train.precision bf16")


class Tiny(nn.Module):
    """Stands in for CTRModel: a lookup-like fp32 part and a dense `network`."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Linear(4, 4)
        self.network = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.network(self.embeddings(x)).squeeze(1)


def dtypes_seen(model, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.dtype))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


@needs_bf16
def test_bf16_runs_only_the_network_and_only_while_training():
    model = Tiny()
    assert autocast_network(model, "bf16") == "bf16"
    x = torch.randn(16, 4)
    seen, out = dtypes_seen(model.train(), x)
    assert seen["embeddings"] == torch.float32               # the lookup side stays fp32
    assert seen["network.0"] == seen["network.2"] == torch.bfloat16
    assert out.dtype == torch.float32                       # so the loss is computed in fp32
    loss = nn.functional.binary_cross_entropy_with_logits(out, torch.rand(16))
    loss.backward()
    torch.optim.Adam(model.parameters()).step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert not torch.is_autocast_enabled("cpu")             # nothing leaks out of the forward
    seen, out = dtypes_seen(model.eval(), x)
    assert seen["network.0"] == torch.float32               # evaluation in fp32


@needs_bf16
def test_autocast_is_idempotent_and_does_not_leak_on_errors():
    model = Tiny()
    autocast_network(model, "bf16")
    autocast_network(model, "bf16")  # a second training stage on the same model
    assert len(model.network._forward_pre_hooks) == 1
    model.network[0] = nn.Linear(3, 8)  # now the network's forward raises
    with pytest.raises(RuntimeError):
        model.train()(torch.randn(2, 4))
    assert not torch.is_autocast_enabled("cpu")


def test_fp32_and_unsupported_cpus_leave_the_model_alone(monkeypatch):
    model = Tiny()
    assert autocast_network(model, "fp32") == "fp32"
    assert not model.network._forward_pre_hooks
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": False)
    monkeypatch.setattr(precision, "fast_bf16", lambda device_type="cpu": False)
    with pytest.warns(UserWarning, match="no bf16 kernels"):
        assert resolve_precision("bf16") == "fp32"
    with pytest.raises(ValueError, match="fp32"):
        resolve_precision("fp16")


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with bf16 kernels whose flags and matmul probe the test sets; the probe cache is reset."""
    calls = []

    def set_cpu(flags, speedup):
        monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": True)
        monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(precision, "probe_matmuls", lambda: calls.append(1) or
                            {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup, "speedup": speedup})
        precision.bf16_probe.cache_clear()
        return calls

    yield set_cpu
    precision.bf16_probe.cache_clear()


@pytest.mark.parametrize("flags, speedup, chosen", [
    ({"avx512f", "avx512_bf16"}, 3.6, "bf16"),   # AVX512_BF16 without AMX, measured faster (AMD EPYC)
    ({"avx512f", "avx512_bf16"}, 0.6, "fp32"),   # the same flag, measured slower
    ({"amx_bf16", "avx512_bf16"}, 1.1, "fp32"),  # within the noise margin: not measurably faster
    ({"amx_bf16"}, 8.0, "bf16"),
])
def test_auto_picks_bf16_where_the_probe_measures_it_faster(cpu, flags, speedup, chosen):
    calls = cpu(flags, speedup)
    assert resolve_precision("auto") == chosen
    assert resolve_precision("auto") == chosen and len(calls) == 1  # probed once, then cached
    record = precision.precision_record("auto")
    assert record["chosen"] == chosen and record["bf16_check"]["probe"]["speedup"] == speedup
    if chosen == "fp32":  # asked for explicitly: honoured, with a warning that it is likely slower
        with pytest.warns(UserWarning, match="not faster than fp32"):
            assert resolve_precision("bf16") == "bf16"


def test_auto_does_not_probe_without_bf16_instructions(cpu):
    calls = cpu({"avx2", "avx512f"}, 5.0)  # emulated bf16: not worth timing
    assert resolve_precision("auto") == "fp32" and not calls
    assert precision.precision_record("auto")["bf16_check"]["reason"] == "no AVX512_BF16 or AMX"
    assert precision.precision_record("fp32") == {"requested": "fp32", "chosen": "fp32", "bf16_check": None}


def test_the_probe_times_both_precisions_and_restores_threads():
    threads = torch.get_num_threads()
    probe = precision.probe_matmuls(shapes=((64, 32, 16),), repeats=2)
    assert probe["fp32_gflops"] > 0 and probe["bf16_gflops"] > 0
    assert probe["speedup"] == pytest.approx(probe["bf16_gflops"] / probe["fp32_gflops"], rel=0.1)
    assert torch.get_num_threads() == threads


@needs_bf16
def test_metrics_json_records_the_precision_choice_and_probe(tmp_path, cpu):
    cpu({"avx512_bf16"}, 3.5)
    data = ingest_synth(tmp_path / "synth", preset="tiny", rows=1500, seed=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [8], top_mlp: [8]}}\n"
                    "embedding: {dim: 4, backend: torch}\ntrain: {batch_size: 256, epochs: 1, threads: 1}\n")
    train(load_config(path, ["train.precision=auto"]), tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["precision"]
    assert record["requested"] == "auto" and record["chosen"] == "bf16"
    assert record["bf16_check"]["cpu_flags"] == ["avx512_bf16"]
    assert record["bf16_check"]["probe"] == {"fp32_gflops": 100.0, "bf16_gflops": 350.0, "speedup": 3.5}


def test_config_validates_precision_and_prefetch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x}\n")
    assert load_config(path)["train"]["precision"] == "fp32"
    assert load_config(path, ["train.precision=auto"])["train"]["precision"] == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(path, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.prefetch"):
        load_config(path, ["train.prefetch=-1"])


def test_prefetcher_keeps_order_and_overlaps():
    def slow():
        for i in range(6):
            time.sleep(0.02)
            yield i

    items = Prefetcher(slow(), depth=3, transform=lambda x: x * 10)
    assert list(items) == [0, 10, 20, 30, 40, 50]
    assert list(items) == []  # exhausted stays exhausted


def test_prefetcher_reraises_producer_errors_and_stops_when_left_early():
    def failing():
        yield 1
        raise ValueError("bad row 7")

    it = Prefetcher(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(it)
    endless = Prefetcher(iter(int, 1), depth=2)  # never ends on its own
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "embtables-prefetch" and t.is_alive()]


@needs_bf16
def test_bf16_training_reaches_the_fp32_auc(tmp_path):
    data = ingest_synth(tmp_path / "synth", preset="tiny", rows=6000, seed=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{train: {data}}}\nmodel: {{name: dlrm, bottom_mlp: [16], top_mlp: [32]}}\n"
                    "embedding: {dim: 8, backend: torch}\ntrain: {batch_size: 256, epochs: 2, threads: 1}\n")
    runs = {p: train(load_config(path, [f"train.precision={p}"]), tmp_path / p, progress=False)
            for p in ("fp32", "bf16")}
    assert runs["fp32"]["auc"] > 0.6
    assert abs(runs["bf16"]["auc"] - runs["fp32"]["auc"]) < 0.01
    assert runs["bf16"]["auc"] != runs["fp32"]["auc"]  # bf16 really ran


def test_dense_bound_flop_count_matches_torchs_counter():
    """The MLP FLOPs of one forward + backward, by formula, equal what torch counts in mm/addmm."""
    from torch.utils.flop_counter import FlopCounterMode

    from embtables.models.dlrm import DLRM
    from embtables.pipelines.bench.dense_bound import dense_bound, mlp_flops_per_sample

    shape = (13, 26, 16, [64, 32], [48, 24])
    model, batch = DLRM(*shape), 8
    embedded = torch.randn(batch, 26, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(batch, 13), embedded).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.mm"] + counts["aten.addmm"] == mlp_flops_per_sample(*shape) * batch
    bound = dense_bound(*shape, batch=64, steps=2)
    assert bound["samples_per_sec"] > 0 and bound["gflop_per_step"] > mlp_flops_per_sample(*shape) * 64 / 1e9
