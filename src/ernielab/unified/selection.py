"""Choose the layers and experts a sub-model keeps by held-out loss, without retraining.

The default extraction keeps evenly spaced layers and, per layer, the experts with the largest training
gate mass. This module instead scores candidates by the model's loss on a *selection set*: val-split
shapes-world items from index `SELECTION_OFFSET` on. Evaluation (`evaluation.heldout`) reads val items
0..n-1, so the selection set never overlaps what the sub-model is measured on, and the test split is
never touched.

- Layers: greedy. Starting from all layers, repeatedly drop the layer whose removal raises the loss least
  (with all experts and the target top-k), until `depth` remain. For one dropped layer this is
  exhaustive.
- Experts: greedy per kept layer, in order. Starting from all experts, repeatedly mask the expert whose
  removal raises the loss least (layers already pruned keep their choice, later layers keep all
  experts), until `num_experts` remain.

Every score is one forward pass over the selection set, so the cost is about
sum(E..num_experts+1) x depth + sum over dropped layers of the layers left, i.e. ~300 forward passes
for 16 -> 8 experts in 3 layers.
"""
from __future__ import annotations

import torch

from ernielab.unified.config import TASKS
from ernielab.unified.model import SubModel, UnifiedTransformer, unified_loss
from ernielab.unified.sequences import collate, image_to_text_sequence, text_sequence, text_to_image_sequence
from ernielab.unified.tokenizer import TextTokenizer
from ernielab.unified.vq import VQTokenizer
from ernielab.worlds.shapes import caption, image_to_tensor, render, sample_item_scene

SELECTION_OFFSET = 100_000  # val items from here on: far past anything evaluation reads


def selection_set(vq: VQTokenizer, tok: TextTokenizer, n: int, seed: int = 0,
                  offset: int = SELECTION_OFFSET) -> dict[str, dict]:
    """The three task batches (caption->image, image->caption, text) of n val items from `offset` on."""
    images, texts = [], []
    for i in range(offset, offset + n):
        scene, rng = sample_item_scene(seed, "val", i, vq.config.image_size)
        images.append(image_to_tensor(render(scene)))
        texts.append(tok.encode(caption(scene, rng)))
    with torch.no_grad():
        codes = vq.eval().encode(torch.stack(images))
    return {"t2i": collate([text_to_image_sequence(t, c) for t, c in zip(texts, codes)]),
            "i2t": collate([image_to_text_sequence(c, t) for t, c in zip(texts, codes)]),
            "text": collate([text_sequence(t, codes.shape[-1]) for t in texts])}


@torch.no_grad()
def heldout_loss(model: UnifiedTransformer, batches: dict[str, dict], sub: SubModel,
                 tasks: tuple[str, ...] = TASKS) -> float:
    """Sum over tasks of the next-token (text) and next-row (image) cross-entropy; no MTP heads."""
    model.eval()
    return sum(unified_loss(model, batches[t], sub, mtp_weight=0.0)[0].item() for t in tasks)


def select_layers(model: UnifiedTransformer, batches: dict[str, dict], depth: int, top_k: int | None = None,
                  tasks: tuple[str, ...] = TASKS) -> tuple[tuple[int, ...], list[dict]]:
    """Greedily drop layers (least loss increase first) until `depth` remain; also the trace."""
    layers = list(range(model.config.num_layers))
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth must be in [1, {len(layers)}], got {depth}")
    trace = []
    while len(layers) > depth:
        scores = {i: heldout_loss(model, batches, SubModel(layers=tuple(j for j in layers if j != i), top_k=top_k),
                                  tasks) for i in layers}
        drop = min(scores, key=scores.get)
        layers.remove(drop)
        trace.append({"dropped_layer": drop, "loss": scores[drop], "candidates": scores})
    return tuple(layers), trace


def select_experts(model: UnifiedTransformer, batches: dict[str, dict], layers: tuple[int, ...], num_experts: int,
                   top_k: int | None = None, tasks: tuple[str, ...] = TASKS) -> tuple[dict[int, torch.Tensor], list]:
    """Per kept layer, greedily mask experts (least loss increase first) until `num_experts` remain."""
    E = model.config.num_experts
    k = top_k or model.config.top_k
    if not k <= num_experts <= E:
        raise ValueError(f"experts to keep must be in [{k}, {E}] (at least top_k), got {num_experts}")
    masks = {i: torch.ones(E, dtype=torch.bool) for i in layers}
    trace = []
    for i in layers:
        while int(masks[i].sum()) > num_experts:
            scores = {}
            for e in masks[i].nonzero().flatten().tolist():
                trial = dict(masks)
                trial[i] = masks[i].clone()
                trial[i][e] = False
                scores[e] = heldout_loss(model, batches, SubModel(layers=layers, top_k=top_k, expert_masks=trial),
                                         tasks)
            drop = min(scores, key=scores.get)
            masks[i] = masks[i].clone()
            masks[i][drop] = False
            trace.append({"layer": i, "dropped_expert": drop, "loss": scores[drop]})
    return masks, trace


def select_submodel(model: UnifiedTransformer, vq: VQTokenizer, depth: int | None = None,
                    num_experts: int | None = None, top_k: int | None = None, n: int = 64, seed: int = 0,
                    tasks: tuple[str, ...] = TASKS) -> tuple[SubModel, dict]:
    """A SubModel whose layers (if depth is given) and experts (if num_experts is given) are chosen by
    held-out loss on the selection set; top_k is taken as given. Also a report with the losses."""
    cfg = model.config
    if cfg.is_dense and (num_experts is not None or top_k is not None):
        raise ValueError("a dense model has no experts: only depth can be selected")
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    top_k = None if top_k == cfg.top_k else top_k
    tok = TextTokenizer(cfg.text_vocab)
    batches = selection_set(vq, tok, n, seed)
    layers, layer_trace = (None, [])
    if depth is not None and depth != cfg.num_layers:
        layers, layer_trace = select_layers(model, batches, depth, top_k, tasks)
    masks, expert_trace = None, []
    if num_experts is not None and num_experts != cfg.num_experts:
        run = layers if layers is not None else tuple(range(cfg.num_layers))
        masks, expert_trace = select_experts(model, batches, run, num_experts, top_k, tasks)
    sub = SubModel(layers=layers, top_k=top_k, expert_masks=masks)
    report = {"selection_set": {"split": "val", "first_index": SELECTION_OFFSET, "n": n, "seed": seed,
                                "tasks": list(tasks)},
              "loss": heldout_loss(model, batches, sub, tasks), "layer_trace": layer_trace,
              "expert_trace": expert_trace}
    return sub, report
