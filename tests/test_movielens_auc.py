"""Acceptance: full tables on the shipped ml-latest-small (random 90/10 split) reach AUC >= 0.79."""
from pathlib import Path

from embtables.config import load_config
from embtables.pipelines.data.ingest_movielens import ingest
from embtables.pipelines.train.local import train

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_reaches_published_auc(tmp_path):
    data = ingest(REPO / "data" / "ml-latest-small", tmp_path / "ml")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.train={data}"])
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["valid_rows"] > 10_000
    assert metrics["auc"] >= 0.79, metrics["epochs"]
