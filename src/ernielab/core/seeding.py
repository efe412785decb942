"""Deterministic seeds derived from (seed, step, rank, ...) — unlike hash(), stable across processes."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, np.uint32).astype(np.uint64) @ [1, 2**32]) % 2**63


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
