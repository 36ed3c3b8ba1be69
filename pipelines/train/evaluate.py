"""Exact validation metrics for a model over a whole split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embtables.metrics import log_loss, roc_auc


@torch.no_grad()
def predict_split(model, dataset: Path, split: str, dense_index: list[int], batch_size: int,
                  shard=(0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) for every row of the split, in file order."""
    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.train.placement import to_device

    was_training = model.training
    model.eval()
    labels, probs = [], []
    for batch in iterate_batches(dataset, split, batch_size, shuffle=False, shard=shard):
        batch = to_device(batch, model.embeddings.input_keys, model.device)
        logits = model(batch.dense[:, dense_index], batch.sparse)
        labels.append(batch.label.cpu().numpy())
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
    model.train(was_training)
    if not labels:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model, dataset: Path, split: str, dense_index: list[int], batch_size: int) -> dict:
    labels, probs = predict_split(model, dataset, split, dense_index, batch_size)
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs), "rows": int(labels.size)}
