"""Accuracy of predicted class indices: overall, per class, balanced (mean of per-class recalls) and by
many/medium/few-shot group of classes for long-tailed training sets."""

from __future__ import annotations

import torch


def top1_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    if predictions.numel() == 0:
        raise ValueError("no predictions to score")
    return (predictions == labels).double().mean().item()


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Recall of each class, float64 [num_classes]; NaN for classes absent from `labels`."""
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    return correct / total  # 0 / 0 gives NaN for absent classes


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in `labels`."""
    return per_class_accuracy(predictions, labels, num_classes).nanmean().item()


def shot_groups(train_labels: torch.Tensor, num_classes: int, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Classes by how many training images they have (Liu et al. 2019, OLTR): "many" more than `many`,
    "few" fewer than `few`, "medium" the rest (from `few` to `many` inclusive). A class absent from
    `train_labels` has 0 images and is few-shot."""
    if not 0 <= few <= many:
        raise ValueError(f"need 0 <= few <= many, got few={few}, many={many}")
    train_labels = train_labels.cpu()
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"training labels must be class indices in [0, {num_classes})")
    counts = torch.bincount(train_labels, minlength=num_classes).tolist()
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


def accuracy_report(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    many: int = 100,
    few: int = 20,
) -> dict:
    """Top-1, balanced accuracy, per-class accuracy and many/medium/few-shot group accuracies, as JSON values.

    `train_labels` are the labels the classifier learned from (the kNN memory, the probe's training set):
    they decide each class's group (see `shot_groups`). A group's accuracy is the mean recall of its
    classes present in `labels`, as in OLTR and the decoupling paper (equal to the group's share of
    correct predictions when the evaluation set is balanced). Values that cannot be computed are None:
    `per_class` for a class absent from `labels`, a group with no class present in `labels`.
    """
    predictions, labels = predictions.cpu(), labels.cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    recall = per_class_accuracy(predictions, labels, num_classes)
    groups = shot_groups(train_labels, num_classes, many, few)

    def mean(classes) -> float | None:
        present = recall[torch.tensor(classes, dtype=torch.long)]
        present = present[~present.isnan()]
        return present.mean().item() if present.numel() else None

    return {
        "top1": top1_accuracy(predictions, labels),
        "balanced": mean(list(range(num_classes))),
        "per_class": [None if r != r else r for r in recall.tolist()],  # NaN is not JSON
        **{name: mean(classes) for name, classes in groups.items()},
        **{f"{name}_classes": len(classes) for name, classes in groups.items()},
    }
