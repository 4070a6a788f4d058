"""A feature memory: one row per sample of a data set (by global sample index) holding a feature, a label
(true or pseudo; -1 = none) and a confidence, and the prototypes k-means finds in it.
`class_prototypes()` clusters each class's rows (FeatMatch: labeled images and confidently pseudo-labeled
ones), `released_class_prototypes()` as GT-RIPL/FeatMatch's `extract_fp` does (a class mean plus k-means
centres, labeled and unlabeled rows apart), `prototypes()` all rows (no labels: prototypes for feature
augmentation in contrastive pretraining).
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

    def released_class_prototypes(
        self,
        num_classes: int,
        per_class: int,
        is_labeled: torch.Tensor,
        *,
        labeled_ratio: float = 0.5,
        threshold: float = 0.5,
        halvings: int = 5,
        iters: int = 20,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The released `extract_fp`: (prototypes [P, D], their class [P]) for each class with labeled rows.

        `is_labeled` [size] marks rows whose label is true; the others' labels are pseudo-labels with their
        confidence. Unlabeled rows count when their confidence exceeds `threshold`, halved (up to `halvings`
        tries) until each of the `num_classes` classes has more than `per_class` of them. If it never does,
        each class gets `mean_and_centres` of its labeled rows with `per_class` prototypes; else pk_l = max(1,
        round(per_class·labeled_ratio)) from its labeled rows and max(1, per_class − (those made)) from its
        unlabeled ones (per_class = 1: the mean of both). Class c's k-means is seeded with `seed + c`
        (labeled rows) and `seed + c + 10⁶` (unlabeled rows).
        """
        known = self.written & is_labeled.to(self.features.device) & (self.labels >= 0)
        guessed = self.written & ~is_labeled.to(self.features.device) & (self.labels >= 0)
        classes = torch.unique(self.labels[known]).tolist()
        unlabeled = None
        for _ in range(halvings):
            confident = guessed & (self.confidence > threshold)
            counts = torch.bincount(self.labels[confident], minlength=num_classes)
            if bool((counts[:num_classes] > per_class).all()):
                unlabeled = confident
                break
            threshold /= 2
        protos, owners = [], []
        for c in classes:
            rows = self.features[known & (self.labels == c)]
            rest = self.features[unlabeled & (self.labels == c)] if unlabeled is not None else None
            if rest is None:
                parts = [mean_and_centres(rows, per_class, iters=iters, seed=seed + c)]
            elif per_class == 1:
                parts = [mean_and_centres(torch.cat([rows, rest]), 1)]
            else:
                first = mean_and_centres(rows, max(1, round(per_class * labeled_ratio)), iters=iters, seed=seed + c)
                parts = [first, mean_and_centres(rest, max(1, per_class - len(first)), iters=iters, seed=seed + c + 10**6)]
            for part in parts:
                protos.append(part)
                owners.append(torch.full((part.shape[0],), c, dtype=torch.int64, device=part.device))
        if not protos:
            raise ValueError("the memory holds no labeled rows: no class prototypes")
        return torch.cat(protos), torch.cat(owners)

    def prototypes(self, k: int, *, iters: int = 20, seed: int = 0, metric: str = "cosine") -> torch.Tensor:
        """k-means over every written row, ignoring labels: [k, D] cluster means (unlabeled prototypes)."""
        rows = self.features[self.written]
        _, assignments = kmeans(rows, k, iters=iters, seed=seed, metric=metric)
        return cluster_means(rows, assignments, k)


def mean_and_centres(rows: torch.Tensor, n: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """The released `extract_fp_per_class` (record_mean): n = 1 gives the rows' mean; else the mean and n − 1
    cosine k-means cluster means, or the mean and every row when there are no more than n − 1 rows."""
    rows = rows.float()
    mean = rows.mean(0, keepdim=True)
    if n == 1:
        return mean
    if n - 1 >= rows.shape[0]:
        return torch.cat([mean, rows])
    _, assignments = kmeans(rows, n - 1, iters=iters, seed=seed, metric="cosine")
    return torch.cat([mean, cluster_means(rows, assignments, n - 1)])
