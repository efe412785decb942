"""Training and evaluation loop for the long-sequence classifiers (dense / BigBird / HST / HST+SAR).

Plain PyTorch on one process: these models are small and CPU-bound, so accelerate would only add
start-up cost. Determinism: the batch of step k is a function of (seed, k) (see BatchPlan), dropout is
re-seeded from (seed, step), so a resumed run reproduces an uninterrupted one bit for bit.
Checkpoints reuse `training.checkpoint` (weights as safetensors, written atomically).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.config import Config
from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed, generator
from ernielab.sparse.config import SparseClassifierConfig
from ernielab.sparse.lra import SequenceDataset, collate_sequences
from ernielab.sparse.model import SparseClassifier
from ernielab.sparse.sar import classification_loss

BEST_DIR = "best"  # run_dir/best: the checkpoint of the highest validation accuracy so far

# fields that may change between a run and its resumption without changing what is learned so far
RESUME_FREE_FIELDS = ("steps", "eval_every", "eval_batch_size", "eval_max_batches", "log_every", "save_every",
                      "keep_checkpoints")


@dataclasses.dataclass
class SparseTrainConfig(Config):
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine" | "constant"
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batch_size: int = 64
    eval_max_batches: int = 0  # 0 = the whole validation split
    log_every: int = 20
    save_every: int = 200
    keep_checkpoints: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")


class BatchPlan:
    """Seeded epoch-wise batches: every example once per epoch (the tail is dropped).

    Examples are shuffled, then sorted by length inside windows of `bucket` batches, and the batches
    shuffled again: batches hold similar lengths (less padding) while their order stays random.
    Batch k depends only on (seed, k), which makes resuming exact.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket: int = 50):
        self.lengths, self.batch_size, self.seed, self.bucket = lengths, batch_size, seed, bucket
        self.per_epoch = len(lengths) // batch_size
        self._epoch, self._batches = -1, []

    def batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=generator("order", self.seed, epoch)).tolist()
        order = order[: self.per_epoch * self.batch_size]
        window = self.bucket * self.batch_size
        ordered = []
        for start in range(0, len(order), window):
            ordered += sorted(order[start: start + window], key=self.lengths.__getitem__)
        batches = [ordered[i: i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=generator("batches", self.seed, epoch)).tolist()
        return [batches[i] for i in shuffle]

    def __call__(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.batches(epoch)
        return self._batches[k]


def check_compatible(model_cfg: SparseClassifierConfig, ds: SequenceDataset, name: str) -> None:
    if ds.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{name} data uses {ds.vocab_size} token ids; "
                         f"the model's vocab_size is {model_cfg.vocab_size}")
    if ds.num_classes != model_cfg.num_classes:
        raise ValueError(f"{name} data has {ds.num_classes} classes; the model has num_classes={model_cfg.num_classes}")


@torch.no_grad()
def evaluate(model: SparseClassifier, ds: SequenceDataset, batch_size: int = 64, topology: str = "sparse",
             max_batches: int = 0, progress: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy; batches are formed from length-sorted examples to cut padding
    (outputs do not depend on padding: every topology masks it)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ds)), key=lambda i: len(ds.sequences[i]))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches > 0:
        chunks = chunks[:max_batches]
    correct, loss_sum, count = 0, 0.0, 0
    for chunk in tqdm(chunks, desc="eval", disable=not progress, leave=False):
        tokens, labels = collate_sequences([ds[i] for i in chunk])
        logits = model(tokens, topology=topology).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += len(chunk)
    model.train(was_training)
    return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count), "count": count}


def build_model(model_cfg: SparseClassifierConfig, seed: int) -> SparseClassifier:
    torch.manual_seed(derive_seed("init", seed))
    return SparseClassifier(model_cfg)


def saved_model_config(saved: dict | None) -> dict | None:
    """A checkpoint's model config with fields added since it was written set to their defaults,
    so runs saved by older versions still resume (the defaults reproduce their behaviour)."""
    if saved is None:
        return None
    try:
        return SparseClassifierConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return saved


def restore(run_dir: Path, model, optimizer, scheduler, model_cfg, train_cfg) -> int:
    """Load the latest checkpoint of run_dir if there is one; refuse one trained with other settings."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if saved_model_config(saved.get("model")) != model_cfg.to_dict():
        raise ValueError(f"checkpoint {path} was trained with a different model config; "
                         f"train into another run directory")
    ours = {k: v for k, v in train_cfg.to_dict().items() if k not in RESUME_FREE_FIELDS}
    theirs = {k: v for k, v in saved.get("train", {}).items() if k not in RESUME_FREE_FIELDS}
    if ours != theirs:
        changed = sorted(k for k in ours if ours.get(k) != theirs.get(k))
        raise ValueError(f"checkpoint {path} was trained with different training settings {changed}; "
                         f"train into another run directory")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optim"]["optimizer"])
    scheduler.load_state_dict(ckpt["optim"]["scheduler"])
    return ckpt["step"]


def best_val_accuracy(run_dir: Path) -> float:
    """Validation accuracy of the run's best checkpoint so far (-1 when none was kept yet)."""
    path = latest_checkpoint(run_dir / BEST_DIR)
    return load_checkpoint(path)["config"]["val_accuracy"] if path else -1.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases, embeddings' position table and prefix tokens are left alone."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("pos_emb", "prefix")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in ("pos_emb", "prefix"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_classifier(
    model_cfg: SparseClassifierConfig,
    train_cfg: SparseTrainConfig,
    train_ds: SequenceDataset,
    val_ds: SequenceDataset | None,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train (resuming from run_dir's latest checkpoint when asked); returns the last metrics.

    stop_at: leave after this step with a checkpoint (the schedule still spans train_cfg.steps), so a
    long run can be split across calls that each resume where the previous one stopped.
    """
    run_dir = Path(run_dir)
    check_compatible(model_cfg, train_ds, "training")
    if val_ds is not None:
        check_compatible(model_cfg, val_ds, "validation")
    if len(train_ds) < train_cfg.batch_size:
        raise ValueError(f"training split has {len(train_ds)} examples, fewer than batch_size {train_cfg.batch_size}")
    model = build_model(model_cfg, train_cfg.seed)
    optimizer = torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train_cfg.steps, train_cfg.warmup_steps, train_cfg.lr_schedule))
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints; resume, or train into a new run directory")
    start = restore(run_dir, model, optimizer, scheduler, model_cfg, train_cfg) if resume else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    model_cfg.save(run_dir / "model_config.json")
    train_cfg.save(run_dir / "train_config.json")
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else -1)
    if start and progress:
        tqdm.write(f"resumed {run_dir} at step {start}")

    plan = BatchPlan([len(seq) for seq in train_ds.sequences], train_cfg.batch_size, train_cfg.seed)
    best_val = best_val_accuracy(run_dir)
    model.train()
    t0, window = time.time(), []
    result: dict[str, Any] = {"step": start}
    bar = tqdm(total=train_cfg.steps, initial=start, desc=f"train {model_cfg.attention}", disable=not progress)
    last = train_cfg.steps if stop_at is None else max(start, min(stop_at, train_cfg.steps))
    for step in range(start, last):
        idx = plan(step)
        tokens, labels = collate_sequences([train_ds[i] for i in idx])
        torch.manual_seed(derive_seed("dropout", train_cfg.seed, step))
        loss, parts = classification_loss(model, tokens, labels, model_cfg.sar_alpha, model_cfg.sar_dense_ce)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        window.append({"loss": loss.item(), **parts})
        done = step + 1
        bar.update(1)
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            record = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[-1]}
            record = {"step": done, **record, "lr": scheduler.get_last_lr()[0], "elapsed_s": time.time() - t0}
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            window = []
        if val_ds is not None and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
            metrics = evaluate(model, val_ds, train_cfg.eval_batch_size, max_batches=train_cfg.eval_max_batches)
            log.write({"step": done, "split": "val", **metrics})
            result["val"] = metrics
            if metrics["accuracy"] > best_val:  # the earliest step wins a tie
                best_val = metrics["accuracy"]
                save_checkpoint(run_dir / BEST_DIR, done, model.state_dict(), None, optimizer, scheduler,
                                {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
                                 "val_accuracy": best_val}, keep=1)
        if done % train_cfg.save_every == 0 or done in (train_cfg.steps, last):
            save_checkpoint(run_dir, done, model.state_dict(), None, optimizer, scheduler,
                            {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()},
                            keep=train_cfg.keep_checkpoints)
        result["step"] = done
    bar.close()
    result["elapsed_s"] = time.time() - t0
    return result


def load_trained(run_dir: str | Path, best: bool = False) -> tuple[SparseClassifier, SparseClassifierConfig, int]:
    """(model in eval mode, its config, step) from the latest checkpoint of a run directory, or with
    best=True from the checkpoint of its highest validation accuracy."""
    run_dir = Path(run_dir)
    path = latest_checkpoint(run_dir / BEST_DIR if best else run_dir)
    if path is None:
        what = "best-validation checkpoint" if best else "checkpoint"
        raise FileNotFoundError(f"no {what} under {run_dir} (train first, or check the path)")
    ckpt = load_checkpoint(path)
    if "model" not in ckpt["config"]:
        raise ValueError(f"{path} is not a sparse-classifier checkpoint (no model config saved)")
    cfg = SparseClassifierConfig.from_dict(ckpt["config"]["model"])
    model = SparseClassifier(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the saved config: {e}") from None
    return model.eval(), cfg, ckpt["step"]
