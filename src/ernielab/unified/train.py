"""Training tasks of the unified model family, run by the core engine: the VQ image tokenizer, then the elastic
MoE transformer.

`VQTask` / `VQTrainConfig` train the tokenizer and export it into its run folder (vq_config.json +
vq.safetensors, what `io.load_vq` reads). `UnifiedTask` / `UnifiedTrainConfig` train the unified model on
three tasks at once (caption -> image, image -> caption, text) and export RUN/model (`io.save_model`), whose
config.json carries the model's elastic settings.

Determinism: the examples of step k, its elastic sub-model and the global RNG state of the step are functions
of (seed, k) (plus the micro-batch and the process when grad_accum or data parallelism ask for more), so a
resumed run repeats an uninterrupted one. With the same settings these tasks train the weights the earlier
hand-written loops trained, bit for bit (tests/unified/test_unified_train.py).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ernielab.core.config import bounded
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.images import to_uint8
from ernielab.core.seeding import derive_seed, generator
from ernielab.unified.config import TASKS, UnifiedConfig, VQConfig
from ernielab.unified.evaluation import caption_correct, heldout
from ernielab.unified.io import load_vq, save_model, save_vq, vq_mismatch
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
from ernielab.unified.submodel import sample_submodel
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer, build_text_vocab
from ernielab.unified.vq import VQTokenizer, psnr
from ernielab.worlds.shapes import caption, render, sample_item_scene

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


def step_parts(seed: int, step: int, micro: int = 0, rank: int = 0) -> tuple[int, ...]:
    """What a step's draws are seeded by: (seed, step), plus (micro, rank) beyond the first micro-batch of the
    first process (so one process without accumulation draws exactly what the earlier loops drew)."""
    return (seed, step) if micro == rank == 0 else (seed, step, micro, rank)


# ================================================================================ VQ tokenizer


@dataclasses.dataclass
class VQTrainConfig(EngineSettings):
    output_dir: str = "runs/unified/vq"  # also the VQ folder the export writes (vq_config.json, vq.safetensors)
    model: VQConfig = dataclasses.field(default_factory=VQConfig.cpu)
    steps: int = bounded(1500, ge=1)
    lr: float = bounded(2e-3, gt=0)
    warmup_steps: int = bounded(50, ge=0)
    lr_schedule: str = bounded("cosine", choices=("constant", "cosine"))
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    grad_clip: float = bounded(0.0, ge=0)
    log_every: int = bounded(50, ge=1)
    save_every: int = bounded(200, ge=1)
    keep_checkpoints: int = bounded(1, ge=1)
    train_size: int = bounded(10_000, ge=1)  # rendered training images
    eval_size: int = bounded(256, ge=1)  # held-out images of the final evaluation


@torch.no_grad()
def evaluate_vq(vq: VQTokenizer, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Reconstruction PSNR, codebook usage, and the alignment checker's verdict on originals vs
    reconstructions (how much of the image-level facts survives tokenisation)."""
    vq.eval()
    images, captions = heldout(n, vq.config.image_size, seed)
    images = images.to(next(vq.parameters()).device)
    codes = vq.encode(images)
    recon = vq.decode(codes)
    counts = torch.bincount(codes[codes >= 0], minlength=vq.config.codebook_size).double()  # multi-scale: -1 pads
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    orig_u8, rec_u8 = to_uint8(images), to_uint8(recon)
    orig_ok = [caption_correct(c, im) for c, im in zip(captions, orig_u8)]
    rec_ok = [caption_correct(c, im) for c, im in zip(captions, rec_u8)]
    return {"psnr": psnr(recon, images), "mse": float(torch.mean((recon.clamp(-1, 1) - images) ** 2)),
            "codes_used": int((counts > 0).sum()), "code_perplexity": perplexity,
            "align_original": float(np.mean(orig_ok)), "align_reconstruction": float(np.mean(rec_ok)), "n": n}


class VQTask(Task):
    """The VQ tokenizer on shapes-world images: reconstruction + commitment loss, EMA codebook."""

    def __init__(self, config: VQTrainConfig, progress: bool = False, accelerator=None):
        config.validate()
        self.config, self.progress, self.accelerator = config, progress, accelerator
        self._images: torch.Tensor | None = None

    def train(self) -> dict:
        return Engine(self, self.accelerator).fit()

    @property
    def images(self) -> torch.Tensor:
        """The training images, rendered on first use (after the engine has accepted the run)."""
        if self._images is None:
            self._images, _ = render_split(self.config.train_size, self.config.model.image_size, self.config.seed,
                                           progress=self.progress)
        return self._images

    def build(self) -> dict[str, nn.Module]:
        if not self.config.resume:  # a fresh start: the last run's tokenizer is not this one's
            for name in ("vq.safetensors", "vq_config.json"):
                (Path(self.config.output_dir) / name).unlink(missing_ok=True)
        torch.manual_seed(derive_seed("vq-init", self.config.seed))
        return {"model": VQTokenizer(self.config.model).to(self.engine.device)}

    def batch(self, step: int, micro: int) -> torch.Tensor:
        cfg = self.config
        parts = step_parts(cfg.seed, step, micro, self.engine.rank)
        torch.manual_seed(derive_seed("vq-step", *parts))  # dead-code restarts draw from it
        idx = torch.randint(0, len(self.images), (cfg.batch_size,), generator=generator("vq-batch", *parts))
        return uint8_to_float(self.images[idx]).to(self.engine.device)

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        _, parts = model(batch)
        return parts["loss"], {"recon": float(parts["recon"]), "commit": float(parts["commit"])}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return evaluate_vq(self.engine.accelerator.unwrap_model(model), self.config.eval_size, self.config.seed)

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        save_vq(run_dir, model.cpu())
        return run_dir


def train_vq(config: VQTrainConfig, progress: bool = False) -> dict[str, Any]:
    """Train the VQ tokenizer through the engine; -> the engine's result (with the final "eval")."""
    return VQTask(config, progress).train()


# ================================================================================ unified model


@dataclasses.dataclass
class UnifiedTrainConfig(EngineSettings):
    output_dir: str = "runs/unified/moe"  # the trained model goes to OUTPUT_DIR/model
    vq_dir: str = "runs/unified/vq"  # a VQ folder written by `ernielab unified vq`
    model: UnifiedConfig = dataclasses.field(default_factory=UnifiedConfig.cpu)  # incl. its `elastic` section
    batch_size: int = bounded(16, ge=1)  # sequences per task and step
    tasks: tuple[str, ...] = TASKS  # trained together; each step sums their losses
    lr: float = bounded(3e-3, gt=0)
    lr_schedule: str = bounded("cosine", choices=("constant", "cosine"))
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.05, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    log_every: int = bounded(25, ge=1)
    save_every: int = bounded(250, ge=1)
    keep_checkpoints: int = bounded(1, ge=1)
    mtp_weight: float = bounded(0.3, ge=0)
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # empty caption for caption -> image: enables guidance
    train_size: int = bounded(20_000, ge=1)  # rendered training items (images + captions)
    # how the task losses combine: "sum" (all weights 1) or "posterior" (each weighted by the estimated precision
    # of its loss, 1 / running mean, normalised to mean 1: see PosteriorBalance)
    loss_balance: str = bounded("sum", choices=("sum", "posterior"))
    balance_momentum: float = bounded(0.98, ge=0, lt=1)  # of the running mean of each task's loss
    balance_warmup: int = bounded(100, ge=0)  # steps summed with weight 1 while the running means settle

    def check(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not set(self.tasks) <= set(TASKS):
            raise ValueError(f"tasks must be distinct names from {list(TASKS)}, got {list(self.tasks)}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")


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


def build_step_batches(corpus: ShapesCorpus, cfg: UnifiedTrainConfig, step: int, micro: int = 0,
                       rank: int = 0) -> tuple[dict[str, dict], list[int]]:
    """The task batches of a (micro-)step, a function of (seed, step, micro, rank) only; also the corpus items
    they read. Tasks are drawn in the order of TASKS whatever the order of `cfg.tasks`."""
    gen = generator("unified-batch", *step_parts(cfg.seed, step, micro, rank))
    n, b = len(corpus), cfg.batch_size
    batches, items = {}, []
    if "t2i" in cfg.tasks:
        idx = torch.randint(0, n, (b,), generator=gen).tolist()
        drop = (torch.rand(b, generator=gen) < cfg.caption_dropout).tolist()
        batches["t2i"] = collate([text_to_image_sequence([BOS, EOS] if d else corpus.text[i], corpus.codes[i])
                                  for i, d in zip(idx, drop)])
        items += idx
    if "i2t" in cfg.tasks:
        idx = torch.randint(0, n, (b,), generator=gen).tolist()
        batches["i2t"] = collate([image_to_text_sequence(corpus.codes[i], corpus.text[i]) for i in idx])
        items += idx
    if "text" in cfg.tasks:
        grid = corpus.codes.shape[-1]
        idx = torch.randint(0, n, (b,), generator=gen).tolist()
        batches["text"] = collate([text_sequence(corpus.text[i], grid) for i in idx])
        items += idx
    return batches, items


def step_submodel(model_cfg: UnifiedConfig, seed: int, step: int) -> SubModel:
    """The elastic sub-model of a step (the same for all its micro-batches and processes)."""
    if not model_cfg.elastic.enabled:
        return SubModel()
    return sample_submodel(model_cfg, generator("unified-elastic", seed, step))


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


def submodel_logs(sub: SubModel, cfg: UnifiedConfig) -> dict[str, float]:
    """The step's sub-model as numbers for metrics.jsonl: whole model or not, layers run, experts kept, k."""
    experts = cfg.num_experts if sub.expert_masks is None else int(next(iter(sub.expert_masks.values())).sum())
    return {"full": float(sub.is_full()), "sub_layers": float(cfg.num_layers if sub.layers is None else
                                                              len(sub.layers)),
            "sub_experts": float(0 if cfg.is_dense else experts),
            "sub_top_k": float(0 if cfg.is_dense else sub.top_k or cfg.top_k)}


class PosteriorBalance:
    """Posterior-based weights of the task (modality) losses: our reading of ERNIE 5.0's modality balancing.

    Each task's loss L_m is read as the negative log-likelihood of a model with its own homoscedastic noise
    scale s_m, whose objective is L_m / s_m + log s_m (Kendall et al. 2018). Its posterior mode at the task's
    current loss is s_m = L_m, so the task's weight is the estimated precision 1 / L_m, taken from a
    bias-corrected running mean of L_m (closed form, no learned parameter that could lag or collapse) and
    normalised to a mean weight of 1 so that the learning rate means what it means for the plain sum. The
    gradient of sum_m L_m / mean(L_m) is that of sum_m log L_m: a relative improvement counts the same in every
    modality, whatever its loss scale (after 600 steps: image codes ~2 nats, captions ~0.6, text ~1).

    The weights of a step come from the means before it; the first `warmup` steps sum with weight 1. The step's
    task losses (the mean over micro-batches) update the means after the optimizer step. `state` resumes it.
    """

    def __init__(self, tasks: tuple[str, ...], momentum: float, warmup: int):
        self.tasks, self.momentum, self.warmup = tuple(tasks), momentum, warmup
        self.mean = torch.zeros(len(self.tasks), dtype=torch.float64)  # running mean, before bias correction
        self.updates = 0
        self.pending: list[list[float]] = []  # this step's task losses, one row per micro-batch

    def weights(self, step: int) -> dict[str, float]:
        if step < self.warmup or self.updates == 0:
            return dict.fromkeys(self.tasks, 1.0)
        estimate = self.mean / (1 - self.momentum ** self.updates)
        precision = 1 / estimate.clamp_min(1e-6)
        return dict(zip(self.tasks, (precision * len(self.tasks) / precision.sum()).tolist()))

    def observe(self, task_losses: dict[str, float]) -> None:
        self.pending.append([task_losses[t] for t in self.tasks])

    def update(self) -> dict[str, float]:
        """Fold the step's losses into the running means; -> the bias-corrected means, for the log."""
        if self.pending:
            step_mean = torch.tensor(self.pending, dtype=torch.float64).mean(0)
            self.mean = self.momentum * self.mean + (1 - self.momentum) * step_mean
            self.updates += 1
            self.pending = []
        if not self.updates:
            return {}
        estimate = self.mean / (1 - self.momentum ** self.updates)
        return {f"{t}_loss_mean": v for t, v in zip(self.tasks, estimate.tolist())}

    def state(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "mean": self.mean.clone(), "updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"the checkpoint balances tasks {state['tasks']}, this run {list(self.tasks)}")
        self.mean, self.updates, self.pending = state["mean"].to(torch.float64).clone(), int(state["updates"]), []


class UnifiedTask(Task):
    """The unified model on shapes world (caption -> image, image -> caption, text) with elastic sub-model
    draws, MTP heads and in-place distillation; after every optimizer step the routers' biases take one
    auxiliary-loss-free balancing step from the load the step routed.

    Runs on one process (the CPU recipe of docs/unified.md; a data-parallel launch is refused): the loss reads
    the heads and MTP modules outside the model's forward, where a DDP wrapper would not synchronise them."""

    def __init__(self, config: UnifiedTrainConfig, progress: bool = False, accelerator=None):
        config.validate()
        self.vq = load_vq(config.vq_dir)
        model_cfg = config.model
        if self.vq.config.grid != model_cfg.image_grid or self.vq.config.codebook_size != model_cfg.codebook_size:
            raise ValueError(f"the VQ in {config.vq_dir} makes {self.vq.config.grid}x{self.vq.config.grid} grids "
                             f"of {self.vq.config.codebook_size} codes; the model expects {model_cfg.image_grid}x"
                             f"{model_cfg.image_grid} of {model_cfg.codebook_size}")
        if vq_mismatch(self.vq.config, model_cfg):  # the scales: "scales" models need a multi-scale VQ
            raise ValueError(f"{config.vq_dir}: {vq_mismatch(self.vq.config, model_cfg)}")
        if not model_cfg.text_vocab:  # the compact vocabulary, deterministic: resumed runs compare equal
            config = config.replace(model=model_cfg.replace(text_vocab=build_text_vocab()))
        self.config, self.progress, self.accelerator = config, progress, accelerator
        self.tok = TextTokenizer(config.model.text_vocab)
        self.meter = LoadMeter()
        self.balance = (PosteriorBalance(config.tasks, config.balance_momentum, config.balance_warmup)
                        if config.loss_balance == "posterior" else None)
        self._corpus: ShapesCorpus | None = None

    def train(self) -> dict:
        return Engine(self, self.accelerator).fit()

    @property
    def corpus(self) -> ShapesCorpus:
        """Rendered and tokenised on first use (after the engine has accepted the run)."""
        if self._corpus is None:
            self._corpus = ShapesCorpus(self.vq, self.tok, self.config.train_size, self.config.seed,
                                        progress=self.progress)
        return self._corpus

    def unwrap(self, model: nn.Module) -> UnifiedTransformer:
        return self.engine.accelerator.unwrap_model(model)

    def build(self) -> dict[str, nn.Module]:
        if self.engine.accelerator.num_processes > 1:
            raise ValueError("the unified model trains on one process; launch it without accelerate/torchrun")
        if not self.config.resume:  # a fresh start: the last run's model is not this one's
            shutil.rmtree(Path(self.config.output_dir) / "model", ignore_errors=True)
        torch.manual_seed(derive_seed("unified-init", self.config.seed))
        return {"model": UnifiedTransformer(self.config.model).to(self.engine.device)}

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{**group, "betas": tuple(self.config.adam_betas)}
                for group in model.param_groups(self.config.weight_decay)]

    def submodel(self, step: int) -> SubModel:
        sub = step_submodel(self.config.model, self.config.seed, step)
        if sub.expert_masks is not None:
            sub.expert_masks = {i: m.to(self.engine.device) for i, m in sub.expert_masks.items()}
        return sub

    def batch(self, step: int, micro: int) -> dict[str, Any]:
        cfg, device = self.config, self.engine.device
        torch.manual_seed(derive_seed("unified-step", *step_parts(cfg.seed, step, micro, self.engine.rank)))
        batches, items = build_step_batches(self.corpus, cfg, step, micro, self.engine.rank)
        batches = {name: {k: v.to(device) for k, v in b.items()} for name, b in batches.items()}
        return {"items": items, "tasks": batches, "sub": self.submodel(step)}

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, net, sub = self.config, self.unwrap(model), batch["sub"]
        distill = cfg.model.elastic.distill
        teach = distill > 0 and not sub.is_full()
        loss, parts = torch.zeros((), device=self.engine.device), {}
        weights = self.balance.weights(step) if self.balance else None
        task_losses = {}  # what the balance observes
        for task, b in batch["tasks"].items():
            teacher = full_model_logits(net, b) if teach else None
            task_loss, task_parts = unified_loss(net, b, sub, cfg.mtp_weight, teacher, distill)
            loss = loss + (task_loss if weights is None else weights[task] * task_loss)
            parts.update({f"{task}_{k}": v for k, v in task_parts.items()})
            task_losses[task] = task_loss.item()
            if sub.expert_masks is None:
                self.meter.add(net, b, sub.layers)
        if self.balance:
            self.balance.observe(task_losses)
            parts.update({f"{task}_weight": w for task, w in weights.items()})
        return loss, {**parts, **submodel_logs(sub, cfg.model)}

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Auxiliary-loss-free balancing: each router's bias moves toward equal load (experts masked this step
        are left alone); the posterior loss balance takes in the step's task losses. On logging steps, the expert
        load per modality since the last one (and the balance's running mean losses)."""
        sub = self.submodel(step)
        for i, moe in self.unwrap(model).moe_layers():
            moe.router.update_bias(None if sub.expert_masks is None else sub.expert_masks.get(i))
        balance_logs = self.balance.update() if self.balance else {}
        done = step + 1
        if done % self.config.log_every == 0 or done == self.config.steps:
            return {**self.meter.summary(), **balance_logs}
        return {}

    def state(self) -> dict[str, Any]:
        return {"balance": self.balance.state()} if self.balance else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.balance and "balance" in state:  # absent when branching from a run that summed its losses
            self.balance.load_state(state["balance"])

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        kind = "dense" if self.config.model.is_dense else "moe"
        return save_model(run_dir / "model", model, self.vq, {"step": self.config.steps, "kind": kind,
                                                              "train": self.config.to_dict(), "submodel": None})


def train_unified(config: UnifiedTrainConfig, progress: bool = False) -> dict[str, Any]:
    """Train the unified model through the engine; the finished model goes to OUTPUT_DIR/model."""
    return UnifiedTask(config, progress).train()
