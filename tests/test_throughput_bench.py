"""`embtables bench throughput` end to end at a tiny size: every section is reported and the
ratios are the ratios of the reported figures."""
import json
import subprocess
import sys

import pytest

from embtables.pipelines.train.precision import bf16_supported


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput")
    out = tmp / "report.json"
    cmd = [sys.executable, "-m", "embtables.pipelines.cli.main", "bench", "throughput", "--rows", "20000",
           "--batch", "512", "--torchrec-steps", "3", "--torchrec-warmup", "1", "--paired-rounds", "1",
           "--paired-block", "2", "--data-path-rounds", "1", "--cache", str(tmp / "data"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_is_reported(report):
    headline = report["precision"]
    assert report["samples_per_sec"] == report[f"ours_{headline}"]["samples_per_sec"] > 0
    assert 0.5 < report[f"ours_{headline}"]["auc"] < 1.0
    assert report["torchrec_dlrm"]["precision"] == "fp32"
    assert report["speedup_vs_torchrec_dlrm"] == pytest.approx(
        report["samples_per_sec"] / report["torchrec_dlrm"]["samples_per_sec"])
    ratios = report["data_path"]["whole_epoch_vs_step_only"]
    assert len(ratios) == 1 and ratios[0] == pytest.approx(
        report["data_path"]["pipeline_samples_per_sec"][0] / report["data_path"]["in_memory_samples_per_sec"][0])
    waiting = report["data_path"]["waiting_share"]  # the pipeline epoch's own time in next(batches)
    assert len(waiting) == 1 and 0 < waiting[0] < 1
    assert report["paired"]["steps_each"] == 2


@pytest.mark.skipif(not bf16_supported("cpu"), reason="no bf16 autocast on this CPU")
def test_torchrec_is_also_measured_under_bf16_autocast(report):
    trec = report["torchrec_dlrm_bf16"]
    assert trec["precision"] == "bf16" and trec["samples_per_sec"] > 0
    assert report["speedup_vs_torchrec_dlrm_bf16"] == pytest.approx(report["samples_per_sec"] / trec["samples_per_sec"])
