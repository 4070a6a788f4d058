"""A feature memory: one row per sample of a data set (by global sample index) holding a feature, a label
(true or pseudo; -1 = none) and a confidence, and the prototypes k-means finds in it.
`class_prototypes()` clusters each class's rows (FeatMatch: labeled images and confidently pseudo-labeled
ones), `prototypes()` all rows (no labels: prototypes for feature augmentation in contrastive pretraining).
The caller decides what goes in and when prototypes are recomputed (FeatMatch: every epoch).
"""

from __future__ import annotations

import torch

from models.kmeans import cluster_means, kmeans


class FeatureMemory:
    """Features of a data set by global sample index, with a label (-1: none) and a confidence per row.

    Rows start empty (label -1, never written). `update` overwrites rows (features detached, stored in
    `dtype`); rows not written keep their previous contents, so a memory filled during an epoch holds
    each sample's most recent feature. Lives on `device`; no host synchronisation in `update`.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.features = torch.zeros(size, dim, device=device, dtype=dtype)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.confidence = torch.zeros(size, device=device)
        self.written = torch.zeros(size, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def update(
        self,
        indices: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
    ) -> None:
        """Write rows `indices` [B]; `labels` [B] (-1: none) and `confidence` [B] are kept when given."""
        device = self.features.device
        indices = indices.to(device)
        self.features[indices] = features.detach().to(device, self.features.dtype)
        self.written[indices] = True
        if labels is not None:
            self.labels[indices] = labels.to(device)
        if confidence is not None:
            self.confidence[indices] = confidence.detach().to(device, self.confidence.dtype)

    def class_prototypes(
        self,
        num_classes: int,
        per_class: int,
        *,
        iters: int = 20,
        seed: int = 0,
        metric: str = "cosine",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means per class over the rows labeled with that class: (prototypes [P, D], their class [P]).

        A class gets min(`per_class`, its rows) prototypes (a class with fewer rows: the rows themselves;
        with none: no prototype). Prototypes are the mean features of each cluster (see `cluster_means`),
        so they live where the memory's features live. Class c's k-means is seeded with `seed + c`.
        One host sync per class (its row count).
        """
        keep = self.written & (self.labels >= 0)
        features, labels = self.features[keep], self.labels[keep]
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        protos, owners = [], []
        for c, count in enumerate(counts[:num_classes]):
            if count == 0:
                continue
            rows = features[labels == c]
            if count <= per_class:
                centres = rows.float()
            else:
                _, assignments = kmeans(rows, per_class, iters=iters, seed=seed + c, metric=metric)
                centres = cluster_means(rows, assignments, per_class)
            protos.append(centres)
            owners.append(torch.full((centres.shape[0],), c, dtype=torch.int64, device=centres.device))
        if not protos:
            raise ValueError("the memory holds no labeled rows: no class prototypes")
        return torch.cat(protos), torch.cat(owners)

    def prototypes(self, k: int, *, iters: int = 20, seed: int = 0, metric: str = "cosine") -> torch.Tensor:
        """k-means over every written row, ignoring labels: [k, D] cluster means (unlabeled prototypes)."""
        rows = self.features[self.written]
        _, assignments = kmeans(rows, k, iters=iters, seed=seed, metric=metric)
        return cluster_means(rows, assignments, k)
