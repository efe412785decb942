"""Training loops of the unified model family: the VQ image tokenizer, then the elastic MoE transformer.

Plain PyTorch on one process (the models are small and CPU-bound). Determinism: the examples of step k
and the elastic sub-model of step k are functions of (seed, k); global RNG is re-seeded per step; a
resumed run therefore repeats an uninterrupted one. Checkpoints reuse `training.checkpoint`
(safetensors weights + optimizer state, written atomically); metrics go to metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.config import Config
from ernielab.core.images import to_uint8
from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed, generator
from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.evaluation import caption_correct, heldout
from ernielab.unified.io import load_vq, save_model, save_vq
from ernielab.unified.model import (
    IMAGE,
    IMAGE_START,
    TEXT,
    SubModel,
    UnifiedTransformer,
    full_model_logits,
    unified_loss,
)
from ernielab.unified.moe import balance_stats, expert_load
from ernielab.unified.sequences import collate, image_to_text_sequence, text_sequence, text_to_image_sequence
from ernielab.unified.submodel import cut_submodel, half_active_cut, sample_submodel, submodel_summary
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer, build_text_vocab
from ernielab.unified.vq import VQTokenizer, psnr
from ernielab.worlds.shapes import caption, render, sample_item_scene

RESUME_FREE_FIELDS = ("steps", "log_every", "save_every", "keep_checkpoints", "eval_size")


def restore(run_dir: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, config: dict,
            train_cfg: Config) -> int:
    """Load run_dir's latest checkpoint (0 if none); refuse one written with other settings."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if saved.get("model") != json.loads(json.dumps(config)):  # tuples come back from JSON as lists
        raise ValueError(f"checkpoint {path} was trained with a different model config; train into another "
                         f"run directory")
    # compared as JSON (tuples are saved as lists); a setting added after the checkpoint was written
    # counts as its default, which is what that run trained with
    defaults = {f.name: f.default for f in dataclasses.fields(train_cfg) if f.default is not dataclasses.MISSING}
    ours = {k: v for k, v in json.loads(json.dumps(train_cfg.to_dict())).items() if k not in RESUME_FREE_FIELDS}
    theirs = {k: v for k, v in json.loads(json.dumps({**defaults, **saved.get("train", {})})).items()
              if k not in RESUME_FREE_FIELDS}
    if ours != theirs:
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ValueError(f"checkpoint {path} was trained with different training settings {changed}; "
                         f"train into another run directory")
    for prefix, module in modules.items():
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in ckpt["model"].items()
                                if k.startswith(prefix + ".")})
    optimizer.load_state_dict(ckpt["optim"]["optimizer"])
    scheduler.load_state_dict(ckpt["optim"]["scheduler"])
    return ckpt["step"]


def _flat_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()}


def render_split(n: int, image_size: int, seed: int, split: str = "train",
                 progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """n shapes-world images as uint8 [n, 3, H, W] (compact in memory) and their captions."""
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    captions = []
    for i in tqdm(range(n), desc=f"render {split}", disable=not progress, leave=False):
        scene, rng = sample_item_scene(seed, split, i, image_size)
        images[i] = torch.from_numpy(render(scene)).permute(2, 0, 1)
        captions.append(caption(scene, rng))
    return images, captions


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


# ================================================================================ VQ tokenizer


@dataclasses.dataclass
class VQTrainConfig(Config):
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    train_size: int = 10_000
    eval_size: int = 256
    seed: int = 0
    log_every: int = 50
    save_every: int = 200
    keep_checkpoints: int = 1


@torch.no_grad()
def evaluate_vq(vq: VQTokenizer, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Reconstruction PSNR, codebook usage, and the alignment checker's verdict on originals vs
    reconstructions (how much of the image-level facts survives tokenisation)."""
    vq.eval()
    images, captions = heldout(n, vq.config.image_size, seed)
    codes = vq.encode(images)
    recon = vq.decode(codes)
    counts = torch.bincount(codes.flatten(), minlength=vq.config.codebook_size).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    orig_u8, rec_u8 = to_uint8(images), to_uint8(recon)
    orig_ok = [caption_correct(c, im) for c, im in zip(captions, orig_u8)]
    rec_ok = [caption_correct(c, im) for c, im in zip(captions, rec_u8)]
    return {"psnr": psnr(recon, images), "mse": float(torch.mean((recon.clamp(-1, 1) - images) ** 2)),
            "codes_used": int((counts > 0).sum()), "code_perplexity": perplexity,
            "align_original": float(np.mean(orig_ok)), "align_reconstruction": float(np.mean(rec_ok)), "n": n}


def train_vq(vq_cfg: VQConfig, cfg: VQTrainConfig, run_dir: str | Path, resume: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Train the VQ tokenizer; writes checkpoints, metrics.jsonl, vq.safetensors and vq_config.json."""
    run_dir = Path(run_dir)
    torch.manual_seed(derive_seed("vq-init", cfg.seed))
    vq = VQTokenizer(vq_cfg)
    optimizer = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, "cosine", 0.1))
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; resume, or train into a new run directory")
    modules = {"vq": vq}
    start = restore(run_dir, modules, optimizer, scheduler, vq_cfg.to_dict(), cfg) if resume else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl", start)
    if start and progress:
        tqdm.write(f"resumed {run_dir} at step {start}")
    images, _ = render_split(cfg.train_size, vq_cfg.image_size, cfg.seed, progress=progress)
    vq.train()
    t0, window = time.time(), []
    bar = tqdm(total=cfg.steps, initial=start, desc="train vq", disable=not progress)
    for step in range(start, cfg.steps):
        torch.manual_seed(derive_seed("vq-step", cfg.seed, step))  # dead-code restarts draw from it
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=generator("vq-batch", cfg.seed, step))
        _, parts = vq(uint8_to_float(images[idx]))
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        scheduler.step()
        window.append({k: float(parts[k].detach()) for k in ("loss", "recon", "commit")})
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            log.write({"step": done, **record, "lr": scheduler.get_last_lr()[0], "elapsed_s": time.time() - t0})
            bar.set_postfix(recon=f"{record['recon']:.4f}")
            window = []
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(run_dir, done, _flat_state(modules), None, optimizer, scheduler,
                            {"model": vq_cfg.to_dict(), "train": cfg.to_dict()}, keep=cfg.keep_checkpoints)
    bar.close()
    save_vq(run_dir, vq)
    metrics = evaluate_vq(vq, cfg.eval_size, cfg.seed)
    log.write({"step": cfg.steps, "split": "val", **metrics})
    result = {"step": cfg.steps, "elapsed_s": time.time() - t0, "val": metrics}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ================================================================================ unified model


@dataclasses.dataclass
class UnifiedTrainConfig(Config):
    steps: int = 1000
    t2i_batch: int = 16  # caption -> image sequences per step
    i2t_batch: int = 16  # image -> caption sequences per step
    text_batch: int = 16  # text-only sequences per step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    caption_dropout: float = 0.1  # empty caption for caption -> image: enables classifier-free guidance
    elastic: bool = True
    p_full_depth: float = 0.75
    p_all_experts: float = 0.8
    p_default_k: float = 0.8
    elastic_coupled: bool = False  # one draw decides all three reductions (see sample_submodel)
    # in-place distillation: on steps that train a smaller sub-model, add this weight times
    # KL(full model || sub-model) to its loss; the full model's pass is extra forward work, no gradient
    elastic_distill: float = 0.0
    # share of the shrunken steps that train the deployment cut (sample_submodel's p_anchor); the cut is
    # (depth, experts, top_k), None = half_active_cut (3 of 4 layers, 8 of 16 experts, k=1)
    elastic_anchor: float = 0.0
    anchor_cut: tuple[int, int, int] | None = None
    min_depth_fraction: float = 0.5
    min_expert_fraction: float = 0.5
    train_size: int = 20_000
    eval_size: int = 200
    seed: int = 0
    log_every: int = 25
    save_every: int = 250
    keep_checkpoints: int = 1

    def __post_init__(self):
        if self.steps < 1 or min(self.t2i_batch, self.i2t_batch, self.text_batch) < 0:
            raise ValueError("steps must be >= 1 and batch sizes >= 0")
        if self.t2i_batch + self.i2t_batch + self.text_batch == 0:
            raise ValueError("at least one task needs a positive batch size")
        if self.elastic_distill < 0:
            raise ValueError(f"elastic_distill must be >= 0, got {self.elastic_distill}")
        if not 0 <= self.elastic_anchor <= 1:
            raise ValueError(f"elastic_anchor must be in [0, 1], got {self.elastic_anchor}")
        if self.anchor_cut is not None:
            if len(self.anchor_cut) != 3:
                raise ValueError(f"anchor_cut is (depth, experts, top_k), got {self.anchor_cut}")
            self.anchor_cut = tuple(int(v) for v in self.anchor_cut)  # a JSON list when loaded back


class ShapesCorpus:
    """Training data of the unified model: captions as compact token ids, images as VQ codes."""

    def __init__(self, vq: VQTokenizer, tok: TextTokenizer, size: int, seed: int, split: str = "train",
                 progress: bool = False):
        images, captions = render_split(size, vq.config.image_size, seed, split, progress)
        vq.eval()
        with torch.no_grad():
            self.codes = torch.cat([vq.encode(uint8_to_float(images[i: i + 512])) for i in range(0, size, 512)])
        self.text = [tok.encode(c) for c in captions]
        self.captions = captions

    def __len__(self) -> int:
        return len(self.text)


def build_step_batches(corpus: ShapesCorpus, cfg: UnifiedTrainConfig, step: int) -> dict[str, dict]:
    """The three task batches of a step: a function of (seed, step) only."""
    gen = generator("unified-batch", cfg.seed, step)
    n = len(corpus)
    batches = {}
    if cfg.t2i_batch:
        idx = torch.randint(0, n, (cfg.t2i_batch,), generator=gen).tolist()
        drop = (torch.rand(cfg.t2i_batch, generator=gen) < cfg.caption_dropout).tolist()
        batches["t2i"] = collate([text_to_image_sequence([BOS, EOS] if d else corpus.text[i], corpus.codes[i])
                                  for i, d in zip(idx, drop)])
    if cfg.i2t_batch:
        idx = torch.randint(0, n, (cfg.i2t_batch,), generator=gen).tolist()
        batches["i2t"] = collate([image_to_text_sequence(corpus.codes[i], corpus.text[i]) for i in idx])
    if cfg.text_batch:
        grid = corpus.codes.shape[-1]
        idx = torch.randint(0, n, (cfg.text_batch,), generator=gen).tolist()
        batches["text"] = collate([text_sequence(corpus.text[i], grid) for i in idx])
    return batches


def step_submodel(model_cfg: UnifiedConfig, cfg: UnifiedTrainConfig, step: int) -> SubModel:
    if not cfg.elastic:
        return SubModel()
    return sample_submodel(model_cfg, generator("unified-elastic", cfg.seed, step), cfg.p_full_depth,
                           cfg.p_all_experts, cfg.p_default_k, cfg.min_depth_fraction, cfg.min_expert_fraction,
                           coupled=cfg.elastic_coupled, p_anchor=cfg.elastic_anchor, anchor=cfg.anchor_cut)


class LoadMeter:
    """Expert load per modality, summed over MoE layers' steps with all experts available."""

    def __init__(self):
        self.loads: dict[str, dict[int, torch.Tensor]] = {"text": {}, "image": {}}

    def add(self, model: UnifiedTransformer, batch: dict, layers) -> None:
        modality, valid = batch["modality"].reshape(-1), batch["valid"].reshape(-1)
        sel = {"text": (modality == TEXT) & valid, "image": ((modality == IMAGE) | (modality == IMAGE_START)) & valid}
        for i, index in model.routing(layers).items():
            for name, s in sel.items():
                load = expert_load(index[s], model.config.num_experts)
                self.loads[name][i] = self.loads[name].get(i, 0) + load

    def summary(self) -> dict[str, float]:
        out = {}
        for name, per_layer in self.loads.items():
            stats = [balance_stats(load) for load in per_layer.values() if int(load.sum()) > 0]
            if stats:
                out[f"load_{name}_max_over_mean"] = float(np.mean([s["max_over_mean"] for s in stats]))
        self.loads = {"text": {}, "image": {}}
        return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (and stacked expert weights); not norms, embeddings' positions or biases."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "image_pos" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_unified(model_cfg: UnifiedConfig, cfg: UnifiedTrainConfig, vq_dir: str | Path, run_dir: str | Path,
                  resume: bool = True, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train the unified model on shapes world (caption->image, image->caption, text) with elastic
    sub-model sampling; exports the final model (with its VQ) to run_dir/model once cfg.steps are done.

    stop_after: leave after this many steps of this call (checkpointed), e.g. to train in time slices.
    """
    run_dir = Path(run_dir)
    vq = load_vq(vq_dir)
    if vq.config.grid != model_cfg.image_grid or vq.config.codebook_size != model_cfg.codebook_size:
        raise ValueError(f"the VQ in {vq_dir} makes {vq.config.grid}x{vq.config.grid} grids of "
                         f"{vq.config.codebook_size} codes; the model expects {model_cfg.image_grid}x"
                         f"{model_cfg.image_grid} of {model_cfg.codebook_size}")
    if not model_cfg.text_vocab:
        model_cfg = model_cfg.replace(text_vocab=build_text_vocab())
    tok = TextTokenizer(model_cfg.text_vocab)
    if cfg.elastic and cfg.elastic_anchor > 0 and not model_cfg.is_dense:  # a bad cut fails now, not mid-run
        cut_submodel(model_cfg, *(cfg.anchor_cut or half_active_cut(model_cfg)))
    torch.manual_seed(derive_seed("unified-init", cfg.seed))
    model = UnifiedTransformer(model_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, "cosine", cfg.min_lr_ratio))
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; resume, or train into a new run directory")
    modules = {"model": model}
    start = restore(run_dir, modules, optimizer, scheduler, model_cfg.to_dict(), cfg) if resume else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    model_cfg.save(run_dir / "model_config.json")
    cfg.save(run_dir / "train_config.json")
    log = MetricsLog(run_dir / "metrics.jsonl", start)
    if start and progress:
        tqdm.write(f"resumed {run_dir} at step {start}")
    corpus = ShapesCorpus(vq, tok, cfg.train_size, cfg.seed, progress=progress)
    model.train()
    meter, window = LoadMeter(), []
    t0 = time.time()
    kind = "dense" if model_cfg.is_dense else "moe"
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train unified {kind}", disable=not progress)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        torch.manual_seed(derive_seed("unified-step", cfg.seed, step))
        sub = step_submodel(model_cfg, cfg, step)
        loss, parts = torch.zeros(()), {}
        distill = cfg.elastic_distill > 0 and not sub.is_full()
        for task, batch in build_step_batches(corpus, cfg, step).items():
            teacher = full_model_logits(model, batch) if distill else None
            task_loss, task_parts = unified_loss(model, batch, sub, cfg.mtp_weight, teacher, cfg.elastic_distill)
            loss = loss + task_loss
            parts.update({f"{task}_{k}": v for k, v in task_parts.items()})
            if sub.expert_masks is None:
                meter.add(model, batch, sub.layers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        for i, moe in model.moe_layers():
            moe.router.update_bias(None if sub.expert_masks is None else sub.expert_masks.get(i))
        window.append({"loss": loss.item(), **parts, "full": float(sub.is_full())})
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done in (cfg.steps, end):
            keys = sorted({k for w in window for k in w})
            record = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
            record.update(meter.summary())
            log.write({"step": done, **record, "lr": scheduler.get_last_lr()[0], "elapsed_s": time.time() - t0,
                       "last_submodel": submodel_summary(sub)})
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            window = []
        if done % cfg.save_every == 0 or done in (cfg.steps, end):
            save_checkpoint(run_dir, done, _flat_state(modules), None, optimizer, scheduler,
                            {"model": model_cfg.to_dict(), "train": cfg.to_dict()}, keep=cfg.keep_checkpoints)
    bar.close()
    if end < cfg.steps:
        return {"step": end, "elapsed_s": time.time() - t0, "model_dir": None}
    model.eval()
    save_model(run_dir / "model", model, vq, {"step": cfg.steps, "kind": kind, "train": cfg.to_dict(),
                                              "submodel": None})
    result = {"step": cfg.steps, "elapsed_s": time.time() - t0, "model_dir": str(run_dir / "model")}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
