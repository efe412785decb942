"""The ERNIE-Image report's two-level data sampler: pick a category, then an image within it.

Level 1, categories: w_c ∝ n_c^alpha · exp(beta · z̄_c), where n_c counts the category's usable images
(duplicates and excluded rows do not count) and z̄_c is the mean of their standardised aesthetic scores
(z = (a - mean) / std over the whole corpus). alpha < 1 flattens the size distribution, so the long tail
gets more than its share of samples (alpha = 1, beta = 0 is uniform over images; alpha = 0 uniform over
categories); beta > 0 favours categories whose images score well. The exp form is the report's
"n_c^alpha · mean_aes_c^beta" made scale-free: it works for raw (possibly negative) and calibrated scores alike.

Level 2, within a category: p_i ∝ exp(z_i / temperature); a large temperature is uniform, a small one
picks the best-scored images. Without scores both levels ignore aesthetics.

Every draw is a function of (seed, k) alone, like `ernielab.image.train.batch_indices`, so a trainer that
asks for batch k after a resume gets the same indices:

    sampler = TwoLevelSampler(categories, scores, alpha=0.5, exclude=is_duplicate)
    idx = sampler.batch_indices(batch_size, seed, k)        # list[int]
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TwoLevelSampler:
    def __init__(self, categories: Sequence, scores: Sequence[float] | None = None, *, alpha: float = 0.5,
                 beta: float = 1.0, temperature: float = 1.0, exclude: Sequence[bool] | None = None) -> None:
        n = len(categories)
        if n == 0:
            raise ValueError("two-level sampler: no items")
        for name, value in (("alpha", alpha), ("beta", beta), ("temperature", temperature)):
            if not np.isfinite(value):
                raise ValueError(f"two-level sampler: {name} must be a finite number, got {value}")
        if alpha < 0:
            raise ValueError(f"two-level sampler: alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise ValueError(f"two-level sampler: temperature must be > 0, got {temperature}")
        usable = np.ones(n, bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
        if usable.shape != (n,):
            raise ValueError(f"two-level sampler: exclude has {usable.size} entries for {n} items")
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != (n,):
                raise ValueError(f"two-level sampler: {scores.size} scores for {n} items")
            if not np.isfinite(scores[usable]).all():
                raise ValueError("two-level sampler: scores must be finite numbers (is every row scored?)")
        if not usable.any():
            raise ValueError("two-level sampler: every item is excluded")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        z = np.zeros(n)
        if scores is not None:
            s = scores[usable]
            z[usable] = (s - s.mean()) / (s.std() if s.std() > 0 else 1.0)
        labels = np.array([str(c) for c in categories], dtype=object)
        self.categories: list[str] = sorted(set(labels[usable]))
        self.members: list[np.ndarray] = []
        self.within: list[np.ndarray] = []
        log_w = []
        for c in self.categories:
            idx = np.flatnonzero((labels == c) & usable)
            self.members.append(idx)
            zc = z[idx]
            p = np.exp((zc - zc.max()) / self.temperature)
            self.within.append(p / p.sum())
            log_w.append(self.alpha * np.log(len(idx)) + (self.beta * zc.mean() if scores is not None else 0.0))
        log_w = np.asarray(log_w)
        w = np.exp(log_w - log_w.max())
        self.weights = w / w.sum()
        self.size = n

    def category_weights(self) -> dict[str, float]:
        return {c: float(w) for c, w in zip(self.categories, self.weights)}

    def item_probabilities(self) -> np.ndarray:
        """The probability of each item per draw (0 for excluded items); sums to 1."""
        p = np.zeros(self.size)
        for w, idx, q in zip(self.weights, self.members, self.within):
            p[idx] += w * q
        return p

    def draw(self, rng: np.random.Generator, k: int) -> np.ndarray:
        if k < 0:
            raise ValueError(f"two-level sampler: cannot draw {k} items")
        cats = rng.choice(len(self.categories), size=k, p=self.weights)
        out = np.empty(k, dtype=np.int64)
        for c in np.unique(cats):  # sorted, so the draw order is fixed
            where = np.flatnonzero(cats == c)
            out[where] = rng.choice(self.members[c], size=len(where), p=self.within[c])
        return out

    def sample(self, k: int, seed: int = 0) -> np.ndarray:
        """k item indices (with replacement), a function of (seed, k)."""
        return self.draw(np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A3])), k)

    def batch_indices(self, batch_size: int, seed: int, k: int, rank: int = 0) -> list[int]:
        """Batch k of process `rank`: a function of (seed, k, rank) alone, so resuming is exact."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(k), int(rank), 0xBA7]))
        return self.draw(rng, batch_size).tolist()

    def __call__(self, seed: int, k: int, batch_size: int = 1) -> list[int]:
        return self.batch_indices(batch_size, seed, k)
