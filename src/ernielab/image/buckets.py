"""Aspect-ratio buckets: train on images of many shapes without squashing them all into squares.

A small set of (height, width) buckets is made around one pixel count (the square `image_size` squared), each
side a multiple of what the latent space and transformer accept. Every image goes to the bucket whose aspect
ratio is nearest its own (compared in log space), is resized to cover it and centre-cropped into it, and every
batch is drawn from one bucket, so a batch stacks. Which bucket and which images: a function of
(seed, batch number, rank) alone, so resuming stays exact.
"""
from __future__ import annotations

import math

import torch

from ernielab.core.seeding import generator

# width / height of the buckets offered (those within `max_ratio` are kept).
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 1 / 2, 3.0, 1 / 3)


def make_buckets(pixels: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about `pixels` pixels, sides multiples of `multiple`, aspect <= `max_ratio`."""
    if pixels < 1 or multiple < 1:
        raise ValueError(f"buckets need pixels >= 1 and multiple >= 1, got {pixels}, {multiple}")
    buckets = set()
    for aspect in ASPECTS:
        if max(aspect, 1 / aspect) > max_ratio + 1e-9:
            continue
        height = math.sqrt(pixels / aspect)
        h = max(multiple, round(height / multiple) * multiple)
        w = max(multiple, round(height * aspect / multiple) * multiple)
        buckets.add((h, w))
    return sorted(buckets)


def assign_buckets(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    """For each image (height, width) the index of the bucket nearest its aspect ratio (ties: the first)."""
    logs = [math.log(w / h) for h, w in buckets]
    return [min(range(len(buckets)), key=lambda b: (abs(logs[b] - math.log(w / h)), b)) for h, w in sizes]


class BucketSampler:
    """Batches drawn from one bucket at a time: the bucket with probability proportional to its images, then
    `batch_size` of its images (with replacement, as `batch_indices`), all seeded by (seed, k, rank)."""

    def __init__(self, assignment: list[int], buckets: list[tuple[int, int]]):
        self.buckets = buckets
        self.members = [[i for i, b in enumerate(assignment) if b == j] for j in range(len(buckets))]
        self.counts = torch.tensor([len(m) for m in self.members], dtype=torch.float64)
        if not self.counts.sum():
            raise ValueError("no images to put into buckets")
        self.assignment = assignment

    def draw(self, batch_size: int, seed: int, k: int, rank: int = 0) -> tuple[tuple[int, int], list[int]]:
        """-> ((height, width), dataset indices) of batch k of process `rank`."""
        g = generator("bucket", seed, k, rank)
        bucket = int(torch.multinomial(self.counts, 1, generator=g).item())
        members = self.members[bucket]
        picks = torch.randint(len(members), (batch_size,), generator=g).tolist()
        return self.buckets[bucket], [members[p] for p in picks]

    def summary(self) -> dict[str, int]:
        return {f"{h}x{w}": len(m) for (h, w), m in zip(self.buckets, self.members) if m}
