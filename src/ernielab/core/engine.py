"""The one training engine: every family trains through `Engine(task).fit()`.

The engine owns the loop and everything around it: optimizer (AdamW over the decay groups the model declares)
and learning-rate schedule, gradient accumulation, clipping, mixed precision and data parallelism through
accelerate (FSDP2 sharding through torch's `fully_shard`, core/sharding.py), EMA, logging to metrics.jsonl, the step and time budget, checkpoint save/resume of every state the
task lists, the run-folder lock, and the replica check. It knows nothing about objectives: a family supplies
a `Task` (its modules, a batch for a step, a loss with logs, optional after-step hooks and an export), as
torchtitan's Trainer lets a model family override one method.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ernielab.core import sharding
from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, remove_tree, save_checkpoint
from ernielab.core.config import Config, bounded
from ernielab.core.ema import EMA
from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor

# Settings that may differ when a run is resumed: they change how long or how visibly it runs, not what it learns.
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "keep_checkpoints", "max_minutes", "eval_every",
                     "num_workers", "output_dir", "resume", "threads", "branch_from"}


@dataclasses.dataclass
class EngineSettings(Config):
    """The engine's fields; every family's training config inherits them (and may change their defaults)."""

    output_dir: str = "runs/default"
    steps: int = bounded(1000, ge=1)
    batch_size: int = bounded(32, ge=1)  # per process, per micro-step
    grad_accum: int = bounded(1, ge=1)
    lr: float = bounded(3e-4, gt=0)
    warmup_steps: int = bounded(100, ge=0)
    lr_schedule: str = bounded("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    grad_clip: float = bounded(1.0, ge=0)  # 0 = no clipping
    mixed_precision: str = bounded("no", choices=("no", "bf16", "fp16"))
    ema_decay: float = bounded(0.0, ge=0, lt=1)  # 0 = no EMA
    seed: int = 0
    log_every: int = bounded(20, ge=1)
    eval_every: int = bounded(0, ge=0)  # 0 = only at the end (if the task evaluates)
    save_every: int = bounded(500, ge=1)
    keep_checkpoints: int = bounded(2, ge=1)
    max_minutes: float = bounded(0.0, ge=0)  # > 0: save and stop after this wall time, exporting nothing
    resume: str = "auto"  # "auto": latest checkpoint in output_dir; "": start fresh (clears the run); or a path
    branch_from: str = ""  # a new run continues another run's checkpoint (settings may differ; recorded in metrics)
    fsdp: bool = False  # >1 process: shard weights, gradients and optimizer state (FSDP2) instead of replicating


class RunInUse(ValueError):
    """Another process is writing the run folder (a user error: one line, exit 2)."""


class RunLock:
    """An exclusive lock on a run folder for as long as a process writes it (released if the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.file = None
        self.created = not run_dir.exists()

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise RunInUse(f"run folder {self.path.parent} is in use by another process (pid {holder})") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if self.created and [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
            self.path.unlink()  # a run refused before it wrote anything leaves no folder behind
            self.path.parent.rmdir()


class Task:
    """What a family gives the engine. `build` creates the modules; `batch` and `loss` are required."""

    config: EngineSettings
    engine: Engine  # set by the engine before `build`
    resumable_changes: frozenset[str] = frozenset()  # the task's own fields that may change on resume
    find_unused_parameters = False  # DDP: True when a step may leave parameters without gradients (routed experts)
    shardable = False  # the task's hooks work on an FSDP2-sharded model (they never read its weights directly)

    def build(self) -> dict[str, nn.Module]:
        """Create the modules (on `self.engine.device`); "model" is the one optimised, EMA'd and shipped.
        Others (a fake score, a head) are saved and resumed with it."""
        raise NotImplementedError

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """With fsdp: the submodules sharded one by one (each gathered only while it runs): the blocks."""
        return sharding.default_units(model)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Decay groups, as the model declares them (nanoGPT's configure_optimizers)."""
        if hasattr(model, "param_groups"):
            return model.param_groups(self.config.weight_decay)
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def batch(self, step: int, micro: int) -> Any:
        """Micro-batch `micro` of optimizer step `step`: a function of (seed, step, micro, rank) alone, so a
        resumed run draws exactly what an uninterrupted one would."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """After optimizer step `step` (e.g. DMD's fake-score updates, an MoE router's bias); returns logs. What it
        needs of the step's batch, the task keeps from `loss`."""
        return {}

    def state(self) -> dict[str, Any]:
        """Resumable state beyond the modules (e.g. an auxiliary optimizer): nested tensors/numbers/text."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def init_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A fresh run's optimizer before its first step (e.g. continue an earlier run's Adam moments); not
        called when the run resumes (the checkpoint's optimizer state is loaded instead)."""

    def make_ema(self, model: nn.Module) -> EMA:
        return EMA(model, self.config.ema_decay)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {}

    def export(self, model: nn.Module, run_dir: Path) -> Path | None:
        """Write what the run ships (the EMA weights when kept) and return where."""
        return None


def config_changes(saved: dict, current: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted names of fields whose values differ (compared as JSON). A field the saved run did not have (it was
    added to ernielab later) counts as unchanged while the current value is that field's default."""
    changed = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        a = saved[key] if key in saved else defaults.get(key, current.get(key))
        b = current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, defaults.get(key) if isinstance(defaults.get(key), dict) else {},
                                      f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            changed.append(f"{prefix}{key}")
    return changed


class Engine:
    def __init__(self, task: Task, accelerator=None):
        self.task, self.config = task, task.config
        self.config.validate()
        self.run_dir = Path(self.config.output_dir)
        self.accelerator = accelerator
        self.branched: dict | None = None  # set when the run starts from another run's checkpoint
        self.metrics: MetricsLog | None = None  # the main process's metrics.jsonl
        self.template: nn.Module | None = None  # with fsdp: the unsharded model's shell (weights on "meta")
        task.engine = self

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def sharded(self) -> bool:
        return self.config.fsdp and self.accelerator.num_processes > 1

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        from contextlib import nullcontext

        from accelerate import Accelerator

        cfg = self.config
        if self.accelerator is None:
            from accelerate.utils import DistributedDataParallelKwargs

            unused = self.task.find_unused_parameters
            self.accelerator = Accelerator(
                mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                cpu=not torch.cuda.is_available(),
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else [])
        with RunLock(self.run_dir) if self.accelerator.is_main_process else nullcontext():
            return self._fit()

    def _fit(self) -> dict:
        cfg, task, acc = self.config, self.task, self.accelerator
        if self.sharded and not task.shardable:
            raise ValueError(f"fsdp: {type(task).__name__} does not support sharded training; set fsdp false")
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        modules = task.build()
        checkpoint = self.checkpoint_to_resume()
        if self.sharded:  # weights are loaded whole, then sharded; the optimizer is built over the shards
            if checkpoint:
                modules["model"].load_state_dict(checkpoint["modules"]["model"])
            self.template = sharding.meta_copy(modules["model"])
            sharding.shard(modules["model"], task.shard_units(modules["model"]), cfg.mixed_precision)
        ema = task.make_ema(modules["model"]) if cfg.ema_decay > 0 else None
        opt = torch.optim.AdamW(task.param_groups(modules["model"]), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio))
        if checkpoint:
            step = self.restore(checkpoint, modules, ema, opt, sched)
        else:
            step = 0
            task.init_optimizer(opt)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "train_config.json")
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", step) if acc.is_main_process else None
        if self.branched:
            self.log(self.branched)
        if self.sharded:  # fully_shard already syncs gradients; accelerate would wrap it in DDP
            wrapped, opt = modules["model"], acc.prepare(opt)
        else:
            wrapped, opt = acc.prepare(modules["model"], opt)
        t0 = time.time()
        step, stopped = self.loop(wrapped, opt, sched, modules, ema, step, t0)
        return self.finish(acc.unwrap_model(wrapped), ema, step, stopped, t0)

    def loop(self, model: nn.Module, opt, sched, modules: dict[str, nn.Module], ema: EMA | None, step: int,
             t0: float) -> tuple[int, str | None]:
        """Optimizer steps until `steps` or the time limit; -> (last step, why it stopped early or None)."""
        cfg, acc = self.config, self.accelerator
        bar = tqdm(total=cfg.steps, initial=step, disable=not acc.is_local_main_process, desc="train")
        window: list[dict[str, float]] = []
        samples, last_log, stopped = 0, time.time(), None
        model.train()
        while step < cfg.steps:
            logs = self.optimizer_step(model, opt, step)
            samples += logs.pop("_samples", 0) * acc.num_processes
            step += 1
            sched.step()
            if ema is not None:
                ema.update(acc.unwrap_model(model), step)
            logs.update(self.task.after_step(model, step - 1))
            window.append(logs)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {**self.reduce_logs(window), "step": step, "lr": sched.get_last_lr()[0],
                          "samples_per_s": samples / (time.time() - last_log), "elapsed_s": time.time() - t0}
                self.log(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "samples_per_s")})
                window, samples, last_log = [], 0, time.time()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                self.log_eval(model, step)
            out_of_time = self.out_of_time(t0)
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                self.save(step, modules, ema, opt, sched)
            if out_of_time:
                stopped = f"time limit of {cfg.max_minutes} min reached at step {step} of {cfg.steps}"
                break
        bar.close()
        return step, stopped

    def finish(self, model: nn.Module, ema: EMA | None, step: int, stopped: str | None, t0: float) -> dict:
        """Replica check; a finished run evaluates and exports what it ships, a stopped one nothing."""
        acc = self.accelerator
        if self.sharded:  # from here on an ordinary module: the replica check, evaluation and export need one
            model, ema = self.gathered(model, ema)
        in_sync = self.replicas_in_sync(model)
        self.log({"step": step, "done": stopped is None, "world_size": acc.num_processes, "replicas_in_sync": in_sync,
                  **({"sharded": True} if self.sharded else {}), **({"stopped": stopped} if stopped else {})})
        if not in_sync:
            raise RuntimeError("model replicas diverged across processes (gradients were not synchronised)")
        result = {"step": step, "elapsed_s": time.time() - t0, "stopped": stopped, "exported": None}
        if stopped is None:
            shipped = self.shipped_model(model, ema)
            result["eval"] = self.log_eval(shipped, step)
            if acc.is_main_process:
                exported = self.task.export(shipped, self.run_dir)
                result["exported"] = str(exported) if exported else None
        acc.wait_for_everyone()
        return result

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def optimizer_step(self, model: nn.Module, opt, step: int) -> dict[str, float]:
        """grad_accum micro-batches, clipped, one optimizer step; -> the micro-batches' mean logs."""
        cfg, acc = self.config, self.accelerator
        logs: list[dict[str, float]] = []
        samples = 0
        for micro in range(cfg.grad_accum):
            with acc.accumulate(model):
                batch = self.task.batch(step, micro)
                loss, extra = self.task.loss(model, batch, step)
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            samples += batch_size(batch)
            logs.append({"loss": loss.detach().float().item(), **extra})
        mean = {k: sum(r[k] for r in logs) / len(logs) for k in logs[0]}
        return {**mean, "_samples": samples}

    def reduce_logs(self, window: list[dict[str, float]]) -> dict[str, float]:
        """Means over the window, averaged across processes."""
        keys = sorted(set().union(*window))
        local = torch.tensor([sum(r.get(k, 0.0) for r in window) / max(1, sum(k in r for r in window)) for k in keys],
                             dtype=torch.float64, device=self.device)
        means = self.accelerator.reduce(local, "mean") if self.accelerator.num_processes > 1 else local
        return {k: float(v) for k, v in zip(keys, means.tolist())}

    def log_eval(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            result = self.task.evaluate(model, step)
        model.train()
        if result:
            self.log({"step": step, "eval": result})
        return result

    def out_of_time(self, t0: float) -> bool:
        """`max_minutes` reached on any process (all ranks must stop at the same step)."""
        late = self.config.max_minutes > 0 and time.time() - t0 > 60 * self.config.max_minutes
        return bool(self.accelerator.reduce(torch.tensor([float(late)], device=self.device), "max").item())

    def replicas_in_sync(self, model: nn.Module) -> bool:
        """Data-parallel replicas must hold bit-identical weights; compare a checksum across processes."""
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        sums = self.accelerator.gather(checksum.to(self.device))
        return bool((sums == sums[0]).all())

    def gathered(self, model: nn.Module, ema: EMA | None) -> tuple[nn.Module, EMA | None]:
        """The sharded model's and EMA's full weights on every process (collectives)."""
        plain = sharding.unsharded(self.template, model, self.device)
        if ema is not None:
            ema.shadow = {k: sharding.full_tensor(v) for k, v in ema.shadow.items()}
        return plain, ema

    def shipped_model(self, model: nn.Module, ema: EMA | None) -> nn.Module:
        """The weights to ship: the EMA when kept, else the raw model (never the one still training)."""
        import copy

        shipped = copy.deepcopy(model)
        if ema is not None:
            ema.copy_to(shipped)
        return shipped.eval()

    # ---- persistence -------------------------------------------------------------------------------
    def checkpoint_to_resume(self) -> dict | None:
        """The checkpoint this run continues, checked against the config; `resume=""` clears the run folder.

        A run folder's own checkpoint must have been trained with the same settings (but for RESUMABLE_CHANGES). A
        run with no checkpoint of its own may start from another run's (`branch_from`): weights, optimizer and step
        carry over, settings may differ, and the differences are written to metrics.jsonl."""
        cfg = self.config
        if not cfg.resume:
            if self.accelerator.is_main_process:
                for name in ("checkpoints", "metrics.jsonl", "train_config.json"):
                    target = self.run_dir / name
                    remove_tree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.accelerator.wait_for_everyone()
        path = None
        if cfg.resume:
            path = latest_checkpoint(self.run_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if path is not None:
            checkpoint = load_checkpoint(path)
            changed = self.changed_settings(checkpoint)
            if changed:
                raise ValueError(f"cannot resume {path}: it was trained with other settings ({', '.join(changed[:5])}); "
                                 f"use the same settings, --fresh to start over, or a new output_dir")
        elif cfg.branch_from:
            checkpoint = load_checkpoint(cfg.branch_from)
            self.branched = {"step": checkpoint["step"], "branched_from": str(cfg.branch_from),
                             "changed": self.changed_settings(checkpoint)}
        else:
            return None
        if checkpoint["step"] > cfg.steps:
            raise ValueError(f"cannot continue {checkpoint['path']}: it is at step {checkpoint['step']}, past "
                             f"steps={cfg.steps}")
        return checkpoint

    def changed_settings(self, checkpoint: dict) -> list[str]:
        """Settings that differ from the checkpoint's and matter to what is learned (dotted names)."""
        try:  # a field the checkpoint lacks stands for its default
            defaults = type(self.config)().to_dict()
        except (TypeError, ValueError):
            defaults = {}
        allowed = RESUMABLE_CHANGES | self.task.resumable_changes
        return [k for k in config_changes(checkpoint["config"], self.config.to_dict(), defaults) if k not in allowed]

    def restore(self, checkpoint: dict, modules: dict[str, nn.Module], ema: EMA | None, opt, sched) -> int:
        missing = [name for name in modules if name not in checkpoint["modules"]]
        if missing:
            raise ValueError(f"cannot resume from {self.run_dir}: its checkpoint holds no {', '.join(missing)} "
                             f"weights (a checkpoint of another kind of run); use --fresh or a new output_dir")
        for name, module in modules.items():
            if not (self.sharded and name == "model"):  # a sharded model got its weights before sharding
                module.load_state_dict(checkpoint["modules"][name])
        states = checkpoint["states"]
        shapes = list(ema.shadow.values()) if ema is not None else []  # sharded: the DTensor layout to keep
        if ema is not None and "ema" in checkpoint["modules"]:
            ema.load_state_dict(checkpoint["modules"]["ema"])
            if self.sharded:  # each process keeps its shard of the average, like the weights
                ema.shadow = {k: sharding.shard_like(v, like) for (k, v), like in zip(ema.shadow.items(), shapes)}
        if self.sharded:
            sharding.load_optimizer_state(modules["model"], opt, states["optimizer"])
        else:
            opt.load_state_dict(states["optimizer"])
        sched.load_state_dict(states["scheduler"])
        self.task.load_state(states.get("task", {}))
        if self.accelerator.is_main_process:
            print(f"resumed from {checkpoint['path']} at step {checkpoint['step']}")
        return checkpoint["step"]

    def save(self, step: int, modules: dict[str, nn.Module], ema: EMA | None, opt, sched) -> None:
        acc = self.accelerator
        if self.sharded:  # every process joins the gathers; the main one writes the same files as unsharded runs
            gathered = {"model": sharding.full_model_state(modules["model"]),
                        "optimizer": sharding.full_optimizer_state(modules["model"], getattr(opt, "optimizer", opt)),
                        "ema": None if ema is None else {k: sharding.full_tensor(v) for k, v in ema.state_dict().items()}}
        if acc.is_main_process:
            tensors = {name: gathered["model"] if self.sharded and name == "model" else acc.unwrap_model(m).state_dict()
                       for name, m in modules.items()}
            if ema is not None:
                tensors["ema"] = gathered["ema"] if self.sharded else ema.state_dict()
            optimizer = gathered["optimizer"] if self.sharded else opt.state_dict()
            states = {"optimizer": optimizer, "scheduler": sched.state_dict(), "task": self.task.state()}
            save_checkpoint(self.run_dir, step, tensors, states, self.config.to_dict(), self.config.keep_checkpoints)
        acc.wait_for_everyone()


def batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first list or tensor (dicts), or of the batch itself."""
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, (list, torch.Tensor)):
                return len(value)
        return 0
    return len(batch) if hasattr(batch, "__len__") else 0
