"""Few-step, CFG-free distillation: DMD2-style distribution matching, and MT-DMD with several teachers.

Per generator update (all draws seeded by (seed, step), so a resumed run is exact):

1. Backward simulation: pick a student schedule (e.g. 8 or 4 Euler steps) and a step k of it; run
   the student without grad from noise to sigma_k, then one grad-enabled step predicting x0_hat.
2. Distribution matching: re-noise x0_hat to a random sigma t; the real score is the teacher (or
   the sigma-weighted teacher mixture, MT-DMD) with CFG baked in, the fake score a copy of the
   teacher trained on student samples. The generator moves x0_hat along x0_real - x0_fake,
   divided by mean |x0_hat - x0_real| (DMD's normalisation), via an MSE to a stop-grad target.
   Optionally (`teacher_router`) a learned router weights the teachers by (x_t, sigma, caption), and with
   `router_split` it weights the CFG-augmentation part sum_k b_k (g_k - 1)(x0_k^cond - x0_k^uncond) and the
   distribution-matching part sum_k a_k x0_k^cond of x0_real apart (turbo.router, TeacherMixture.forward).
3. Optional regression: student n-step samples vs. the teachers' 50-step ODE outputs from the
   same noise (a small set computed once and cached in the run folder as safetensors + JSON).
4. Two-time-scale update: `fake_updates` flow-matching steps of the fake-score net on the
   detached x0_hat (fresh noise and sigma each), as DMD2's TTUR; with `fresh_fake_samples`, each update on
   a new student sample (new captions, new no-grad backward simulation), as DMD2 does. The router, if any,
   takes its step here too, on the real batch.
5. Optional GAN head (DMD2): a small per-token classifier on the fake-score net's hidden image
   tokens tells noised real images (the data batch) from noised student samples. It trains with the
   fake-score updates (its loss added to theirs); the generator adds a non-saturating loss through it.
   Real data is what lets the student move past the teacher's errors instead of only copying them.
6. Optional final-step distillation: continue the backward simulation (no grad) to the schedule's last
   step and regress the student's velocity there onto the first teacher's conditional (no-CFG)
   velocity at the same state. This teaches the student what a teacher finisher step does (remove
   the fine residual noise DMD cannot see at its re-noising levels) so no second network ships.

The core engine runs it: the student is the engine's "model" (its optimizer, schedule, EMA, clipping and
export); the fake-score net ("fake") and the GAN head ("gan_head") are further modules the engine saves and
resumes; the fake-score optimizer and its schedule are this task's state. Steps 1-3, 5 (generator side) and 6
are `loss`; step 4 and the discriminator run in `after_step`. The run folder is a normal training run:
`checkpoints/` (model/ema are the student's, so `ernielab image export` reads them), `metrics.jsonl`,
`train_config.json`, and at the end `student/`, a pipeline folder with steps = the first student schedule,
guidance 1.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ernielab.core.config import bounded
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed, generator
from ernielab.image.config import ErnieImageConfig, check_interchangeable
from ernielab.image.flow_matching import (TIMESTEP_SAMPLING, TIMESTEP_SCALE, add_noise, flow_matching_loss,
                                          sample_training_sigmas)
from ernielab.image.pipeline import DEFAULT_MODEL, PIPELINE_CONFIG, PipelineConfig, TextToImagePipeline
from ernielab.image.samplers import euler_sample, model_denoiser, sigma_schedule
from ernielab.image.train import TrainConfig, Trainer, batch_indices
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.turbo.router import TeacherRouter
from ernielab.turbo.teachers import WEIGHTINGS, TeacherMixture, TeacherSpec, mixture_weights, parse_teachers
from ernielab.worlds.registry import collate

DEFAULT_TEACHER = str(DEFAULT_MODEL)  # the bundled model
REGRESSION_TENSORS = "regression_pairs.safetensors"  # noise and teacher targets
REGRESSION_META = "regression_pairs.json"  # captions, teacher_steps, teachers (written last)


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    """TrainConfig fields keep their meaning (lr/steps/EMA/... are the generator's); model, text encoder,
    latent space and image size are taken from the student's initial weights (`init_from`, default: the
    first teacher)."""

    teachers: list[TeacherSpec] = dataclasses.field(
        default_factory=lambda: [TeacherSpec(path=DEFAULT_TEACHER, guidance_scale=4.0)])
    teacher_weighting: str = bounded("piecewise_linear", choices=WEIGHTINGS)  # see turbo.teachers
    teacher_temperature: float = bounded(0.05, gt=0)
    student_steps: tuple[int, ...] = bounded((8,), ge=1)  # schedules the backward simulation draws; the first ships
    student_shift: float = bounded(1.0, gt=0)
    fake_updates: int = bounded(2, ge=1)  # fake-score updates per generator update (two time-scale rule)
    fake_lr: float = bounded(0.0, ge=0)  # 0: same as lr
    dmd_sigma_min: float = bounded(0.02, gt=0, lt=1)  # re-noising range of the distribution-matching loss
    dmd_sigma_max: float = bounded(0.98, gt=0, le=1)
    regression_weight: float = bounded(0.0, ge=0)
    regression_pairs: int = bounded(0, ge=0)  # teacher ODE samples computed once (0: no regression loss)
    regression_batch: int = bounded(8, ge=1)
    teacher_steps: int = bounded(50, ge=1)  # ODE steps of the regression targets
    gan_weight: float = bounded(0.0, ge=0)  # generator's non-saturating GAN loss weight (0: no GAN head)
    gan_disc_weight: float = bounded(1.0, ge=0)  # discriminator loss weight inside the fake-score updates
    gan_feature_depth: int = bounded(0, ge=0)  # blocks of the fake-score net before the head reads them; 0 = half
    gan_sigma_max: float = bounded(1.0, gt=0, le=1)  # GAN inputs re-noised to sigma in [0, gan_sigma_max]
    fake_init_from: str = ""  # fake-score net's initial weights (a data denoiser, e.g. the teacher); "" = init_from
    finisher_steps: int = bounded(0, ge=0)  # ship the first teacher in student/ for the last N steps (no CFG)
    final_step_weight: float = bounded(0.0, ge=0)  # on-policy last-step regression onto the first teacher (0: off)
    teacher_router: bool = False  # learn W(x_t, sigma, c) over the teachers on top of the sigma weighting (turbo.router)
    router_split: bool = False  # separate router heads for the CFG-augmentation and distribution-matching terms
    router_hidden: int = bounded(64, ge=1)
    router_lr: float = bounded(1e-3, gt=0)
    fresh_fake_samples: bool = False  # DMD2: each fake-score update on a fresh student sample (new captions, noise)
    # TrainConfig defaults that suit distillation better
    output_dir: str = "runs/distill"
    lr: float = bounded(2e-5, gt=0)
    warmup_steps: int = bounded(20, ge=0)
    ema_decay: float = bounded(0.99, ge=0, lt=1)
    cfg_dropout: float = bounded(0.0, ge=0, le=1)  # unused: the student never sees the empty prompt
    timestep_sampling: str = bounded("uniform", choices=TIMESTEP_SAMPLING)  # the fake-score net's noise levels
    save_every: int = bounded(100, ge=1)
    log_every: int = bounded(10, ge=1)

    def check(self) -> None:
        super().check()
        if not self.teachers:
            raise ValueError("distillation needs at least one teacher (teachers: [{\"path\": ...}])")
        for i, spec in enumerate(self.teachers):
            spec.validate(f"teachers[{i}]")
        if not self.student_steps:
            raise ValueError("student_steps must list at least one step count, e.g. [8, 4]")
        if self.dmd_sigma_min >= self.dmd_sigma_max:
            raise ValueError(f"need dmd_sigma_min < dmd_sigma_max, got {self.dmd_sigma_min}, {self.dmd_sigma_max}")
        if self.grad_accum != 1:
            raise ValueError("distillation does not support grad_accum > 1")
        if self.teacher_router and len(self.teachers) < 2:
            raise ValueError("teacher_router needs at least two teachers (one teacher has nothing to route)")
        if self.router_split and not self.teacher_router:
            raise ValueError("router_split needs teacher_router: true (the CA and DM weights are router heads)")
        # knots that leave a noise level without weight fail here, before anything loads
        mixture_weights(torch.linspace(0, 1, 101), self.teachers, self.teacher_weighting, self.teacher_temperature)


# ---- config resolution -------------------------------------------------------------------------
def student_init_path(cfg: DistillConfig) -> Path:
    return Path(cfg.init_from or parse_teachers(cfg.teachers)[0].path)


def resolve_config(cfg: DistillConfig) -> DistillConfig:
    """Fill model / text encoder / latents / size from the student's initial pipeline; set the shipped sampling.
    Missing folders and a student that is not a plain transformer are refused here, before anything is written."""
    specs = parse_teachers(cfg.teachers)
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
                       init_from=str(init), gan_feature_depth=depth, fake_init_from=str(fake_init))


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


# ---- the task ----------------------------------------------------------------------------------
class DistillTrainer(Trainer):
    """Reuses Trainer's data, seeds, text encoder, latents and export; the engine runs the loop."""

    export_name = "student"

    def __init__(self, config: DistillConfig, accelerator=None):
        super().__init__(resolve_config(config), accelerator)
        self.teachers: TeacherMixture | None = None
        self.fake: nn.Module | None = None
        self.head: DiscriminatorHead | None = None
        self.router: TeacherRouter | None = None
        self.opt_f: torch.optim.Optimizer | None = None
        self.opt_r: torch.optim.Optimizer | None = None
        self.sched_f = None
        self.pairs: dict | None = None
        self.prepared: tuple | None = None  # (fake, head, fake optimizer) as accelerate prepared them
        self.prepared_router: tuple | None = None  # (router, router optimizer) as accelerate prepared them
        self.pending: dict | None = None  # what the step's fake-score updates need from its generator update

    # ---- engine hooks ------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        """Student (from init_from), teachers, fake score, GAN head: in the order the weights were always drawn."""
        modules = super().build()
        cfg, device = self.config, self.accelerator.device
        self.model.to(device)
        self.teachers = TeacherMixture.load(parse_teachers(cfg.teachers), cfg.teacher_weighting,
                                            cfg.teacher_temperature, device)
        for spec, teacher in zip(self.teachers.specs, self.teachers.models):
            check_interchangeable(cfg.model, teacher.config, f"teacher {spec.path} vs. the student")
        if cfg.finisher_steps > 0 and not isinstance(self.teachers.models[0], ErnieImageTransformer):
            raise ValueError("finisher_steps needs a plain ErnieImageTransformer as the first teacher")
        # The fake score starts as a denoiser of the data (DMD2: the teacher), not as the few-step student.
        self.fake = copy.deepcopy(self.model)
        if Path(cfg.fake_init_from) != Path(cfg.init_from):
            self.load_initial_weights(self.fake, Path(cfg.fake_init_from))
        modules["fake"] = self.fake
        if cfg.gan_weight > 0:
            self.head = DiscriminatorHead(cfg.model.hidden_size).to(device)
            modules["gan_head"] = self.head
        fake_params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        self.opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr or cfg.lr, weight_decay=cfg.weight_decay)
        self.sched_f = torch.optim.lr_scheduler.LambdaLR(
            self.opt_f, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio))
        if cfg.teacher_router:
            with torch.random.fork_rng(devices=[]):  # its own seed: the other modules' draws stay as they were
                torch.manual_seed(derive_seed("router", cfg.seed))
                self.router = TeacherRouter(cfg.model.in_channels, cfg.model.text_in_dim, len(cfg.teachers),
                                            2 if cfg.router_split else 1, cfg.router_hidden).to(device)
            modules["router"] = self.router
            self.opt_r = torch.optim.Adam(self.router.parameters(), lr=cfg.router_lr)
        return modules

    def batch(self, step: int, micro: int) -> dict:
        cfg = self.config
        k = step * cfg.grad_accum + micro
        return collate([self.dataset[i] for i in batch_indices(len(self.dataset), cfg.batch_size, cfg.seed, k,
                                                               self.rank)])

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's loss: distribution matching (+ regression, GAN, final-step terms)."""
        cfg, acc = self.config, self.accelerator
        self.prepare_auxiliary()
        g = self.generator(step)
        cond, uncond = self.encode(list(batch["caption"]))
        with acc.autocast():
            x0, info = self.backward_simulation(model, cond, g)
            loss_dmd = self.dmd_loss(x0, cond, uncond, g)
            loss = loss_dmd
            loss_reg = loss_gan = loss_final = torch.zeros(())
            if self.pairs is not None:
                loss_reg = self.regression_loss(model, self.pairs, step)
                loss = loss + cfg.regression_weight * loss_reg
            if self.head is not None:
                loss_gan = self.gan_generator_loss(x0, cond, g)
                loss = loss + cfg.gan_weight * loss_gan
            if cfg.final_step_weight > 0:
                loss_final = self.final_step_loss(model, info["x_k"], info["student_k"], info["student_n"], cond)
                loss = loss + cfg.final_step_weight * loss_final
        self.pending = {"x0": x0.detach().float(), "images": batch["image"], "cond": cond, "uncond": uncond}
        gan = {"loss_gan": loss_gan.item()} if self.head is not None else {}
        final = {"loss_final": loss_final.item()} if cfg.final_step_weight > 0 else {}
        return loss, {"loss_dmd": loss_dmd.item(), "loss_reg": loss_reg.item(), **gan, **final,
                      "student_k": info["student_k"]}

    def after_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """The router learns from the step's real batch; the fake score (and GAN head) catch up on student
        samples: this step's (reused for every update) or, with fresh_fake_samples, a new one per update."""
        pending, self.pending = self.pending, None
        logs = {}
        if self.router is not None:
            logs.update(self.router_update(pending["images"], pending["cond"], pending["uncond"], step))
        if self.config.fresh_fake_samples:
            sample = lambda j: self.fresh_sample(model, step, j)  # noqa: E731
        else:
            real = self.real_latents(pending["images"]) if self.head is not None else None
            sample = lambda j: (pending["x0"], real, pending["cond"])  # noqa: E731
        return {**logs, **self.fake_score_updates(sample, step)}

    def state(self) -> dict[str, Any]:
        router = {"router_optimizer": self.opt_r.state_dict()} if self.opt_r is not None else {}
        return {"fake_optimizer": self.opt_f.state_dict(), "fake_scheduler": self.sched_f.state_dict(), **router}

    def load_state(self, state: dict[str, Any]) -> None:
        if "fake_optimizer" not in state:
            raise ValueError(f"cannot resume {self.out}: its checkpoint is not a distillation checkpoint "
                             f"(no fake-score optimizer); use --fresh or a new output_dir")
        self.opt_f.load_state_dict(state["fake_optimizer"])
        self.sched_f.load_state_dict(state["fake_scheduler"])
        if self.opt_r is not None:
            self.opt_r.load_state_dict(state["router_optimizer"])

    def prepare_auxiliary(self) -> None:
        """Once, after any resume: fake score, head and their optimizer through accelerate (DDP keeps the
        replicas' fake-score gradients in sync), and the regression targets."""
        if self.prepared is not None:
            return
        acc = self.accelerator
        fake, opt_f = acc.prepare(self.fake, self.opt_f)
        head = acc.prepare(self.head) if self.head is not None else None
        fake.train()
        self.prepared = (fake, head, opt_f)
        if self.router is not None:
            self.prepared_router = acc.prepare(self.router, self.opt_r)
        self.pairs = self.regression_pairs()

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
            x0_real = xt - tv * self.real_velocity(xt, t, cond, uncond)
            x0_fake = xt - tv * self.fake(xt, t * TIMESTEP_SCALE, *cond)
            scale = (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
        # d/dx0 of 0.5 * ||x0 - (x0 - grad)||^2 is grad: gradient descent moves x0 toward real, away from fake.
        return 0.5 * ((x0.float() - (x0 - grad).detach().float()) ** 2).mean()

    def real_velocity(self, xt: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        """The real score's velocity: teachers with CFG, mixed by sigma or, with the router, by W(x_t, sigma, c)
        (per objective with router_split: head 0 weights the DM part, head 1 the CA part)."""
        if self.router is None:
            return self.teachers(xt, t, cond, uncond)
        w = self.router(xt, t, cond, self.teachers.weights(t))
        return self.teachers(xt, t, cond, uncond, w[:, 0], w[:, 1] if self.config.router_split else None)

    def router_update(self, images: torch.Tensor, cond, uncond, step: int) -> dict[str, float]:
        """One Adam step of the router on the real batch re-noised to the DMD range (rule in turbo.router)."""
        cfg, acc = self.config, self.accelerator
        router, opt_r = self.prepared_router
        x0 = self.real_latents(images)
        g = generator("router", cfg.seed, step, self.rank)
        t = (cfg.dmd_sigma_min + (cfg.dmd_sigma_max - cfg.dmd_sigma_min) * torch.rand(len(x0), generator=g)).to(x0.device)
        xt = add_noise(x0, torch.randn(x0.shape, generator=g).to(x0.device), t)
        with torch.no_grad(), acc.autocast():
            x0_cond, x0_cfg = self.teachers.x0_parts(xt, t, cond, uncond, with_guidance=cfg.router_split)
        w = router(xt, t, cond, self.teachers.weights(t))  # [B, objectives, K]
        mixed = torch.einsum("bk,kb...->b...", w[:, 0], x0_cond.float())
        loss_dm = ((mixed - x0) ** 2).mean()
        logs = {"loss_router": loss_dm.detach(), "router_w0": w[:, 0, 0].detach().mean()}
        loss = loss_dm
        if cfg.router_split:
            guided = mixed.detach() + torch.einsum("bk,kb...->b...", w[:, 1], x0_cfg.float())
            loss_ca = ((guided - x0) ** 2).mean()
            loss = loss + loss_ca
            logs.update(loss_router_ca=loss_ca.detach(), router_ca_w0=w[:, 1, 0].detach().mean())
        acc.backward(loss)
        opt_r.step()
        opt_r.zero_grad(set_to_none=True)
        return {k: v.item() for k, v in logs.items()}

    @torch.no_grad()
    def real_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent_space.encode(images.to(self.accelerator.device)).float()

    def fresh_sample(self, student: nn.Module, step: int, j: int):
        """DMD2's fake-score input: a new batch of captions (and their real images, for the GAN head) and a new
        backward simulation of the current student, without grad; seeded by (seed, step, j), so resume is exact."""
        cfg, acc = self.config, self.accelerator
        g = generator("fake-sample", cfg.seed, step, j, self.rank)
        batch = collate([self.dataset[i] for i in torch.randint(len(self.dataset), (cfg.batch_size,), generator=g).tolist()])
        cond = self.text_encoder(list(batch["caption"]), device=acc.device)
        with torch.no_grad(), acc.autocast():
            x0, _ = self.backward_simulation(student, cond, g)
        real = self.real_latents(batch["image"]) if self.head is not None else None
        return x0.float(), real, cond

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

    def fake_score_updates(self, sample, step: int) -> dict[str, float]:
        """Flow matching of the fake score on student samples (`sample(j)` -> x0, real latents or None, cond for
        update j); with a GAN head, plus the discriminator loss on (noised) student samples vs. the real images
        under the same captions."""
        cfg, acc = self.config, self.accelerator
        fake, head, opt_f = self.prepared
        params = [p for group in opt_f.param_groups for p in group["params"]]  # fake net (+ GAN head)
        records = []
        for j in range(cfg.fake_updates):
            x0, real, cond = sample(j)
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
        self.sched_f.step()
        return {k: torch.stack([r[k] for r in records]).mean().item() for k in records[0]}

    # ---- regression targets ----------------------------------------------------------------
    @torch.no_grad()
    def regression_pairs(self) -> dict | None:
        """Teachers' ODE outputs (teacher_steps Euler steps, mixture velocity with CFG) for fixed noise + captions,
        cached in the run folder as safetensors (noise, target) + JSON (captions, teacher_steps, teachers) and
        reused when all of those match."""
        cfg = self.config
        if cfg.regression_pairs <= 0 or cfg.regression_weight <= 0:
            return None
        g = generator("regression-pairs", cfg.seed)
        idx = torch.randint(len(self.dataset), (cfg.regression_pairs,), generator=g).tolist()
        captions = [self.dataset[i]["caption"] for i in idx]
        c, h, w = self.latent_space.latent_shape(cfg.data.image_size, cfg.data.image_size)
        noise = torch.randn((len(captions), c, h, w), generator=g)
        meta = {"captions": captions, "teacher_steps": cfg.teacher_steps,
                "teachers": [spec.to_dict() for spec in parse_teachers(cfg.teachers)]}
        cached = self.cached_regression_pairs(meta, noise)
        if cached is not None:
            return cached
        sigmas = sigma_schedule(cfg.teacher_steps, 1.0)
        targets = []
        for s in tqdm(range(0, len(captions), 32), desc="teacher ODE targets",
                      disable=not self.accelerator.is_local_main_process):
            cond, uncond = self.encode(captions[s : s + 32])
            targets.append(euler_sample(lambda x, sig: self.teachers(x, sig, cond, uncond),
                                        noise[s : s + 32].to(self.accelerator.device), sigmas).cpu())
        pairs = {"captions": captions, "noise": noise, "target": torch.cat(targets)}
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / REGRESSION_META).unlink(missing_ok=True)
            save_file({"noise": noise.contiguous(), "target": pairs["target"].contiguous()},
                      str(self.out / REGRESSION_TENSORS))
            (self.out / REGRESSION_META).write_text(json.dumps(meta, indent=1) + "\n")
        return pairs

    def cached_regression_pairs(self, meta: dict, noise: torch.Tensor) -> dict | None:
        """The run folder's targets when they were computed for exactly these captions, noise and teachers."""
        meta_file, tensor_file = self.out / REGRESSION_META, self.out / REGRESSION_TENSORS
        if not (meta_file.is_file() and tensor_file.is_file()):
            return None
        try:
            saved, tensors = json.loads(meta_file.read_text()), load_file(str(tensor_file))
        except (OSError, ValueError, SafetensorError):
            return None  # unreadable: computed again and overwritten
        if json.dumps(saved, sort_keys=True) != json.dumps(meta, sort_keys=True) or not torch.equal(
                tensors.get("noise", torch.empty(0)), noise):
            return None
        return {"captions": meta["captions"], "noise": tensors["noise"], "target": tensors["target"]}

    # ---- what the run ships ------------------------------------------------------------------
    def shipped_pipeline(self, model: nn.Module) -> TextToImagePipeline:
        """The student; with `finisher_steps`, the first teacher rides along to take the last steps."""
        pipe = super().shipped_pipeline(model)
        if self.config.finisher_steps <= 0:
            return pipe
        return pipe.with_finisher(copy.deepcopy(self.teachers.models[0]).float(), self.config.finisher_steps)


def distill(config: DistillConfig) -> dict:
    """Train a student through the engine; -> the engine's result (step, elapsed_s, stopped, exported)."""
    return DistillTrainer(config).train()
