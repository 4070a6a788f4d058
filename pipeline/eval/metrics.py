"""Accuracy of predicted class indices: overall, per class and balanced (mean of per-class recalls)."""

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
