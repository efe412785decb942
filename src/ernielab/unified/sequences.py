"""Build and collate the token sequences of the three tasks (see model.py for the layout).

- text:               [BOS w1 .. wn EOS]                      next-token (+ MTP) loss on the words
- caption -> image:   [BOS w1 .. wn EOS] [start row] [row 0] .. [row g-2]   loss on the image rows
- image -> caption:   [start row] [row 0] .. [row g-1] [BOS w1 .. wn EOS]   loss on the caption

Multi-scale codes [n_scales, g, g] (from a multi-scale VQ) are laid out by scales instead of rows: the start
block, then block k holding scale k-1 upsampled to scale k's side (model.py), and each block predicts its scale.
"""
from __future__ import annotations

import torch

from ernielab.unified.model import IGNORE, IMAGE, IMAGE_START, TEXT, scale_block_sides
from ernielab.unified.vq import scales_of

FIELDS = ("tokens", "modality", "cell", "group", "text_target", "image_target")
PAD_GROUP = 1 << 30  # padding on the right sees everything (its outputs are ignored)


def parent_cells(side: int, coarser: int) -> torch.Tensor:
    """[side * side] index into a flattened coarser x coarser map: each cell's parent (nearest upsampling)."""
    rows = torch.arange(side) * coarser // side
    return (rows[:, None] * coarser + rows[None, :]).flatten()


def scale_block_offsets(scales: tuple[int, ...]) -> list[int]:
    """First image-cell id of each block of the "scales" layout."""
    offsets = [0]
    for side in scale_block_sides(scales)[:-1]:
        offsets.append(offsets[-1] + side * side)
    return offsets


class SequenceBuilder:
    def __init__(self, grid: int, scales: tuple[int, ...] = ()):
        """scales: the token-map sides of multi-scale codes (the "scales" layout); () = rows."""
        self.grid, self.scales = grid, tuple(scales)
        self.rows: dict[str, list[int]] = {f: [] for f in FIELDS}
        self.next_group = 0

    def _append(self, token: int, modality: int, cell: int, group: int, text_target: int = IGNORE,
                image_target: int = IGNORE) -> None:
        for name, value in zip(FIELDS, (token, modality, cell, group, text_target, image_target)):
            self.rows[name].append(int(value))

    def add_text(self, ids: list[int], train: bool) -> "SequenceBuilder":
        """Causal text; with train, position i is trained to predict ids[i+1]."""
        for i, token in enumerate(ids):
            target = ids[i + 1] if train and i + 1 < len(ids) else IGNORE
            self._append(token, TEXT, -1, self.next_group, text_target=target)
            self.next_group += 1
        return self

    def add_image(self, codes: torch.Tensor | None, rows_in: int, train: bool) -> "SequenceBuilder":
        """Start block + the first `rows_in` rows of codes [g, g]; with train, block r predicts row r.
        In the "scales" layout rows_in counts scale blocks and codes are [n_scales, g, g]."""
        if self.scales:
            return self._add_scales(codes, rows_in, train)
        g = self.grid
        if codes is not None and tuple(codes.shape) != (g, g):
            raise ValueError(f"image codes must be [{g}, {g}], got {tuple(codes.shape)}")
        if rows_in and codes is None:
            raise ValueError("image rows requested without codes")
        codes_list = codes.tolist() if codes is not None else None
        for block in range(rows_in + 1):
            target_row = codes_list[block] if train and codes_list is not None and block < g else None
            for c in range(g):
                if block == 0:
                    token, modality, cell = c, IMAGE_START, c
                else:
                    token, modality, cell = codes_list[block - 1][c], IMAGE, g + (block - 1) * g + c
                self._append(token, modality, cell, self.next_group,
                             image_target=target_row[c] if target_row is not None else IGNORE)
            self.next_group += 1
        return self


    def _add_scales(self, codes: torch.Tensor | None, blocks_in: int, train: bool) -> "SequenceBuilder":
        """Start block + blocks 1..blocks_in (scale k-1 at the side of scale k); with train, block k predicts
        scale k."""
        scales, g = self.scales, self.grid
        if codes is not None and (tuple(codes.shape) != (len(scales), g, g) or scales_of(codes) != scales):
            raise ValueError(f"multi-scale codes must be [{len(scales)}, {g}, {g}] holding scales {list(scales)}, "
                             f"got {tuple(codes.shape)}")
        if blocks_in and codes is None:
            raise ValueError("image scales requested without codes")
        maps = [codes[k, :n, :n].flatten() for k, n in enumerate(scales)] if codes is not None else []
        for block, (side, offset) in enumerate(zip(scale_block_sides(scales)[: blocks_in + 1],
                                                   scale_block_offsets(scales))):
            targets = maps[block].tolist() if train and maps and block < len(scales) else None
            if block == 0:
                tokens, modality = list(range(side * side)), IMAGE_START
            else:
                tokens, modality = maps[block - 1][parent_cells(side, scales[block - 1])].tolist(), IMAGE
            for c, token in enumerate(tokens):
                self._append(token, modality, offset + c, self.next_group,
                             image_target=targets[c] if targets is not None else IGNORE)
            self.next_group += 1
        return self


def text_sequence(ids: list[int], grid: int) -> SequenceBuilder:
    return SequenceBuilder(grid).add_text(ids, train=True)


def image_layout(codes: torch.Tensor) -> tuple[SequenceBuilder, int]:
    """An empty builder for these codes' layout (rows for [g, g], scales for [n_scales, g, g]) and the number
    of code blocks that make the whole image."""
    if codes.ndim == 3:
        scales = scales_of(codes)
        return SequenceBuilder(codes.shape[-1], scales), len(scales)
    return SequenceBuilder(codes.shape[-1]), codes.shape[-1]


def text_to_image_sequence(ids: list[int], codes: torch.Tensor) -> SequenceBuilder:
    builder, blocks = image_layout(codes)
    return builder.add_text(ids, train=False).add_image(codes, rows_in=blocks - 1, train=True)


def image_to_text_sequence(codes: torch.Tensor, ids: list[int]) -> SequenceBuilder:
    builder, blocks = image_layout(codes)
    return builder.add_image(codes, rows_in=blocks, train=False).add_text(ids, train=True)


def collate(seqs: list[SequenceBuilder], pad_left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: on the right for training, on the left for batched decoding (so every
    sequence ends at the same column and new blocks append uniformly)."""
    if not seqs:
        raise ValueError("cannot collate an empty list of sequences")
    length = max(len(s.rows["tokens"]) for s in seqs)
    pad_values = {"tokens": 0, "modality": TEXT, "cell": -1, "group": -1 if pad_left else PAD_GROUP,
                  "text_target": IGNORE, "image_target": IGNORE}
    out = {f: torch.full((len(seqs), length), pad_values[f], dtype=torch.long) for f in FIELDS}
    out["valid"] = torch.zeros(len(seqs), length, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.rows["tokens"])
        cols = slice(length - n, length) if pad_left else slice(0, n)
        for f in FIELDS:
            out[f][b, cols] = torch.tensor(s.rows[f], dtype=torch.long)
        out["valid"][b, cols] = True
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("tokens", "modality", "cell", "group", "valid")}
