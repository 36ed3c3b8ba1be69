"""Exact validation metrics for a model over a whole split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embtables.metrics import log_loss, roc_auc
from embtables.pipelines.data.prefetch import prefetch_plan, prefetched


@torch.no_grad()
def predict_split(model, dataset: Path, split: str, dense_index: list[int], batch_size: int,
                  shard=(0, 1), prefetch: int | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) for every row of the split, in file order; the batches come
    through the training's prefetching pipeline (`prefetch` as `train.prefetch`)."""
    from embtables.pipelines.data.batches import iterate_batches
    from embtables.pipelines.train.placement import host_ready, to_device

    keys, pin = model.embeddings.input_keys, model.device.type == "cuda"
    depth, workers = prefetch_plan(prefetch)
    batches = prefetched(iterate_batches(dataset, split, batch_size, shuffle=False, shard=shard, workers=workers),
                         depth, transform=lambda b: host_ready(b, keys, pin))
    was_training = model.training
    model.eval()
    labels, probs = [], []
    try:
        for batch in batches:
            batch = to_device(batch, keys, model.device)
            logits = model(batch.dense[:, dense_index], batch.sparse)
            labels.append(batch.label.cpu().numpy())
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
    finally:
        batches.close()  # an error in the step stops the prefetch thread too
        model.train(was_training)
    if not labels:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model, dataset: Path, split: str, dense_index: list[int], batch_size: int,
             prefetch: int | str = "auto") -> dict:
    labels, probs = predict_split(model, dataset, split, dense_index, batch_size, prefetch=prefetch)
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs), "rows": int(labels.size)}
