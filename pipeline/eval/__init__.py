"""Evaluation of frozen backbones: feature extraction, weighted kNN and the feature probe (a linear classifier
on precomputed features; the standard linear evaluation is pipeline/linear.py)."""

from pipeline.eval.features import extract_features
from pipeline.eval.knn import knn_accuracy, knn_predict
from pipeline.eval.linear import LinearProbe, train_linear_probe
from pipeline.eval.metrics import accuracy_report, balanced_accuracy, per_class_accuracy, shot_groups, top1_accuracy

__all__ = [
    "LinearProbe",
    "accuracy_report",
    "balanced_accuracy",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "per_class_accuracy",
    "shot_groups",
    "top1_accuracy",
    "train_linear_probe",
]
