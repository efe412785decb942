"""Few-step, CFG-free distillation: DMD2-style distribution matching, and MT-DMD with several teachers.

Per generator update (all draws seeded by (seed, step), so a resumed run is exact):

1. Backward simulation: pick a student schedule (e.g. 8 or 4 Euler steps) and a step k of it; run
   the student without grad from noise to sigma_k, then one grad-enabled step predicting x0_hat.
2. Distribution matching: re-noise x0_hat to a random sigma t; the real score is the teacher (or
   the sigma-weighted teacher mixture, MT-DMD) with CFG baked in, the fake score a copy of the
   teacher trained on student samples. The generator moves x0_hat along x0_real - x0_fake,
   divided by mean |x0_hat - x0_real| (DMD's normalisation), via an MSE to a stop-grad target.
3. Optional regression: student n-step samples vs. the teachers' 50-step ODE outputs from the
   same noise (a small set computed once and cached in the run folder).
4. Two-time-scale update: `fake_updates` flow-matching steps of the fake-score net on the
   detached x0_hat (fresh noise and sigma each), as DMD2's TTUR.
5. Optional GAN head (DMD2): a small per-token classifier on the fake-score net's hidden image
   tokens tells noised real images (the data batch) from noised student samples. It trains with the
   fake-score updates (its loss added to theirs); the generator adds a non-saturating loss through it.
   Real data is what lets the student move past the teacher's errors instead of only copying them.
6. Optional final-step distillation: continue the backward simulation (no grad) to the schedule's last
   step and regress the student's velocity there onto the first teacher's conditional (no-CFG)
   velocity at the same state. This teaches the student what a teacher finisher step does (remove
   the fine residual noise DMD cannot see at its re-noising levels) so no second network ships.

The run folder is a normal training run: `checkpoints/` (student weights + EMA as model/ema;
fake-score weights and both optimizers in optimizer.pt), `metrics.jsonl`, `train_config.json`
(a plain TrainConfig, so `ernielab export` works) beside `distill_config.json`, and at the end
`student/`, a pipeline folder with steps = the first student schedule, guidance 1.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import generator
from ernielab.image.config import ErnieImageConfig, check_interchangeable
from ernielab.image.flow_matching import TIMESTEP_SCALE, add_noise, flow_matching_loss, sample_training_sigmas
from ernielab.image.pipeline import DEFAULT_MODEL, PIPELINE_CONFIG, PipelineConfig
from ernielab.image.samplers import euler_sample, model_denoiser, sigma_schedule
from ernielab.image.train import StepBatchSampler, TrainConfig, Trainer
from ernielab.turbo.teachers import TeacherMixture, parse_teachers
from ernielab.worlds.registry import collate

DEFAULT_TEACHER = str(DEFAULT_MODEL)  # the bundled model
REGRESSION_FILE = "regression_pairs.pt"


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """TrainConfig fields keep their meaning (lr/steps/EMA/... are the generator's); model, text encoder,
    latent space and image size are taken from the student's initial weights (`init_from`, default: the
    first teacher)."""

    teachers: list = dataclasses.field(default_factory=lambda: [{"path": DEFAULT_TEACHER, "guidance_scale": 4.0}])
    teacher_weighting: str = "piecewise_linear"  # | "softmax" (see diffusion.teachers)
    teacher_temperature: float = 0.05
    student_steps: tuple[int, ...] = (8,)  # schedules the backward simulation draws from; the first ships
    student_shift: float = 1.0
    fake_updates: int = 2  # fake-score updates per generator update (two time-scale rule)
    fake_lr: float = 0.0  # 0: same as lr
    dmd_sigma_min: float = 0.02  # re-noising range of the distribution-matching loss
    dmd_sigma_max: float = 0.98
    regression_weight: float = 0.0
    regression_pairs: int = 0  # teacher ODE samples computed once (0: no regression loss)
    regression_batch: int = 8
    teacher_steps: int = 50  # ODE steps of the regression targets
    gan_weight: float = 0.0  # generator's non-saturating GAN loss weight (0: no GAN head)
    gan_disc_weight: float = 1.0  # discriminator loss weight inside the fake-score updates
    gan_feature_depth: int = 0  # blocks of the fake-score net before the head reads them; 0 = half the depth
    gan_sigma_max: float = 1.0  # GAN inputs are re-noised to sigma in [0, gan_sigma_max]: low noise shows fine detail
    fake_init_from: str = ""  # fake-score net's initial weights (a data denoiser, e.g. the teacher); "" = init_from
    finisher_steps: int = 0  # ship the first teacher inside student/ to take the last N steps (no CFG); 0 = student only
    final_step_weight: float = 0.0  # weight of the on-policy last-step regression onto the first teacher (0: off)
    # TrainConfig defaults that suit distillation better
    output_dir: str = "runs/distill"
    lr: float = 2e-5
    warmup_steps: int = 20
    ema_decay: float = 0.99
    cfg_dropout: float = 0.0  # unused: the student never sees the empty prompt
    timestep_sampling: str = "uniform"  # the fake-score net's noise levels
    save_every: int = 100
    log_every: int = 10


# ---- config resolution -------------------------------------------------------------------------
def student_init_path(cfg: DistillConfig) -> Path:
    return Path(cfg.init_from or parse_teachers(cfg.teachers)[0].path)


def resolve_config(cfg: DistillConfig) -> DistillConfig:
    """Fill model / text encoder / latents / size from the student's initial pipeline; set the shipped sampling."""
    specs = parse_teachers(cfg.teachers)
    if not cfg.student_steps or any(int(n) < 1 for n in cfg.student_steps):
        raise ValueError(f"student_steps must be positive step counts, got {list(cfg.student_steps)}")
    if cfg.fake_updates < 1:
        raise ValueError(f"fake_updates must be >= 1, got {cfg.fake_updates}")
    if not 0.0 < cfg.dmd_sigma_min < cfg.dmd_sigma_max <= 1.0:
        raise ValueError(f"need 0 < dmd_sigma_min < dmd_sigma_max <= 1, got {cfg.dmd_sigma_min}, {cfg.dmd_sigma_max}")
    if cfg.grad_accum != 1:
        raise ValueError("distillation does not support grad_accum > 1")
    if cfg.gan_weight < 0 or cfg.gan_disc_weight < 0:
        raise ValueError(f"GAN weights must be >= 0, got {cfg.gan_weight}, {cfg.gan_disc_weight}")
    if cfg.final_step_weight < 0:
        raise ValueError(f"final_step_weight must be >= 0, got {cfg.final_step_weight}")
    if not 0.0 < cfg.gan_sigma_max <= 1.0:
        raise ValueError(f"gan_sigma_max must lie in (0, 1], got {cfg.gan_sigma_max}")
    for spec in specs:
        if not Path(spec.path).exists():
            raise FileNotFoundError(f"teacher folder not found: {spec.path}")
    init = student_init_path(cfg)
    if not (init / PIPELINE_CONFIG).is_file():
        raise FileNotFoundError(f"student init {init} is not a pipeline folder ({PIPELINE_CONFIG} missing)")
    pipe_cfg = PipelineConfig.load(init / PIPELINE_CONFIG)
    try:
        model_cfg = ErnieImageConfig.load(init / "transformer" / "config.json")
    except (TypeError, ValueError) as e:
        raise ValueError(f"student init {init} must hold a plain ErnieImageTransformer (e.g. not a MoDE): {e}") from None
    sampling = cfg.sampling.replace(steps=int(cfg.student_steps[0]), guidance_scale=1.0, shift=cfg.student_shift,
                                    text_encoder=pipe_cfg.text_encoder, latent=pipe_cfg.latent,
                                    height=pipe_cfg.height, width=pipe_cfg.width)
    depth = cfg.gan_feature_depth or max(1, model_cfg.num_layers // 2)
    if not 1 <= depth <= model_cfg.num_layers:
        raise ValueError(f"gan_feature_depth must lie in 1..{model_cfg.num_layers}, got {cfg.gan_feature_depth}")
    fake_init = Path(cfg.fake_init_from) if cfg.fake_init_from else init
    if not fake_init.exists():
        raise FileNotFoundError(f"fake_init_from folder not found: {fake_init}")
    return cfg.replace(model=model_cfg, text_encoder=pipe_cfg.text_encoder, latent=pipe_cfg.latent,
                       data=cfg.data.replace(image_size=pipe_cfg.height), sampling=sampling,
                       init_from=str(init), student_steps=tuple(int(n) for n in cfg.student_steps),
                       gan_feature_depth=depth, fake_init_from=str(fake_init))


def plain_train_config(cfg: DistillConfig) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k in names})


class DiscriminatorHead(nn.Module):
    """Per-token real/fake logits from hidden image tokens (a patch-GAN on the fake-score features)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Parameters stop collecting gradients (the generator's GAN loss must only move the student)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TrainingState:
    """What resumes the distillation besides the student: fake-score net (+ GAN head) and both
    optimizers/schedulers. Passed to save_checkpoint as its 'optimizer' (anything with state_dict), so the
    checkpoint's model/ema files stay the student's and `ernielab export` reads them unchanged."""

    def __init__(self, opt_g, opt_f, sched_f, fake: nn.Module, head: nn.Module | None = None):
        self.opt_g, self.opt_f, self.sched_f, self.fake, self.head = opt_g, opt_f, sched_f, fake, head

    def state_dict(self) -> dict:
        state = {"generator": self.opt_g.state_dict(), "fake_optimizer": self.opt_f.state_dict(),
                 "fake_scheduler": self.sched_f.state_dict(),
                 "fake_model": {k: v.detach().cpu() for k, v in self.fake.state_dict().items()}}
        if self.head is not None:
            state["gan_head"] = {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if (self.head is None) != ("gan_head" not in state):
            raise ValueError("checkpoint and config disagree on the GAN head (gan_weight); resume with the "
                             "settings the run started with, or start a new output_dir")
        self.opt_g.load_state_dict(state["generator"])
        self.opt_f.load_state_dict(state["fake_optimizer"])
        self.sched_f.load_state_dict(state["fake_scheduler"])
        self.fake.load_state_dict(state["fake_model"])
        if self.head is not None:
            self.head.load_state_dict(state["gan_head"])


# ---- the trainer -------------------------------------------------------------------------------
class DistillTrainer(Trainer):
    """Reuses Trainer's accelerator, data, seeds, EMA, checkpoint format and export; owns the DMD loop."""

    def __init__(self, config: DistillConfig, accelerator=None):
        config = resolve_config(config)
        super().__init__(config, accelerator)  # student = build_model(), initialised from init_from
        cfg, device = self.config, self.accelerator.device
        self.teachers = TeacherMixture.load(parse_teachers(cfg.teachers), cfg.teacher_weighting,
                                            cfg.teacher_temperature, device)
        for spec, teacher in zip(self.teachers.specs, self.teachers.models):
            check_interchangeable(cfg.model, teacher.config, f"teacher {spec.path} vs. the student")
        # The fake score starts as a denoiser of the data (DMD2: the teacher), not as the few-step student.
        self.fake = copy.deepcopy(self.model)
        if Path(cfg.fake_init_from) != Path(cfg.init_from):
            self.load_initial_weights(self.fake, Path(cfg.fake_init_from))
        self.head = DiscriminatorHead(cfg.model.hidden_size).to(device) if cfg.gan_weight > 0 else None
        self.metrics: MetricsLog | None = None

    # ---- pieces of one update ---------------------------------------------------------------
    def encode(self, captions: list[str]):
        device = self.accelerator.device
        return self.text_encoder(captions, device=device), self.text_encoder([""] * len(captions), device=device)

    def backward_simulation(self, student: nn.Module, cond, g: torch.Generator):
        """Student from noise to a random step k of a random schedule (no grad), then one step with grad -> x0_hat."""
        cfg = self.config
        n = cfg.student_steps[int(torch.randint(len(cfg.student_steps), (1,), generator=g))]
        sigmas = sigma_schedule(n, cfg.student_shift)
        k = int(torch.randint(n, (1,), generator=g))
        c, h, w = self.latent_space.latent_shape(cfg.data.image_size, cfg.data.image_size)
        noise = torch.randn((cond[0].shape[0], c, h, w), generator=g).to(self.accelerator.device)
        x = euler_sample(model_denoiser(student, *cond), noise, sigmas[: k + 1])
        sigma = sigmas[k].expand(len(x)).to(x.device)
        v = student(x, sigma * TIMESTEP_SCALE, *cond)
        return x - sigma.view(-1, 1, 1, 1) * v, {"student_k": k, "student_n": n, "x_k": x}

    def final_step_loss(self, student: nn.Module, x_k: torch.Tensor, k: int, n: int, cond) -> torch.Tensor:
        """From the simulated state at step k of the n-step schedule, go on (no grad) to the last step; MSE of
        the student's velocity there against the first teacher's conditional velocity (what a finisher does)."""
        sigmas = sigma_schedule(n, self.config.student_shift).to(x_k.device)
        x = euler_sample(model_denoiser(student, *cond), x_k, sigmas[k:n]) if k < n - 1 else x_k
        t = sigmas[n - 1].expand(len(x)) * TIMESTEP_SCALE
        with torch.no_grad():
            target = self.teachers.models[0](x, t, *cond)
        return ((student(x, t, *cond).float() - target.float()) ** 2).mean()

    def dmd_loss(self, x0: torch.Tensor, cond, uncond, g: torch.Generator) -> torch.Tensor:
        cfg = self.config
        B = len(x0)
        t = cfg.dmd_sigma_min + (cfg.dmd_sigma_max - cfg.dmd_sigma_min) * torch.rand(B, generator=g)
        t = t.to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        with torch.no_grad():
            xt = add_noise(x0.detach(), noise, t)
            tv = t.view(-1, 1, 1, 1)
            x0_real = xt - tv * self.teachers(xt, t, cond, uncond)
            x0_fake = xt - tv * self.fake(xt, t * TIMESTEP_SCALE, *cond)
            scale = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
        # d/dx0 of 0.5 * ||x0 - (x0 - grad)||^2 is grad: gradient descent moves x0 toward real, away from fake.
        return 0.5 * ((x0.float() - (x0 - grad).detach().float()) ** 2).mean()

    def regression_loss(self, student: nn.Module, pairs: dict, step: int) -> torch.Tensor:
        """Student's full schedule (with grad) from the pairs' noise vs. the teachers' ODE output."""
        cfg = self.config
        g = generator("regression", cfg.seed, step, self.rank)
        idx = torch.randint(len(pairs["noise"]), (min(cfg.regression_batch, len(pairs["noise"])),), generator=g)
        cond = self.text_encoder([pairs["captions"][i] for i in idx.tolist()], device=self.accelerator.device)
        x = pairs["noise"][idx].to(self.accelerator.device)
        sigmas = sigma_schedule(cfg.student_steps[0], cfg.student_shift).to(x.device)
        for i in range(len(sigmas) - 1):
            x = x + (sigmas[i + 1] - sigmas[i]) * student(x, sigmas[i].expand(len(x)) * TIMESTEP_SCALE, *cond)
        return ((x.float() - pairs["target"][idx].to(x.device).float()) ** 2).mean()

    def gan_generator_loss(self, x0: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        """Non-saturating GAN loss of the student's x0_hat, re-noised, through the frozen fake-score features."""
        t = self.gan_sigmas(len(x0), g, x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        with frozen(self.fake, self.head):
            _, hidden = self.fake(add_noise(x0, noise, t), t * TIMESTEP_SCALE, *cond,
                                  return_hidden_at=self.config.gan_feature_depth)
            return F.softplus(-self.head(hidden)).mean()

    def gan_sigmas(self, n: int, g: torch.Generator, device) -> torch.Tensor:
        cfg = self.config
        return cfg.gan_sigma_max * sample_training_sigmas(n, g, cfg.timestep_sampling, cfg.timestep_shift, device)

    def fake_score_updates(self, fake, head, opt_f, sched_f, x0: torch.Tensor, real: torch.Tensor | None,
                           cond, step: int) -> dict:
        """Flow matching of the fake score on student samples; with a GAN head, plus the discriminator loss
        on (noised) student samples vs. the batch's real images under the same captions."""
        cfg, acc = self.config, self.accelerator
        params = [p for group in opt_f.param_groups for p in group["params"]]  # fake net (+ GAN head)
        records = []
        for j in range(cfg.fake_updates):
            g = generator("fake", cfg.seed, step, j, self.rank)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            t = sample_training_sigmas(len(x0), g, cfg.timestep_sampling, cfg.timestep_shift, x0.device)
            with acc.autocast():
                if head is None:
                    pred = fake(add_noise(x0, noise, t), t * TIMESTEP_SCALE, *cond)
                    loss_fm = flow_matching_loss(pred, x0, noise).mean()
                    loss, record = loss_fm, {}
                else:  # one pass: velocity loss on the first third, logits on the other two
                    # [student at the score's sigma; student at a GAN sigma; real at a GAN sigma]
                    gan_noise = torch.randn((2, *x0.shape), generator=g).to(x0.device)
                    t_gan = self.gan_sigmas(2 * len(x0), g, x0.device)
                    xt = torch.cat([add_noise(x0, noise, t), add_noise(x0, gan_noise[0], t_gan[: len(x0)]),
                                    add_noise(real, gan_noise[1], t_gan[len(x0):])])
                    triple = tuple(torch.cat([c, c, c]) for c in cond)
                    pred, hidden = fake(xt, torch.cat([t, t_gan]) * TIMESTEP_SCALE, *triple,
                                        return_hidden_at=cfg.gan_feature_depth)
                    loss_fm = flow_matching_loss(pred[: len(x0)], x0, noise).mean()
                    logits = head(hidden[len(x0):])
                    fake_logits, real_logits = logits[: len(x0)], logits[len(x0):]
                    loss_d = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
                    loss = loss_fm + cfg.gan_disc_weight * loss_d
                    record = {"loss_disc": loss_d.detach().float(),
                              "disc_acc": 0.5 * ((fake_logits < 0).float().mean() + (real_logits > 0).float().mean())}
            acc.backward(loss)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(params, cfg.grad_clip)
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)
            records.append({"loss_fake": loss_fm.detach().float(), **record})
        sched_f.step()
        return {k: torch.stack([r[k] for r in records]).mean().item() for k in records[0]}

    # ---- regression targets ----------------------------------------------------------------
    @torch.no_grad()
    def regression_pairs(self) -> dict | None:
        """Teachers' ODE outputs (teacher_steps Euler steps, mixture velocity with CFG) for fixed noise + captions."""
        cfg = self.config
        if cfg.regression_pairs <= 0 or cfg.regression_weight <= 0:
            return None
        path = self.out / REGRESSION_FILE
        if path.is_file():
            pairs = torch.load(path, weights_only=False)
            # reuse only targets of the same teachers (paths, guidance, weights), count and ODE steps
            if (len(pairs["noise"]) == cfg.regression_pairs and pairs.get("teacher_steps") == cfg.teacher_steps
                    and pairs.get("teachers") == list(cfg.teachers)):
                return pairs
        g = generator("regression-pairs", cfg.seed)
        idx = torch.randint(len(self.dataset), (cfg.regression_pairs,), generator=g).tolist()
        captions = [self.dataset[i]["caption"] for i in idx]
        c, h, w = self.latent_space.latent_shape(cfg.data.image_size, cfg.data.image_size)
        noise = torch.randn((len(captions), c, h, w), generator=g)
        sigmas = sigma_schedule(cfg.teacher_steps, 1.0)
        targets = []
        for s in tqdm(range(0, len(captions), 32), desc="teacher ODE targets",
                      disable=not self.accelerator.is_local_main_process):
            cond, uncond = self.encode(captions[s : s + 32])
            targets.append(euler_sample(lambda x, sig: self.teachers(x, sig, cond, uncond),
                                        noise[s : s + 32].to(self.accelerator.device), sigmas).cpu())
        pairs = {"captions": captions, "noise": noise, "target": torch.cat(targets), "teacher_steps": cfg.teacher_steps,
                 "teachers": list(cfg.teachers)}
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(pairs, path)
        return pairs

    # ---- main loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.config, self.accelerator
        opt_g = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        fake_params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr or cfg.lr, weight_decay=cfg.weight_decay)
        schedule = lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule)  # noqa: E731
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
        sched_f = torch.optim.lr_scheduler.LambdaLR(opt_f, schedule)
        state = TrainingState(opt_g, opt_f, sched_f, self.fake, self.head)
        step = self.maybe_resume(state, sched_g)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            plain_train_config(cfg).save(self.out / "train_config.json")
            cfg.save(self.out / "distill_config.json")
        self.metrics = MetricsLog(self.out / "metrics.jsonl", step) if acc.is_main_process else None
        pairs = self.regression_pairs()
        student, fake, opt_g, opt_f = acc.prepare(self.model, self.fake, opt_g, opt_f)
        head = acc.prepare(self.head) if self.head is not None else None
        loader = DataLoader(self.dataset, collate_fn=collate, num_workers=cfg.num_workers,
                            batch_sampler=StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed,
                                                           start=step, rank=self.rank))
        bar = tqdm(total=cfg.steps, initial=step, disable=not acc.is_local_main_process, desc="distill")
        t0, window = time.time(), []
        student.train()
        fake.train()
        for batch in loader:
            if step >= cfg.steps:
                break
            record = self.generator_update(student, opt_g, fake, head, opt_f, sched_f, pairs, batch, step)
            step += 1
            sched_g.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(student), step)
            window.append(record)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = {k: sum(r[k] for r in window) / len(window) for k in window[0]}
                self.log({"step": step, **means, "lr": sched_g.get_last_lr()[0], "elapsed_s": time.time() - t0})
                bar.set_postfix(dmd=f"{means['loss_dmd']:.4f}", fake=f"{means['loss_fake']:.4f}")
                window = []
            out_of_time = self.out_of_time(t0)
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                self.save(step, state, sched_g)
            if out_of_time:
                break
        bar.close()
        in_sync = self.replicas_in_sync(acc.unwrap_model(student))
        self.log({"step": step, "done": True, "world_size": acc.num_processes, "replicas_in_sync": in_sync})
        if not in_sync:
            raise RuntimeError("student replicas diverged across processes")
        if acc.is_main_process:
            self.export_pipeline(self.out / "student")
        acc.wait_for_everyone()
        return {"step": step, "elapsed_s": time.time() - t0, "student": str(self.out / "student")}

    def generator_update(self, student, opt_g, fake, head, opt_f, sched_f, pairs, batch, step: int) -> dict:
        cfg, acc = self.config, self.accelerator
        g = self.generator(step)
        cond, uncond = self.encode(list(batch["caption"]))
        with acc.autocast():
            x0, info = self.backward_simulation(student, cond, g)
            loss_dmd = self.dmd_loss(x0, cond, uncond, g)
            loss = loss_dmd
            loss_reg = loss_gan = loss_final = torch.zeros(())
            if pairs is not None:
                loss_reg = self.regression_loss(student, pairs, step)
                loss = loss + cfg.regression_weight * loss_reg
            if head is not None:
                loss_gan = self.gan_generator_loss(x0, cond, g)
                loss = loss + cfg.gan_weight * loss_gan
            if cfg.final_step_weight > 0:
                loss_final = self.final_step_loss(student, info["x_k"], info["student_k"], info["student_n"], cond)
                loss = loss + cfg.final_step_weight * loss_final
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        real = self.latent_space.encode(batch["image"].to(x0.device)).float() if head is not None else None
        fake_record = self.fake_score_updates(fake, head, opt_f, sched_f, x0.detach().float(), real, cond, step)
        gan = {"loss_gan": loss_gan.item()} if head is not None else {}
        final = {"loss_final": loss_final.item()} if cfg.final_step_weight > 0 else {}
        return {"loss_dmd": loss_dmd.item(), "loss_reg": loss_reg.item(), **gan, **final, **fake_record,
                "student_k": info["student_k"]}

    # ---- persistence -------------------------------------------------------------------------
    def shipped_pipeline(self):
        """The student; with `finisher_steps`, the first teacher rides along to take the last steps."""
        pipe = super().shipped_pipeline()
        if self.config.finisher_steps <= 0:
            return pipe
        teacher = self.teachers.models[0]
        if not isinstance(teacher, type(self.model)):
            raise ValueError("finisher_steps needs a plain ErnieImageTransformer as the first teacher")
        return pipe.with_finisher(copy.deepcopy(teacher).float(), self.config.finisher_steps)

    def log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def check_resumable(self, ckpt: dict, path: Path) -> None:
        super().check_resumable(ckpt, path)
        if "fake_model" not in ckpt["optim"]["optimizer"]:
            raise ValueError(f"checkpoint {path} is not a distillation checkpoint (no fake-score state)")


def distill(config: DistillConfig) -> dict:
    return DistillTrainer(config).train()
