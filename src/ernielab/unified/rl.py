"""RL post-training of the unified model on verifiable shapes-world rewards (our reading of ERNIE 5.0's recipe).

Rewards are checked, not learned: a generated image earns 1 when the alignment checker finds every fact of
its prompt (colour, shape, count, relation), a sampled caption 1 when the checker finds it true of its image.
Each step draws `batch_size` scenes of the training split; every prompt is sampled `group_size` times and a
sample's advantage is its reward minus its group's mean (GRPO's group baseline, no value network).

The four parts the report names, as implemented here (the report gives the ideas, not every formula):
- **Unbiased replay buffer.** A rollout batch is generated whole and trained on for `reuse` optimizer steps in
  the order it was made, every group included: nothing is dropped or re-weighted by difficulty or length, so
  the training distribution is the sampling distribution (asynchronous buffers that train first on the
  rollouts that finish first are biased toward short ones). Steps after the first are off-policy, corrected
  by importance ratios; the buffer is part of the resumable state.
- **Multi-granularity importance-sampling clipping.** Per token, PPO's clipped ratio pi/pi_old (clip_token);
  per sequence, a sample whose geometric-mean ratio leaves [1 - clip_sequence, 1 + clip_sequence] is masked
  whole, so one drifting sequence cannot steer the update through tokens that are individually in range.
- **Well-learned positive-sample mask.** A sample with positive advantage whose mean token probability under
  the behaviour policy already exceeds `positive_mask_prob` adds nothing but sharpening; it is masked
  (keeps entropy from collapsing onto what the model already does reliably).
- **Annealed hints.** Hard prompts get part of the answer: the first rows of the true image's codes (t2i) or
  the first words of its true caption (i2t), a share that falls linearly from `hint_fraction` to 0 over
  `hint_steps`. Hinted tokens are given, not sampled, and carry no gradient.
An optional k3 KL penalty to the starting model (`kl_weight`) anchors what RL does not reward.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ernielab.core.config import bounded
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.images import to_uint8
from ernielab.core.seeding import generator
from ernielab.unified.evaluation import caption_accuracy, caption_correct, heldout, image_alignment
from ernielab.unified.io import load_model, save_model
from ernielab.unified.model import IGNORE, UnifiedTransformer
from ernielab.unified.sequences import collate, image_to_text_sequence, model_inputs, text_to_image_sequence
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer
from ernielab.worlds.alignment import check
from ernielab.worlds.shapes import caption, render, sample_item_scene

RL_TASKS = ("t2i", "i2t")


@dataclasses.dataclass
class UnifiedRLConfig(EngineSettings):
    output_dir: str = "runs/unified/rl"  # the post-trained model goes to OUTPUT_DIR/model
    init_from: str = "runs/unified/moe/model"  # a unified model folder (`ernielab unified train` exports one)
    tasks: tuple[str, ...] = RL_TASKS
    steps: int = bounded(200, ge=1)
    batch_size: int = bounded(8, ge=1)  # prompts (scenes) per rollout batch and task
    group_size: int = bounded(4, ge=2)  # samples per prompt; the group mean is the baseline
    temperature: float = bounded(1.0, gt=0)  # the policy trained is softmax(logits / temperature)
    reuse: int = bounded(2, ge=1)  # optimizer steps per rollout batch (after the first: off-policy)
    clip_token: float = bounded(0.2, gt=0, lt=1)
    clip_sequence: float = bounded(0.3, gt=0)
    positive_mask_prob: float = bounded(0.9, gt=0, le=1)  # 1 = no mask
    hint_fraction: float = bounded(0.5, ge=0, le=1)  # share of the answer given at step 0 to all-wrong groups
    hint_steps: int = bounded(100, ge=0)  # the share reaches 0 here
    kl_weight: float = bounded(0.0, ge=0)
    lr: float = bounded(1e-4, gt=0)
    warmup_steps: int = bounded(10, ge=0)
    weight_decay: float = bounded(0.0, ge=0)
    log_every: int = bounded(10, ge=1)
    save_every: int = bounded(50, ge=1)
    keep_checkpoints: int = bounded(1, ge=1)
    eval_per_kind: int = bounded(50, ge=1)  # final image alignment: prompts per scene kind
    eval_captions: int = bounded(200, ge=1)  # final caption accuracy: held-out images
    eval_guidance: float = bounded(3.0, ge=0)

    def check(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not set(self.tasks) <= set(RL_TASKS):
            raise ValueError(f"tasks must be distinct names from {list(RL_TASKS)}, got {list(self.tasks)}")
        if self.grad_accum != 1:
            raise ValueError("grad_accum must be 1 (a step's rollouts are one batch)")


# ---- rollouts ----------------------------------------------------------------------------------
def token_logprobs(model: UnifiedTransformer, batch: dict[str, torch.Tensor], kind: str,
                   temperature: float) -> torch.Tensor:
    """log pi(target) at every target position of `kind` ("text" / "image"), 0 elsewhere: [B, S]."""
    h = model(**model_inputs(batch))
    targets = batch[f"{kind}_target"]
    sel = targets != IGNORE
    logits = (model.text_logits(h[sel]) if kind == "text" else model.image_logits(h[sel])).float() / temperature
    out = torch.zeros(targets.shape, device=h.device)
    out[sel] = logits.log_softmax(-1).gather(-1, targets[sel][:, None]).squeeze(-1)
    return out


def _draw(logits: torch.Tensor, temperature: float, g: torch.Generator) -> torch.Tensor:
    probs = (logits.float() / temperature).softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).view(probs.shape[:-1])


@torch.no_grad()
def sample_images(model: UnifiedTransformer, prompts: list[list[int]], hints: torch.Tensor, hint_rows: list[int],
                  temperature: float, g: torch.Generator) -> torch.Tensor:
    """Image codes [B, grid, grid]: rows below hint_rows[b] copied from hints, the rest sampled row by row."""
    grid = model.config.image_grid
    codes = hints.clone()
    device = next(model.parameters()).device
    for r in range(min(hint_rows), grid):
        batch = {k: v.to(device) for k, v in collate([text_to_image_sequence(p, c) for p, c in
                                                      zip(prompts, codes)]).items()}
        h = model(**model_inputs(batch))
        block = (batch["image_target"] != IGNORE).nonzero()  # every row's positions, in order
        logits = model.image_logits(h[block[:, 0], block[:, 1]]).view(len(prompts), grid, grid, -1)[:, r]
        row = _draw(logits, temperature, g).cpu()
        keep = torch.tensor([r < n for n in hint_rows])
        codes[:, r] = torch.where(keep[:, None], codes[:, r], row)
    return codes


@torch.no_grad()
def sample_captions(model: UnifiedTransformer, codes: torch.Tensor, hints: list[list[int]], max_len: int,
                    temperature: float, g: torch.Generator) -> list[list[int]]:
    """Captions [BOS, ..., EOS] of image codes: each starts with BOS + its hint words, then sampled to EOS."""
    device = next(model.parameters()).device
    grid = model.config.image_grid
    image_len = grid * (grid + 1)  # the start block and every row come before the caption
    texts = [[BOS, *h] for h in hints]
    done = [False] * len(texts)
    while not all(done):
        batch = {k: v.to(device) for k, v in collate([image_to_text_sequence(c, t) for c, t in
                                                      zip(codes, texts)]).items()}
        h = model(**model_inputs(batch))
        last = torch.tensor([image_len + len(t) - 1 for t in texts], device=device)
        words = _draw(model.text_logits(h[torch.arange(len(texts), device=device), last]), temperature, g)
        for i, word in enumerate(words.tolist()):
            if not done[i]:
                texts[i].append(word)
                done[i] = word == EOS or len(texts[i]) >= max_len
    return [t if t[-1] == EOS else t + [EOS] for t in texts]


def hint_share(cfg: UnifiedRLConfig, step: int) -> float:
    """The share of the answer given to all-wrong groups at `step` (linear anneal to 0)."""
    if cfg.hint_steps == 0:
        return 0.0
    return cfg.hint_fraction * max(0.0, 1.0 - step / cfg.hint_steps)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reward minus its group's mean (groups are consecutive); no division by the spread, so a group that
    is almost solved does not have its few failures blown up."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


# ---- the task ------------------------------------------------------------------------------------
class UnifiedRLTask(Task):
    """Rollouts on the current policy, checked rewards, a clipped importance-weighted policy gradient."""

    def __init__(self, config: UnifiedRLConfig, accelerator=None):
        config.validate()
        self.config, self.accelerator = config, accelerator
        self.start, self.vq, self.meta = load_model(config.init_from)
        if self.start.config.image_order != "rows":  # rollouts sample images row by row
            raise ValueError(f"init_from {config.init_from}: RL post-trains row-ordered models; this one has "
                             f"image_order {self.start.config.image_order!r}")
        self.tok = TextTokenizer(self.start.config.text_vocab)
        self.model: UnifiedTransformer | None = None
        self.reference: UnifiedTransformer | None = None
        self.buffer: dict[str, Any] = {}  # {"step": made at, task: rollouts}; resumable state

    def train(self) -> dict:
        return Engine(self, self.accelerator).fit()

    def build(self) -> dict[str, nn.Module]:
        if self.engine.accelerator.num_processes > 1:
            raise ValueError("unified RL runs on one process; launch it without accelerate/torchrun")
        device = self.engine.device
        self.vq.to(device)
        self.model = copy.deepcopy(self.start).to(device).train()
        if self.config.kl_weight > 0:
            self.reference = self.start.to(device).eval().requires_grad_(False)
        return {"model": self.model}

    def param_groups(self, model: nn.Module) -> list[dict]:
        return model.param_groups(self.config.weight_decay)

    # ---- rollouts ----
    def scenes(self, step: int) -> list:
        g = generator("unified-rl-scenes", self.config.seed, step)
        index = torch.randint(0, 1 << 30, (self.config.batch_size,), generator=g).tolist()
        return [sample_item_scene(self.config.seed, "train", i, self.vq.config.image_size) for i in index]

    def batch(self, step: int, micro: int) -> dict[str, Any]:
        cfg = self.config
        made = step - step % cfg.reuse
        if self.buffer.get("step") != made:
            self.model.eval()
            self.buffer = {"step": made, **{task: self.rollouts(task, made) for task in cfg.tasks}}
            self.model.train()
        rewards = torch.cat([self.buffer[task]["reward"] for task in cfg.tasks])  # one per sample: samples_per_s
        return {"rewards": rewards, "tasks": {task: self.buffer[task] for task in cfg.tasks}}

    def rollouts(self, task: str, step: int) -> dict[str, Any]:
        """One task's rollout batch: sequences, behaviour log-probs, rewards, advantages and masks."""
        cfg, grid = self.config, self.model.config.image_grid
        g = generator("unified-rl-sample", cfg.seed, step, task)
        scenes = self.scenes(step)
        prompts = [caption(scene, rng) for scene, rng in scenes]
        texts = [self.tok.encode(p) for p in prompts]
        truth = torch.stack([torch.from_numpy(render(scene)).permute(2, 0, 1) for scene, _ in scenes])
        with torch.no_grad():
            codes = self.vq.encode(truth.float().div(127.5).sub(1).to(self.engine.device)).cpu()
        repeat = [i for i in range(len(scenes)) for _ in range(cfg.group_size)]
        hints = [0] * len(repeat)
        samples, rewards = self.sample(task, prompts, texts, codes, truth, repeat, hints, g)
        share = hint_share(cfg, step)
        hard = [j for j in range(0, len(repeat), cfg.group_size) if not rewards[j: j + cfg.group_size].any()]
        if share > 0 and hard:  # all-wrong groups try again with part of the answer given
            for j in hard:
                for k in range(j, j + cfg.group_size):
                    length = grid if task == "t2i" else len(texts[repeat[k]]) - 2
                    hints[k] = int(round(share * length))
            again = [k for j in hard for k in range(j, j + cfg.group_size)]
            redo, redo_rewards = self.sample(task, prompts, texts, codes, truth, [repeat[k] for k in again],
                                             [hints[k] for k in again], g)
            for n, k in enumerate(again):
                samples[k], rewards[k] = redo[n], redo_rewards[n]
        return self.scored(task, texts, codes, repeat, samples, rewards, hints)

    def sample(self, task, prompts, texts, codes, truth, repeat, hints, g) -> tuple[list, torch.Tensor]:
        """Samples for the prompts `repeat` indexes, with `hints` given; -> (samples, rewards 0/1)."""
        cfg = self.config
        if task == "t2i":
            out = sample_images(self.model, [texts[i] for i in repeat], codes[repeat], hints, cfg.temperature, g)
            with torch.no_grad():
                images = to_uint8(self.vq.decode(out.to(self.engine.device)))
            ok = [bool(check(prompts[i], im)["all"]) for i, im in zip(repeat, images)]
            return list(out), torch.tensor(ok, dtype=torch.float32)
        hint_words = [texts[i][1: 1 + h] for i, h in zip(repeat, hints)]
        out = sample_captions(self.model, codes[repeat], hint_words, self.model.config.max_text_len,
                              cfg.temperature, g)
        truth_u8 = truth.permute(0, 2, 3, 1).numpy()
        ok = [caption_correct(self.tok.decode(ids[1:]), truth_u8[i]) for i, ids in zip(repeat, out)]
        return out, torch.tensor(ok, dtype=torch.float32)

    @torch.no_grad()
    def scored(self, task, texts, codes, repeat, samples, rewards, hints) -> dict[str, Any]:
        cfg, device = self.config, self.engine.device
        if task == "t2i":
            seqs = [text_to_image_sequence(texts[i], c) for i, c in zip(repeat, samples)]
        else:
            seqs = [image_to_text_sequence(codes[i], ids) for i, ids in zip(repeat, samples)]
        batch = collate(seqs)
        kind = "image" if task == "t2i" else "text"
        targets = batch[f"{kind}_target"]
        per_hint = self.model.config.image_grid if task == "t2i" else 1  # a hinted row holds grid codes
        for b, given in enumerate(hints):  # hinted tokens were given, not sampled: no gradient through them
            targets[b, (targets[b] != IGNORE).nonzero()[: given * per_hint]] = IGNORE
        batch = {k: v.to(device) for k, v in batch.items()}
        old = token_logprobs(self.model, batch, kind, cfg.temperature)
        mask = (batch[f"{kind}_target"] != IGNORE).float()
        mean_logp = (old * mask).sum(1) / mask.sum(1).clamp_min(1)
        advantage = group_advantages(rewards, cfg.group_size).to(device)
        well_learned = (advantage > 0) & (mean_logp.exp() > cfg.positive_mask_prob)
        ref = token_logprobs(self.reference, batch, kind, cfg.temperature) if self.reference is not None else None
        return {"batch": batch, "old_logp": old, "advantage": advantage, "well_learned": well_learned,
                "reward": rewards.to(device), "hinted": torch.tensor([h > 0 for h in hints], device=device),
                **({"ref_logp": ref} if ref is not None else {})}

    # ---- the objective ----
    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        net = self.engine.accelerator.unwrap_model(model)
        total, logs = 0.0, {}
        for task, r in batch["tasks"].items():
            task_loss, task_logs = self.policy_loss(net, r, "image" if task == "t2i" else "text")
            total = total + task_loss
            logs.update({f"{task}_{k}": v for k, v in task_logs.items()})
        return total, logs

    def policy_loss(self, net: UnifiedTransformer, r: dict, kind: str) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        logp = token_logprobs(net, r["batch"], kind, cfg.temperature)
        mask = (r["batch"][f"{kind}_target"] != IGNORE).float()
        count = mask.sum(1).clamp_min(1)
        log_ratio = (logp - r["old_logp"]) * mask
        ratio = log_ratio.exp()
        adv = r["advantage"][:, None]
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_token, 1 + cfg.clip_token) * adv)
        sequence_ratio = (log_ratio.sum(1) / count).exp().detach()
        in_range = (sequence_ratio - 1).abs() <= cfg.clip_sequence
        keep = (in_range & ~r["well_learned"]).float()
        loss = -((objective * mask).sum(1) / count * keep).mean()
        logs = {"reward": float(r["reward"].mean()), "token_clipped": float(
            (((ratio - 1).abs() > cfg.clip_token).float() * mask).sum() / mask.sum().clamp_min(1)),
            "sequence_masked": float(1 - in_range.float().mean()), "positive_masked": float(r["well_learned"].float().mean()),
            "hinted": float(r["hinted"].float().mean())}
        if "ref_logp" in r:  # k3 estimator of KL(pi || pi_ref), per token
            d = (r["ref_logp"] - logp) * mask
            kl = ((d.exp() - d - 1) * mask).sum(1) / count
            loss = loss + cfg.kl_weight * kl.mean()
            logs["kl"] = float(kl.detach().mean())
        return loss, logs

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """The routers keep their auxiliary-loss-free balancing, as in pre-training."""
        for _, moe in self.engine.accelerator.unwrap_model(model).moe_layers():
            moe.router.update_bias(None)
        return {}

    # ---- state, evaluation, export ----
    def state(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def load_state(self, state: dict[str, Any]) -> None:
        device = self.engine.device
        self.buffer = _to_device(state.get("buffer", {}), device)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        cfg, net = self.config, self.engine.accelerator.unwrap_model(model)
        images, _ = heldout(cfg.eval_captions, self.vq.config.image_size, cfg.seed)
        captions = caption_accuracy(net, self.vq, self.tok, images.to(self.engine.device))
        alignment, _, _ = image_alignment(net, self.vq, self.tok, cfg.eval_per_kind, seed=cfg.seed,
                                          guidance=cfg.eval_guidance)
        return {"caption_accuracy": captions["accuracy"], "image_alignment": alignment["all"],
                **{f"image_alignment_{k}": v for k, v in alignment["by_kind"].items()}}

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        meta = {**self.meta, "rl": self.config.to_dict(), "rl_from": str(self.config.init_from)}
        return save_model(run_dir / "model", model, self.vq, meta)


def _to_device(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def train_rl(config: UnifiedRLConfig) -> dict[str, Any]:
    """RL post-training through the engine; the result goes to OUTPUT_DIR/model."""
    return UnifiedRLTask(config).train()
