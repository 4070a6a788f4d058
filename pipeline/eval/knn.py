"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, "instance discrimination").

Each validation feature takes its k most cosine-similar training features; neighbour i votes for its class
with weight exp(sim_i / temperature); the class with the largest summed weight is the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.eval.metrics import top1_accuracy

# Elements of one chunk's [chunk, N_train] similarity matrix when no chunk size is given (256 MiB in fp32).
SIMILARITY_BUDGET = 2**26


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Predicted class [N_val] for each k, from one top-max(k) search per chunk of validation rows.

    Features need not be normalised (cosine similarity is used). Runs on the features' device, in their
    dtype for the similarities. A k larger than the training set is an error rather than silently
    clamped, so that a reported "k=200" always means 200 neighbours. Equal class scores go to the lowest
    class index.
    """
    ks = sorted(set(ks))
    n_train = train_features.shape[0]
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be positive integers, got {ks}")
    if ks[-1] > n_train:
        raise ValueError(f"k={ks[-1]} exceeds the {n_train} training samples")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    train_labels = train_labels.to(train_features.device)
    if train_labels.min() < 0:
        raise ValueError("training labels must be class indices >= 0 (the set has unlabeled samples, label -1)")
    num_classes = num_classes or int(train_labels.max()) + 1
    chunk_size = chunk_size or max(1, SIMILARITY_BUDGET // n_train)

    train = F.normalize(train_features, dim=1)
    weight_dtype = torch.promote_types(train.dtype, torch.float32)
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, val_features.shape[0], chunk_size):
        query = F.normalize(val_features[start : start + chunk_size].to(train), dim=1)
        sims, neighbours = (query @ train.T).topk(ks[-1], dim=1)  # sorted, most similar first
        # Dividing every weight of a row by exp(max_sim / t) keeps the vote and avoids overflow at small t.
        weights = ((sims.to(weight_dtype) - sims[:, :1].to(weight_dtype)) / temperature).exp()
        votes = train_labels[neighbours]
        for k in ks:
            scores = torch.zeros(query.shape[0], num_classes, dtype=weight_dtype, device=query.device)
            scores.scatter_add_(1, votes[:, :k], weights[:, :k])
            predictions[k].append(scores.argmax(1))
    if not predictions[ks[0]]:
        raise ValueError("no validation features")
    return {k: torch.cat(p) for k, p in predictions.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Top-1 accuracy for each k; see `knn_predict`."""
    predictions = knn_predict(train_features, train_labels, val_features, ks, temperature, num_classes, chunk_size)
    val_labels = val_labels.to(train_features.device)
    return {k: top1_accuracy(p, val_labels) for k, p in predictions.items()}
