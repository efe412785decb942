"""Flow-matching trainer for text-to-image transformers, on accelerate.

One code path for 1 CPU process, N CPU processes (gloo) and N GPUs: launch with
`accelerate launch` or `torchrun`. Every random draw is seeded by (seed, step, rank), so a resumed
run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.config import Config
from ernielab.core.ema import EMA
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import generator
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import TIMESTEP_SCALE, add_noise, flow_matching_loss, sample_training_sigmas
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline
from ernielab.image.text_encoder import TextEncoder, TextEncoderConfig
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.worlds.registry import DataConfig, build_dataset, collate


@dataclasses.dataclass
class TrainConfig(Config):
    model: ErnieImageConfig = dataclasses.field(default_factory=ErnieImageConfig.small)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    latent: LatentSpaceConfig = dataclasses.field(default_factory=LatentSpaceConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampling: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)  # defaults saved with the model
    output_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # "constant" | "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # caption replaced by "" so the model learns the unconditional velocity for CFG
    timestep_sampling: str = "logit_normal"
    timestep_shift: float = 1.0
    seed: int = 0
    log_every: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": latest checkpoint in output_dir; "": start fresh; else a checkpoint path
    init_from: str = ""  # fine-tune: start a fresh run from the weights of a pipeline or transformer folder
    max_minutes: float = 0.0  # >0: stop (and save) after this wall time
    num_workers: int = 0
    gradient_checkpointing: bool = False


def pipeline_config(cfg: TrainConfig) -> PipelineConfig:
    """What a trained model ships with: the sampling defaults plus the encoder, latents and size it was trained on."""
    return cfg.sampling.replace(text_encoder=cfg.text_encoder, latent=cfg.latent,
                                height=cfg.data.image_size, width=cfg.data.image_size)


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless batches; batch k of process r is a function of (seed, k, r) alone, so resuming is exact."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start, self.rank = n, batch_size, seed, start, rank

    def __iter__(self):
        k = self.start
        while True:
            g = generator("batch", self.seed, k, self.rank)
            yield torch.randint(self.n, (self.batch_size,), generator=g).tolist()
            k += 1

    def __len__(self):  # endless; DataLoader only needs it for len()
        return 2**62


class Trainer:
    """Override `build_model` / `compute_loss` to train variants (experts, knowledge-enhanced losses)."""

    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator

        self.config = cfg = config
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
            cpu=not torch.cuda.is_available(),
        )
        self.rank = self.accelerator.process_index
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.text_encoder = TextEncoder(cfg.text_encoder)
        self.latent_space = build_latent_space(cfg.latent).to(self.accelerator.device)
        self.check_shapes()
        self.dataset = build_dataset(cfg.data)
        self.model = self.build_model()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    # ---- hooks -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = ErnieImageTransformer(self.config.model)
        model.gradient_checkpointing = self.config.gradient_checkpointing
        if self.config.init_from:
            self.load_initial_weights(model, Path(self.config.init_from))
        return model

    @staticmethod
    def load_initial_weights(model: nn.Module, path: Path) -> None:
        """Weights of a saved pipeline (its transformer/) or transformer folder; the configs must agree."""
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        pretrained = ErnieImageTransformer.from_pretrained(folder)
        if pretrained.config != model.config:
            raise ValueError(f"init_from {path}: its transformer config differs from the training config's model")
        model.load_state_dict(pretrained.state_dict())

    def check_shapes(self) -> None:
        cfg = self.config
        c, _, _ = self.latent_space.latent_shape(cfg.data.image_size, cfg.data.image_size)
        if cfg.model.in_channels != c or cfg.model.out_channels != c:
            raise ValueError(f"model in/out channels ({cfg.model.in_channels}/{cfg.model.out_channels}) must equal "
                             f"the latent channels ({c}) of latent space {cfg.latent.kind!r}")
        if cfg.model.text_in_dim != self.text_encoder.dim:
            raise ValueError(f"model.text_in_dim {cfg.model.text_in_dim} != text encoder dim {self.text_encoder.dim}")

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        return generator("noise", self.config.seed, step, micro, self.rank)

    def prepare_batch(self, batch: dict, g: torch.Generator) -> dict:
        """Latents, noise, noise levels and text features for one micro-batch."""
        cfg, device = self.config, self.accelerator.device
        x0 = self.latent_space.encode(batch["image"].to(device))
        captions = list(batch["caption"])
        drop = torch.rand(len(captions), generator=g) < cfg.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        text, lens = self.text_encoder(captions, device=device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        sigmas = sample_training_sigmas(len(x0), g, cfg.timestep_sampling, cfg.timestep_shift, device)
        return {**batch, "x0": x0, "noise": noise, "sigmas": sigmas, "text": text, "text_lens": lens,
                "captions_used": captions, "dropped": drop}

    def compute_loss(self, model: nn.Module, inputs: dict, step: int) -> torch.Tensor:
        xt = add_noise(inputs["x0"], inputs["noise"], inputs["sigmas"])
        pred = model(xt, inputs["sigmas"] * TIMESTEP_SCALE, inputs["text"], inputs["text_lens"])
        return flow_matching_loss(pred, inputs["x0"], inputs["noise"]).mean()

    # ---- main loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.config, self.accelerator
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
        step = self.maybe_resume(opt, sched)
        model, opt = acc.prepare(self.model, opt)
        loader = DataLoader(self.dataset, collate_fn=collate, num_workers=cfg.num_workers,
                            batch_sampler=StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed,
                                                           start=step * cfg.grad_accum, rank=self.rank))
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "train_config.json")
        bar = tqdm(total=cfg.steps, initial=step, disable=not acc.is_local_main_process, desc="train")
        t0, last_log, micro, samples, losses = time.time(), time.time(), 0, 0, []
        model.train()
        for batch in loader:
            if step >= cfg.steps:
                break
            with acc.accumulate(model):
                inputs = self.prepare_batch(batch, self.generator(step, micro))
                loss = self.compute_loss(model, inputs, step)
                acc.backward(loss)
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            micro += 1
            samples += len(batch["caption"]) * acc.num_processes
            losses.append(loss.detach().float())
            if not acc.sync_gradients:
                continue
            micro = 0
            step += 1
            sched.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(model), step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = acc.gather(torch.stack(losses).mean()[None]).mean().item()
                rate = samples / (time.time() - last_log)
                self.log({"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                          "samples_per_s": rate, "elapsed_s": time.time() - t0})
                bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{rate:.1f}")
                losses, samples, last_log = [], 0, time.time()
            out_of_time = self.out_of_time(t0)
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                self.save(step, opt, sched)
            if out_of_time:
                break
        bar.close()
        in_sync = self.replicas_in_sync(acc.unwrap_model(model))
        self.log({"step": step, "done": True, "world_size": acc.num_processes, "replicas_in_sync": in_sync})
        if not in_sync:
            raise RuntimeError("model replicas diverged across processes (gradients were not synchronised)")
        if acc.is_main_process:
            self.export_pipeline(self.out / "pipeline")
        acc.wait_for_everyone()
        return {"step": step, "elapsed_s": time.time() - t0}

    def out_of_time(self, t0: float) -> bool:
        """`max_minutes` reached on any process (all ranks must stop at the same step)."""
        late = self.config.max_minutes > 0 and time.time() - t0 > 60 * self.config.max_minutes
        return bool(self.accelerator.reduce(torch.tensor([float(late)]), "max").item())

    def replicas_in_sync(self, model: nn.Module) -> bool:
        """Data-parallel replicas must hold bit-identical weights; compare a checksum across processes."""
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        sums = self.accelerator.gather(checksum.to(self.accelerator.device))
        return bool((sums == sums[0]).all())

    # ---- persistence -------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, step: int, opt, sched) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            state = acc.unwrap_model(self.model).state_dict()
            save_checkpoint(self.out, step, state, self.ema.state_dict() if self.ema else None, opt, sched,
                            self.config.to_dict(), keep=self.config.keep_checkpoints)
        acc.wait_for_everyone()

    def maybe_resume(self, opt, sched) -> int:
        cfg = self.config
        if not cfg.resume:
            return 0
        path = latest_checkpoint(self.out) if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            return 0
        ckpt = load_checkpoint(path)
        self.check_resumable(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optim"]["optimizer"])
        sched.load_state_dict(ckpt["optim"]["scheduler"])
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {ckpt['step']}")
        return ckpt["step"]

    def check_resumable(self, ckpt: dict, path: Path) -> None:
        """Refuse, before anything is loaded, a checkpoint this run cannot continue."""
        if type(self.config.model).from_dict(ckpt["config"].get("model", {}), strict=False) != self.config.model:
            raise ValueError(f"checkpoint {path} was trained with a different model config; "
                             f"use a new output_dir or resume=''")

    def final_model(self) -> nn.Module:
        """The weights to ship: EMA if kept, else the raw model."""
        model = self.accelerator.unwrap_model(self.model)
        if self.ema is None:
            return model
        import copy

        shipped = copy.deepcopy(model)
        self.ema.copy_to(shipped)
        return shipped

    def shipped_pipeline(self) -> TextToImagePipeline:
        """The pipeline a finished run exports (a hook: distillation adds its finisher)."""
        sampling = pipeline_config(self.config)
        return TextToImagePipeline(self.final_model().float().eval(), self.text_encoder, self.latent_space, sampling)

    def export_pipeline(self, path: Path, dtype: torch.dtype | None = None) -> None:
        self.shipped_pipeline().save_pretrained(path, dtype=dtype)


def export_checkpoint(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                      use_ema: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Turn a training checkpoint (default: the latest) of a run into a pipeline folder, without training."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "train_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (train_config.json missing)")
    cfg = TrainConfig.load(cfg_file)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoints in {run_dir}")
    ckpt = load_checkpoint(path)
    model = ErnieImageTransformer(cfg.model)
    state = ckpt["ema"] if use_ema and ckpt["ema"] is not None else ckpt["model"]
    model.load_state_dict_checked({k: v.to(torch.float32) for k, v in state.items()})
    sampling = pipeline_config(cfg)
    out = Path(out)
    model.save_pretrained(out / "transformer", dtype=dtype)
    sampling.save(out / "pipeline.json")
    return out
