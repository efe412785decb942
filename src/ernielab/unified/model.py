"""Unified autoregressive transformer over text and image tokens, one shared MoE trunk.

Sequence layout. Every position has a modality (used only to pick its input embedding and the head
that reads it: it never reaches attention or the router), a RoPE position and an attention *group*:
position i attends to the valid positions j with group[j] <= group[i]. Text tokens each form a group
(causal next-token prediction). An image of g x g VQ codes is laid out as g + 1 blocks of g positions,
one group per block:

    block 0   = g learned "start row" embeddings       -> predicts image row 0
    block r+1 = the codes of row r (+ their cell embedding) -> predicts image row r+1

so the g positions of a block see each other, all earlier blocks and all text before the image, and
each emits one token of the next row: an image takes g decoding steps instead of g*g (next group of
tokens). The last block (row g-1) is only needed when something follows the image (captioning).

With `image_order="scales"` (ERNIE 5.0's next-scale prediction over a multi-scale residual VQ with token-map
sides n_0 < .. < n_{S-1} = g) the image is S + 1 blocks, one group each:

    block 0   = n_0^2 learned start slots                                   -> predicts scale 0
    block k   = scale k-1's codes, nearest-upsampled to n_k x n_k           -> predicts scale k
    block S   = scale S-1's codes (only when something follows the image)

so a token sees every coarser scale and, bidirectionally, its own: an image takes S decoding steps. VAR feeds
the upsampled sum of all coarser scales' code vectors at scale k; here each position holds the one code of its
parent cell in scale k-1 (one integer token per position, so the KV cache and the token interface stay as they
are) and reaches the coarser scales through attention. Positions: every image cell has a learned embedding
(per block, h, w, as the rows' cells do), and rotary positions have three axes, (group, h, w): text carries its
group on all three, image cells their block's group and their centre in units of the finest grid, so a cell and
its parents and children sit at nearby (h, w).

Elastic sub-models are run through `SubModel` (a subset of layers, per-layer expert masks, a smaller
top-k) and can be cut out as standalone models (see `submodel.py`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.layers.attention import SelfAttention
from ernielab.core.layers.mlp import GeGLU
from ernielab.core.layers.norms import RMSNorm
from ernielab.core.layers.rope import rope_angles
from ernielab.unified.config import UnifiedConfig
from ernielab.unified.moe import MoEFeedForward

TEXT, IMAGE, IMAGE_START = 0, 1, 2  # modality of an input position
IGNORE = -100


def scale_block_sides(scales: tuple[int, ...]) -> tuple[int, ...]:
    """Side of each image block of the "scales" layout: block k < S predicts scale k; block S holds the last."""
    return tuple(scales) + (scales[-1],)


def image_cells(cfg: UnifiedConfig) -> int:
    """Rows of the learned image-cell table: the start row and every cell ("rows"), or every block's cells."""
    if cfg.image_order == "scales":
        return sum(n * n for n in scale_block_sides(cfg.image_scales))
    return cfg.image_grid + cfg.image_grid ** 2


def scale_cell_centres(scales: tuple[int, ...]) -> torch.Tensor:
    """[cells, 2] float: (h, w) of each cell of the "scales" layout, its centre in units of the finest grid."""
    grid, rows = scales[-1], []
    for side in scale_block_sides(scales):
        centre = (torch.arange(side, dtype=torch.float32) + 0.5) * grid / side - 0.5
        rows.append(torch.stack(torch.meshgrid(centre, centre, indexing="ij"), -1).reshape(-1, 2))
    return torch.cat(rows)


@dataclasses.dataclass
class SubModel:
    """Which part of an elastic super-model to run: None = everything / the default."""

    layers: tuple[int, ...] | None = None  # layer ids in execution order
    top_k: int | None = None
    expert_masks: dict[int, torch.Tensor] | None = None  # layer id -> bool [num_experts] (True = usable)

    def is_full(self) -> bool:
        return self.layers is None and self.top_k is None and self.expert_masks is None


class KVCache:
    """Keys/values per layer plus the groups and validity of the cached positions (for the mask)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.group: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None  # [B] RoPE position of the next valid token

    def __len__(self) -> int:
        return 0 if self.group is None else self.group.shape[1]


class Block(nn.Module):
    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.norm2 = RMSNorm(cfg.dim)
        if cfg.is_dense:
            self.ffn: nn.Module = GeGLU(cfg.dim, cfg.dense_hidden)
        else:
            self.ffn = MoEFeedForward(cfg.dim, cfg.num_experts, cfg.expert_hidden, cfg.top_k, cfg.shared_hidden,
                                      cfg.balance_rate)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                layer_id: int, top_k: int | None, expert_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm1(x), rope)
        if cache is not None:
            if layer_id in cache.keys:
                k = torch.cat([cache.keys[layer_id], k], dim=2)
                v = torch.cat([cache.values[layer_id], v], dim=2)
            cache.keys[layer_id], cache.values[layer_id] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.to_out(out.transpose(1, 2).flatten(2))
        h = self.norm2(x)
        if isinstance(self.ffn, MoEFeedForward):
            return x + self.ffn(h, top_k, expert_mask)
        return x + self.ffn(h)


class MTPHead(nn.Module):
    """Maps the trunk output at t to a state from which the shared text head predicts token t+1+depth."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(self.norm(h))


def attention_mask(group: torch.Tensor, key_group: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, S_q, S_k] bool: query i sees the valid keys j with group[j] <= group[i]. The queries are the last
    S_q keys (the earlier ones are cached)."""
    mask = (key_group[:, None, :] <= group[:, :, None]) & key_valid[:, None, :]
    past = key_group.shape[1] - group.shape[1]
    diagonal = torch.eye(group.shape[1], dtype=torch.bool, device=group.device)
    mask[:, :, past:] |= diagonal  # a padding query still sees itself: no all-masked softmax rows
    return mask


class UnifiedTransformer(nn.Module):
    def __init__(self, cfg: UnifiedConfig):
        super().__init__()
        cfg.validate()
        if cfg.text_vocab_size < 5:
            raise ValueError("config.text_vocab is empty: build it with tokenizer.build_text_vocab()")
        self.config = cfg
        self.text_embed = nn.Embedding(cfg.text_vocab_size, cfg.dim)
        self.image_embed = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.image_pos = nn.Embedding(image_cells(cfg), cfg.dim)  # rows: start row (g) then every cell (g*g)
        if cfg.image_order == "scales":  # derived from the config: not saved with the weights
            self.register_buffer("cell_centres", scale_cell_centres(cfg.image_scales), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim)
        self.text_head = nn.Linear(cfg.dim, cfg.text_vocab_size, bias=False)
        self.image_head = nn.Linear(cfg.dim, cfg.codebook_size, bias=False)
        self.mtp = nn.ModuleList(MTPHead(cfg.dim) for _ in range(cfg.mtp_heads))
        for emb in (self.text_embed, self.image_embed, self.image_pos):
            nn.init.normal_(emb.weight, std=0.02)
        for head in (self.text_head, self.image_head):
            nn.init.normal_(head.weight, std=0.02)

    # ---- helpers ------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay weight matrices (and stacked expert weights); not norms, the image positions or biases."""
        decay, rest = [], []
        for name, p in self.named_parameters():
            (decay if p.ndim >= 2 and "image_pos" not in name else rest).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def moe_layers(self) -> list[tuple[int, MoEFeedForward]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoEFeedForward)]

    def embed(self, tokens: torch.Tensor, modality: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Modality-specific input embeddings; `cell` indexes image_pos (start-row slot or grid cell)."""
        is_text, is_image = modality == TEXT, modality == IMAGE
        x = self.text_embed(torch.where(is_text, tokens, 0)) * is_text[..., None]
        x = x + self.image_embed(torch.where(is_image, tokens, 0)) * is_image[..., None]
        return x + self.image_pos(cell.clamp_min(0)) * (~is_text)[..., None]

    def _check_sub(self, sub: SubModel) -> tuple[int, ...]:
        layers = tuple(range(len(self.blocks))) if sub.layers is None else tuple(sub.layers)
        if not layers or any(not 0 <= i < len(self.blocks) for i in layers):
            raise ValueError(f"sub-model layers {layers} must be a non-empty subset of 0..{len(self.blocks) - 1}")
        if self.config.is_dense and (sub.top_k is not None or sub.expert_masks):
            raise ValueError("a dense model has no experts: top_k / expert masks do not apply")
        return layers

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, modality: torch.Tensor, cell: torch.Tensor, group: torch.Tensor,
                valid: torch.Tensor, sub: SubModel | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Inputs are [B, S]; returns the final-normed hidden states [B, S, D].

        With a cache, the inputs are the next chunk after the cached positions; their groups must not
        be lower than any cached group (chunks append, they never insert).
        """
        sub = sub or SubModel()
        layers = self._check_sub(sub)
        if cache is not None and len(cache):
            start = cache.next_position
            key_group, key_valid = torch.cat([cache.group, group], 1), torch.cat([cache.valid, valid], 1)
        else:
            start = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            key_group, key_valid = group, valid
        position = start[:, None] + (valid.long().cumsum(1) - 1).clamp_min(0)
        if cache is not None:
            cache.group, cache.valid = key_group, key_valid
            cache.next_position = start + valid.long().sum(1)
        mask = attention_mask(group, key_group, key_valid)
        if self.config.image_order == "scales":
            rope = rope_angles(self.scale_positions(modality, cell, group, valid), self.rope_axes(),
                               self.config.rope_theta)
        else:
            rope = rope_angles(position[..., None], (self.config.dim // self.config.num_heads,),
                               self.config.rope_theta)
        x = self.embed(tokens, modality, cell)
        for i in layers:
            expert_mask = None if sub.expert_masks is None else sub.expert_masks.get(i)
            x = self.blocks[i](x, rope, mask[:, None], cache, i, sub.top_k, expert_mask)
        return self.norm(x)

    def rope_axes(self) -> tuple[int, int, int]:
        """Rotary dims of the (group, h, w) axes of the "scales" layout."""
        head = self.config.dim // self.config.num_heads
        return head // 2, head // 4, head // 4

    def scale_positions(self, modality: torch.Tensor, cell: torch.Tensor, group: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
        """[B, S, 3] rotary positions of the "scales" layout: text (group, group, group), image cells
        (group, h, w) with h, w their centre on the finest grid; padding at 0."""
        t = torch.where(valid, group, 0).float()[..., None]
        hw = self.cell_centres[cell.clamp_min(0)]
        return torch.cat([t, torch.where((modality != TEXT)[..., None], hw, t.expand_as(hw))], -1)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.text_head(h)

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.image_head(h)

    def mtp_logits(self, h: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits for the text token depth+1 steps beyond next (depth 1 = token t+2)."""
        return self.text_head(self.norm(self.mtp[depth - 1](h)))

    def routing(self, layers: tuple[int, ...] | None = None) -> dict[int, torch.Tensor]:
        """Expert ids [N, k] chosen by each MoE layer in its latest call (the layers that ran)."""
        ran = set(range(len(self.blocks))) if layers is None else set(layers)
        return {i: moe.last_index for i, moe in self.moe_layers() if i in ran and moe.last_index is not None}


def target_logits(model: UnifiedTransformer, h: torch.Tensor,
                  batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"text" / "image": (head logits in float32, targets)} at the batch's target positions of each kind."""
    out = {}
    for name, head in (("text", model.text_logits), ("image", model.image_logits)):
        target = batch[f"{name}_target"]
        sel = target != IGNORE
        if sel.any():
            out[name] = (head(h[sel]).float(), target[sel])
    return out


@torch.no_grad()
def full_model_logits(model: UnifiedTransformer, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's text and image logits at the batch's targets: the teacher of in-place distillation.

    Runs in eval mode so that the teacher pass leaves no expert load behind for the routing-bias update.
    """
    was_training = model.training
    model.eval()
    try:
        h = model(batch["tokens"], batch["modality"], batch["cell"], batch["group"], batch["valid"])
        return {name: logits for name, (logits, _) in target_logits(model, h, batch).items()}
    finally:
        model.train(was_training)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged."""
    log_s, log_t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def unified_loss(model: UnifiedTransformer, batch: dict[str, torch.Tensor], sub: SubModel | None = None,
                 mtp_weight: float = 0.3, teacher: dict[str, torch.Tensor] | None = None,
                 distill_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over the text targets (+ MTP heads) and image targets of a collated batch.

    teacher (from `full_model_logits`): adds distill_weight * KL(teacher || this model) on the text and image
    targets, so that a sub-model learns the full model's predictions as well as the labels.
    """
    h = model(batch["tokens"], batch["modality"], batch["cell"], batch["group"], batch["valid"], sub)
    parts: dict[str, float] = {}
    loss = h.new_zeros(())
    for name, (logits, target) in target_logits(model, h, batch).items():
        task_loss = F.cross_entropy(logits, target)
        loss = loss + task_loss
        parts[name] = task_loss.item()
        if teacher and name in teacher and distill_weight > 0:
            kl = distillation_kl(logits, teacher[name])
            loss = loss + distill_weight * kl
            parts[f"{name}_kd"] = kl.item()
        if name == "text":
            loss = loss + mtp_loss(model, h, batch["text_target"], mtp_weight, parts)
    return loss, parts


def mtp_loss(model: UnifiedTransformer, h: torch.Tensor, text_t: torch.Tensor, mtp_weight: float,
             parts: dict[str, float]) -> torch.Tensor:
    """mtp_weight x the multi-token heads' cross-entropies (head d predicts the text token d+1 ahead)."""
    loss = h.new_zeros(())
    sel = text_t != IGNORE
    for depth in range(1, len(model.mtp) + 1 if mtp_weight else 1):  # weight 0: skip the heads
        shifted = torch.full_like(text_t, IGNORE)
        shifted[:, :-depth] = text_t[:, depth:]
        shifted[~sel] = IGNORE
        msel = shifted != IGNORE
        if msel.any():
            head_loss = F.cross_entropy(model.mtp_logits(h[msel], depth).float(), shifted[msel])
            loss = loss + mtp_weight * head_loss
            parts[f"mtp{depth}"] = head_loss.item()
    return loss


def parameter_counts(model: UnifiedTransformer) -> dict[str, int]:
    """Total parameters, and those active when decoding a token.

    Active = everything a decoding step multiplies with: embeddings, attention, norms, routers, the
    shared expert, top_k of the num_experts routed experts, the heads. The MTP heads are training-only
    (decoding here is plain next-token / next-row), so they count in the total but not as active.
    """
    total = sum(p.numel() for p in model.parameters())
    active = total - sum(p.numel() for p in model.mtp.parameters())
    for _, moe in model.moe_layers():
        routed = moe.w_gate.numel() + moe.w_up.numel() + moe.w_down.numel()
        active -= routed - routed * moe.top_k // moe.num_experts
    return {"total": total, "active": active}
