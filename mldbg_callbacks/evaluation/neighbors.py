"""Feature-space signals: cosine k-nearest neighbours in a reference set, density, regions.

Exact brute-force search against a reference set capped at ``max_reference`` units by a seeded
random subsample, which bounds the cost at O(N · max_reference · D) for any data size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest, mode
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors

K_NEIGHBORS = 10
MAX_REFERENCE = 10000


def normalize(embedding: np.ndarray) -> np.ndarray:
    embedding = np.asarray(embedding, dtype=np.float32)
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.maximum(norms, 1e-12)


@dataclass
class NeighborIndex:
    """A reference set prepared for cosine kNN: normalised base vectors and their labels/correctness."""

    base: np.ndarray  # (M, D) normalised
    base_ids: np.ndarray  # input_id of each base row
    base_label: np.ndarray
    base_wrong: np.ndarray

    @classmethod
    def build(cls, embedding: np.ndarray, input_id: np.ndarray, label: np.ndarray, wrong: np.ndarray,
              max_reference: int = MAX_REFERENCE, seed: int = 0) -> "NeighborIndex":
        index = np.arange(len(label))
        if len(index) > max_reference:
            index = np.sort(np.random.default_rng(seed).choice(index, max_reference, replace=False))
        return cls(normalize(embedding[index]), input_id[index], label[index], wrong[index])

    def query(self, embedding: np.ndarray, input_id: np.ndarray | None = None,
              k: int = K_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
        """(indices into base, cosine distances), each (N, k') sorted nearest first, k' = min(k, usable).

        With ``input_id``, a base row with the same id as the query is never its own neighbour.
        Uses scikit-learn's brute-force k-nearest search (blocked, multithreaded top-k) on unit vectors,
        where Euclidean order equals cosine order and cosine distance = squared Euclidean / 2.
        """
        exclude = input_id is not None
        k = min(k, len(self.base) - (1 if exclude else 0))
        if k <= 0:
            return np.empty((len(embedding), 0), int), np.empty((len(embedding), 0), np.float32)
        search = NearestNeighbors(n_neighbors=k + exclude, algorithm="brute").fit(self.base)
        distances, indices = search.kneighbors(normalize(embedding))
        distances = distances ** 2 / 2.0
        if exclude:
            own = pd.Index(self.base_ids).get_indexer(input_id)
            is_self = indices == own[:, None]
            # drop the unit itself where it was found, else the farthest of the k + 1
            is_self[~is_self.any(axis=1), -1] = True
            keep = ~is_self
            indices = indices[keep].reshape(len(indices), k)
            distances = distances[keep].reshape(len(distances), k)
        return indices, distances.astype(np.float32)


def neighbor_signals(index: NeighborIndex, neighbors: np.ndarray, distances: np.ndarray, label: np.ndarray,
                     pred: np.ndarray, reference_mean_distance: np.ndarray | None) -> dict[str, np.ndarray]:
    """kNN label agreement (with the label and with the prediction), majority label, neighbour error
    rate, mean distance and its percentile among the reference set's own mean distances (``density``:
    100 = sparser than every reference unit)."""
    n = len(label)
    if neighbors.shape[1] == 0:
        nan = np.full(n, np.nan)
        return {"neighbor_label_agreement": nan, "neighbor_pred_agreement": nan, "neighbor_majority_label": np.full(n, -1),
                "neighbor_error_rate": nan, "mean_neighbor_distance": nan, "density": nan}
    labels = index.base_label[neighbors]
    mean_distance = distances.mean(axis=1).astype(np.float64)
    reference = np.sort(mean_distance if reference_mean_distance is None else reference_mean_distance)
    return {
        "neighbor_label_agreement": (labels == label[:, None]).mean(axis=1),
        "neighbor_pred_agreement": (labels == pred[:, None]).mean(axis=1),
        "neighbor_majority_label": mode(labels, axis=1, keepdims=False).mode.astype(np.int64),
        "neighbor_error_rate": index.base_wrong[neighbors].mean(axis=1),
        "mean_neighbor_distance": mean_distance,
        "density": 100.0 * np.searchsorted(reference, mean_distance, side="right") / len(reference),
    }


def n_regions(n_units: int) -> int:
    """Number of k-means regions: about one per 50 units, between 2 and 64."""
    return int(np.clip(round(n_units / 50), 2, 64))


def fit_regions(embedding: np.ndarray, seed: int = 0, max_fit: int = MAX_REFERENCE) -> KMeans | None:
    """Seeded k-means on normalised reference embeddings (None when there are too few units)."""
    if len(embedding) < 4:
        return None
    data = normalize(embedding)
    if len(data) > max_fit:
        data = data[np.sort(np.random.default_rng(seed).choice(len(data), max_fit, replace=False))]
    k = min(n_regions(len(embedding)), len(data) - 1)
    # float64: scikit-learn's k-means computes float32 distances through a slow upcasting path
    return KMeans(n_clusters=k, random_state=seed, n_init=1, max_iter=100).fit(data.astype(np.float64))


def wilson_lower_bound(errors: int, total: int, confidence: float = 0.95) -> float:
    """Lower end of the Wilson score interval (scipy's binomtest) for an error rate."""
    return float(binomtest(int(errors), int(total)).proportion_ci(confidence, method="wilson").low)


def hotspot_regions(region: np.ndarray, wrong: np.ndarray, min_units: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the error rate of its region, and whether the region is a hotspot (Wilson 95% lower
    bound of its error rate above the overall error rate, at least ``min_units`` units)."""
    overall = wrong.mean() if len(wrong) else 0.0
    regions, inverse, sizes = np.unique(region, return_inverse=True, return_counts=True)
    errors = np.bincount(inverse, weights=wrong.astype(float), minlength=len(regions))
    rate = errors / sizes
    hot = np.array([size >= min_units and wilson_lower_bound(e, size) > overall
                    for e, size in zip(errors, sizes)], dtype=bool)
    return rate[inverse], hot[inverse]
