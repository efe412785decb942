"""Elastic sub-models: sample one per training step, describe one for evaluation, cut one out.

A sub-model is (layers, experts kept per layer, top-k). Running the super-model with a `SubModel` and
running the extracted standalone model give the same outputs: extraction copies the kept layers in
order, slices the kept experts' weights, router rows and balancing biases, and sets the smaller top-k.
"""
from __future__ import annotations

import copy
import math

import torch

from ernielab.unified.config import ElasticConfig, UnifiedConfig, check_cut, half_active_cut
from ernielab.unified.model import SubModel, UnifiedTransformer

__all__ = ["cut_submodel", "describe_submodel", "evenly_spaced_layers", "experts_by_usage", "extract_submodel",
           "half_active_cut", "sample_submodel", "submodel_summary", "training_expert_masks"]


def evenly_spaced_layers(num_layers: int, depth: int) -> tuple[int, ...]:
    """`depth` of `num_layers` layers, first and last always kept, the rest spread evenly."""
    if not 1 <= depth <= num_layers:
        raise ValueError(f"depth must be in [1, {num_layers}], got {depth}")
    if depth == 1:
        return (0,)
    return tuple(round(i * (num_layers - 1) / (depth - 1)) for i in range(depth))


def experts_by_usage(model: UnifiedTransformer, layer: int, keep: int) -> torch.Tensor:
    """Ids (ascending) of the `keep` experts of a layer that received the most routing weight in training."""
    moe = model.blocks[layer].ffn
    if not 1 <= keep <= moe.num_experts:
        raise ValueError(f"experts to keep must be in [1, {moe.num_experts}], got {keep}")
    order = torch.argsort(moe.router.gate_mass, descending=True, stable=True)
    return order[:keep].sort().values


def describe_submodel(model: UnifiedTransformer, depth: int | None = None, num_experts: int | None = None,
                      top_k: int | None = None, layers: tuple[int, ...] | None = None) -> SubModel:
    """The SubModel for a target depth / experts per layer / top-k (None = keep the model's)."""
    cfg = model.config
    if layers is None and depth is not None and depth != cfg.num_layers:
        layers = evenly_spaced_layers(cfg.num_layers, depth)
    if cfg.is_dense:
        if num_experts is not None or top_k is not None:
            raise ValueError("a dense model has no experts: only depth can be reduced")
        return SubModel(layers=layers)
    masks = None
    if num_experts is not None and num_experts != cfg.num_experts:
        run = layers if layers is not None else range(cfg.num_layers)
        masks = {}
        for i in run:
            mask = torch.zeros(cfg.num_experts, dtype=torch.bool)
            mask[slice(num_experts) if cfg.elastic.nested else experts_by_usage(model, i, num_experts)] = True
            masks[i] = mask
    if top_k is not None and not 1 <= top_k <= (num_experts or cfg.num_experts):
        raise ValueError(f"top_k must be in [1, {num_experts or cfg.num_experts}], got {top_k}")
    return SubModel(layers=layers, top_k=None if top_k == cfg.top_k else top_k, expert_masks=masks)


def cut_submodel(cfg: UnifiedConfig, depth: int, num_experts: int, top_k: int,
                 generator: torch.Generator | None = None) -> SubModel:
    """The SubModel of a (depth, experts, top_k) cut as training runs it: evenly spaced layers; the first
    experts when cfg.elastic.nested (what extraction cuts), else a random set per layer."""
    check_cut(cfg, depth, num_experts, top_k)
    L, E = cfg.num_layers, cfg.num_experts
    layers = None if depth == L else evenly_spaced_layers(L, depth)
    masks = training_expert_masks(cfg, layers, num_experts, generator) if num_experts < E else None
    return SubModel(layers=layers, top_k=None if top_k == cfg.top_k else top_k, expert_masks=masks)


def training_expert_masks(cfg: UnifiedConfig, layers: tuple[int, ...] | None, kept: int,
                          generator: torch.Generator | None) -> dict[int, torch.Tensor]:
    """Per run layer, `kept` experts: the first ones when nested, else a random set per layer."""
    E, masks = cfg.num_experts, {}
    for i in layers or range(cfg.num_layers):
        mask = torch.zeros(E, dtype=torch.bool)
        mask[slice(kept) if cfg.elastic.nested else torch.randperm(E, generator=generator)[:kept]] = True
        masks[i] = mask
    return masks


def sample_submodel(cfg: UnifiedConfig, generator: torch.Generator, elastic: ElasticConfig | None = None,
                    **changes) -> SubModel:
    """One elastic-training draw with the settings `elastic` (default: the model's `cfg.elastic`, with
    `changes` to its fields, e.g. `coupled=True`). Whether `elastic.enabled` is not looked at: a caller that
    draws wants a draw. ERNIE 5.0 proportions by default: full depth with p_full_depth, else a random ordered
    subset of layers; all experts with p_all_experts, else a random subset per layer (masked out of routing);
    the default top-k with p_default_k, else a uniformly smaller k.

    coupled: one uniform draw decides all three reductions. Each keeps its probability, but they come
    together: with the defaults 20% of steps shrink depth, experts and k at once (independent draws: 1%),
    so combined sub-models get trained, and the full model runs on 75% of steps (independent: 48%).
    nested (a setting of the model's `cfg.elastic`): the layers are evenly spaced and the experts a prefix,
    exactly the sub-models that `describe_submodel` cuts from such a model.
    anchor: a draw that shrinks anything becomes the `anchor_cut` (depth, experts, top_k; default
    `half_active_cut`) with this probability, so the sub-model meant for deployment is trained on
    anchor x (share of shrunken steps) of all steps instead of rarely (a "sandwich" at equal compute:
    the full model keeps its share of steps). anchor = 0 draws exactly what earlier runs drew."""
    e = (elastic or cfg.elastic).replace(**changes) if changes else (elastic or cfg.elastic)
    if e.nested != cfg.elastic.nested:
        cfg = cfg.replace(elastic=cfg.elastic.replace(nested=e.nested))

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    shared = uniform() if e.coupled else None

    def reduced(p_keep: float) -> bool:
        return (uniform() if shared is None else shared) >= p_keep

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    layers = None
    L = cfg.num_layers
    if reduced(e.p_full_depth) and L > 1:
        depth = randint(max(1, math.ceil(e.min_depth_fraction * L)), L - 1)
        layers = (evenly_spaced_layers(L, depth) if e.nested
                  else tuple(sorted(torch.randperm(L, generator=generator)[:depth].tolist())))
    if cfg.is_dense:
        return SubModel(layers=layers)
    E, k = cfg.num_experts, cfg.top_k
    masks, kept = None, E
    if reduced(e.p_all_experts):
        kept = randint(max(k, math.ceil(e.min_expert_fraction * E)), E - 1) if E - 1 >= k else E
        masks = training_expert_masks(cfg, layers, kept, generator)
    top_k = None
    if reduced(e.p_default_k) and k > 1:
        top_k = randint(1, k - 1)
    sub = SubModel(layers=layers, top_k=top_k, expert_masks=masks)
    if e.anchor > 0 and not sub.is_full() and uniform() < e.anchor:
        return cut_submodel(cfg, *(e.anchor_cut or half_active_cut(cfg)), generator=generator)
    return sub


def submodel_summary(sub: SubModel) -> dict:
    """JSON-able description (stored with extracted checkpoints and in metrics)."""
    return {"layers": None if sub.layers is None else list(sub.layers), "top_k": sub.top_k,
            "experts": None if sub.expert_masks is None else
            {str(i): m.nonzero().flatten().tolist() for i, m in sorted(sub.expert_masks.items())}}


@torch.no_grad()
def extract_submodel(model: UnifiedTransformer, sub: SubModel) -> UnifiedTransformer:
    """A standalone smaller model computing exactly what `model(..., sub=sub)` computes."""
    cfg = model.config
    layers = tuple(range(cfg.num_layers)) if sub.layers is None else tuple(sub.layers)
    model._check_sub(sub)
    # the anchor cut is one of the super-model (it need not fit this one): not carried over
    new_cfg = cfg.replace(num_layers=len(layers), elastic=cfg.elastic.replace(anchor=0.0, anchor_cut=None))
    blocks = []
    if not cfg.is_dense:
        masks = sub.expert_masks or {}
        kept = {i: (masks[i] if i in masks else torch.ones(cfg.num_experts, dtype=torch.bool)) for i in layers}
        counts = {int(m.sum()) for m in kept.values()}
        if len(counts) != 1:
            raise ValueError(f"every kept layer must keep the same number of experts, got {sorted(counts)}")
        num_kept = counts.pop()
        # a cut that keeps other experts than a prefix is no longer nested: its own cuts go by usage
        prefixes = all(bool(m[:num_kept].all()) for m in kept.values())
        new_cfg = new_cfg.replace(num_experts=num_kept, top_k=sub.top_k or cfg.top_k,
                                  elastic=new_cfg.elastic.replace(nested=cfg.elastic.nested and prefixes))
    for i in layers:
        block = copy.deepcopy(model.blocks[i])
        if not cfg.is_dense:
            block.ffn = block.ffn.keep_experts(kept[i].nonzero().flatten())
            block.ffn.router.top_k = new_cfg.top_k
        blocks.append(block)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for j, block in enumerate(blocks):
        state.update({f"blocks.{j}.{k}": v for k, v in block.state_dict().items()})
    out = UnifiedTransformer(new_cfg)
    out.load_state_dict(state)  # strict: also checks the shapes fit the new config
    return out.eval()
