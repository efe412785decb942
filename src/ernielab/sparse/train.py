"""Training and evaluation of the long-sequence classifiers (dense / BigBird / HST / HST+SAR), run by the core engine.

`SparseTask` gives the engine the classifier, the batch of a step and the (SAR) loss; the engine owns the loop,
optimizer, schedule, logging, checkpoints and resume. Determinism: the batch of step k is a function of
(seed, k) (`BatchPlan`) and dropout is re-seeded from (seed, k), so a resumed run reproduces an uninterrupted one
bit for bit, and a run reproduces the hand-written loop this replaced (same initial weights, batches, dropout
masks, optimizer and schedule).

A run folder holds the engine's `train_config.json`, `metrics.jsonl` and `checkpoints/step-*/`, plus:
- `best/`: the model of the highest validation accuracy so far (`config.json`, `model.safetensors` and
  `best.json` with its step and accuracy; the earliest step wins a tie; it survives a resume);
- `model/`: the model at the end of the budget (same layout), written when the run finishes;
- `results.json`: the final validation and test metrics.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, remove_tree
from ernielab.core.config import bounded
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.persistence import CONFIG_NAME, WEIGHTS_NAME, load_checked, save_model_folder
from ernielab.core.seeding import derive_seed, generator
from ernielab.sparse.config import SparseClassifierConfig
from ernielab.sparse.lra import SequenceDataset, SparseDataConfig, collate_sequences, ensure_data, load_task, split_exists
from ernielab.sparse.model import SparseClassifier
from ernielab.sparse.sar import classification_loss

BEST_DIR = "best"  # output_dir/best: the model of the highest validation accuracy so far
BEST_FILE = "best.json"
EXPORT_DIR = "model"  # output_dir/model: the model at the end of the budget
RESULTS_FILE = "results.json"


@dataclasses.dataclass
class SparseTrainConfig(EngineSettings):
    """What a run learns from (data), what it trains (model) and how (the engine's fields, with this family's
    defaults). `output_dir` may contain `{seed}`, replaced by the training seed: one config serves every seed."""

    model: SparseClassifierConfig = dataclasses.field(default_factory=SparseClassifierConfig)
    data: SparseDataConfig = dataclasses.field(default_factory=SparseDataConfig)
    output_dir: str = "runs/sparse"
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    lr_schedule: str = bounded("cosine", choices=("constant", "cosine"))
    eval_every: int = bounded(200, ge=0)  # validation accuracy (and the best model) every this many steps
    save_every: int = bounded(200, ge=1)
    keep_checkpoints: int = bounded(1, ge=1)
    eval_batch_size: int = bounded(64, ge=1)
    eval_max_batches: int = bounded(0, ge=0)  # 0 = the whole validation split


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
    device = next(model.parameters()).device
    order = sorted(range(len(ds)), key=lambda i: len(ds.sequences[i]))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches > 0:
        chunks = chunks[:max_batches]
    correct, loss_sum, count = 0, 0.0, 0
    for chunk in tqdm(chunks, desc="eval", disable=not progress, leave=False):
        tokens, labels = (t.to(device) for t in collate_sequences([ds[i] for i in chunk]))
        logits = model(tokens, topology=topology).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        count += len(chunk)
    model.train(was_training)
    return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count), "count": count}


def save_model(model: torch.nn.Module, cfg: SparseClassifierConfig, path: Path, info: dict | None = None) -> Path:
    """A model folder (config.json + model.safetensors [+ best.json]), written beside and renamed into place."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(model, cfg, tmp)
    if info is not None:
        (tmp / BEST_FILE).write_text(json.dumps(info, indent=1) + "\n")
    remove_tree(path)
    tmp.rename(path)
    return path


class SparseTask(Task):
    """Classification of token sequences, with SAR when the model's `sar_alpha` > 0."""

    resumable_changes = frozenset({"eval_batch_size", "eval_max_batches"})  # how evaluation is batched

    def __init__(self, config: SparseTrainConfig, progress: bool = True):
        """Checks the config and the data before anything is written to the run folder (missing generated data
        is made first, in the data folder)."""
        config.validate()
        data, model_cfg = config.data, config.model
        ensure_data(data, progress)
        self.train_ds, labels = load_task(data.task, data.path, "train", model_cfg.max_len, data.labels or None)
        if labels is not None and list(labels) != data.labels:  # text: the run's config names its classes
            config = config.replace(data=data.replace(labels=list(labels)))
        check_compatible(model_cfg, self.train_ds, "training")
        self.val_ds = None
        if split_exists(data.task, data.path, "val"):
            self.val_ds = load_task(data.task, data.path, "val", model_cfg.max_len, labels)[0]
            check_compatible(model_cfg, self.val_ds, "validation")
        if len(self.train_ds) < config.batch_size:
            raise ValueError(f"training split has {len(self.train_ds)} examples, fewer than batch_size "
                             f"{config.batch_size}")
        self.config = config
        self.plan = BatchPlan([len(seq) for seq in self.train_ds.sequences], config.batch_size, config.seed)
        self.best_accuracy, self.best_step = -1.0, 0
        self.shipped: SparseClassifier | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    def build(self) -> dict[str, torch.nn.Module]:
        if not self.config.resume and self.engine.accelerator.is_main_process:
            remove_tree(self.run_dir / BEST_DIR)  # a fresh start: the old run's best model goes with its checkpoints
        torch.manual_seed(derive_seed("init", self.config.seed))
        return {"model": SparseClassifier(self.config.model).to(self.engine.device)}

    def batch(self, step: int, micro: int) -> dict[str, Any]:
        acc = self.engine.accelerator
        k = (step * self.config.grad_accum + micro) * acc.num_processes + acc.process_index  # = step on one process
        tokens, labels = collate_sequences([self.train_ds[i] for i in self.plan(k)])
        return {"tokens": tokens.to(acc.device), "labels": labels.to(acc.device), "k": k}

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(derive_seed("dropout", self.config.seed, batch["k"]))
        return classification_loss(model, batch["tokens"], batch["labels"], self.config.model.sar_alpha,
                                   self.config.model.sar_dense_ce)

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Validation accuracy; a new best (strictly higher: the earliest step wins a tie) is saved to best/."""
        if self.val_ds is None:
            return {}
        cfg, acc = self.config, self.engine.accelerator
        metrics = evaluate(model, self.val_ds, cfg.eval_batch_size, max_batches=cfg.eval_max_batches)
        if metrics["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_step = metrics["accuracy"], step
            if acc.is_main_process:
                save_model(acc.unwrap_model(model), cfg.model, self.run_dir / BEST_DIR,
                           {"step": step, "val_accuracy": metrics["accuracy"]})
        return metrics

    def state(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_step": self.best_step}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best_accuracy = float(state.get("best_accuracy", -1.0))
        self.best_step = int(state.get("best_step", 0))

    def export(self, model: torch.nn.Module, run_dir: Path) -> Path:
        self.shipped = model
        return save_model(model, self.config.model, run_dir / EXPORT_DIR)


def resolve_output_dir(config: SparseTrainConfig) -> SparseTrainConfig:
    """`{seed}` in output_dir -> the training seed."""
    if "{seed}" in config.output_dir:
        return config.replace(output_dir=config.output_dir.replace("{seed}", str(config.seed)))
    return config


def train(config: SparseTrainConfig, progress: bool = True, accelerator=None) -> dict[str, Any]:
    """Train through the engine (resuming from output_dir's latest checkpoint); when the run finishes, evaluate
    the final model on the test split (if the data has one) and write results.json. Returns the engine's result
    plus "val" (final validation metrics), "best_val" and "test"."""
    task = SparseTask(resolve_output_dir(config), progress)
    result = Engine(task, accelerator).fit()
    if result["stopped"] is not None or task.shipped is None:  # out of time (or not the main process)
        return result
    cfg, data = task.config, task.config.data
    result["val"] = result.pop("eval", {})
    if task.val_ds is not None:
        result["best_val"] = {"step": task.best_step, "accuracy": task.best_accuracy}
    if split_exists(data.task, data.path, "test"):
        test_ds = load_task(data.task, data.path, "test", cfg.model.max_len, data.labels or None)[0]
        check_compatible(cfg.model, test_ds, "test")
        result["test"] = evaluate(task.shipped, test_ds, cfg.eval_batch_size, progress=progress)
    (task.run_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_model_folder(path: Path) -> tuple[SparseClassifier, SparseClassifierConfig]:
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a sparse-classifier folder ({CONFIG_NAME} / {WEIGHTS_NAME} missing)")
    cfg = SparseClassifierConfig.load(path / CONFIG_NAME, strict=False)
    model = SparseClassifier(cfg)
    load_checked(model, load_file(str(path / WEIGHTS_NAME)), f"sparse classifier ({path})")
    return model.eval(), cfg


def load_trained(run_dir: str | Path, best: bool = False) -> tuple[SparseClassifier, SparseClassifierConfig, int]:
    """(model in eval mode, its config, step) from the latest checkpoint of a run folder (its EMA weights when
    the run keeps one), or with best=True from the model of its highest validation accuracy (best/)."""
    run_dir = Path(run_dir)
    if best:
        folder = run_dir / BEST_DIR
        if not (folder / BEST_FILE).is_file():
            raise FileNotFoundError(f"no best-validation model under {run_dir} (it is saved at each validation; "
                                    f"train with a val split, or check the path)")
        model, cfg = load_model_folder(folder)
        return model, cfg, int(json.loads((folder / BEST_FILE).read_text())["step"])
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir} (train first, or check the path)")
    ckpt = load_checkpoint(path)
    saved = ckpt["config"].get("model")
    if not isinstance(saved, dict) or "attention" not in saved:
        raise ValueError(f"{path} is not a sparse-classifier checkpoint (no model config saved)")
    cfg = SparseClassifierConfig.from_dict(saved, strict=False)  # fields added since then take their defaults
    model = SparseClassifier(cfg)
    state = ckpt["modules"].get("ema") or ckpt["modules"]["model"]
    load_checked(model, state, f"sparse classifier ({path})")
    return model.eval(), cfg, ckpt["step"]
