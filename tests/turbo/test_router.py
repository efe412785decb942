"""MT-DMD's learned router over (x_t, sigma, caption), the CA/DM split of the real score, and DMD2's fresh
student samples for each fake-score update: on tiny teachers and a random tiny pipeline."""
import json

import pytest
import torch
from typer.testing import CliRunner

from ernielab.cli.main import app
from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.image.flow_matching import TIMESTEP_SCALE
from ernielab.turbo.distill import DistillTrainer
from ernielab.turbo.router import PRIOR_FLOOR, TeacherRouter
from ernielab.turbo.teachers import TeacherMixture, TeacherSpec, cond_and_guided_velocity

from test_distill import assert_same_state, built, tiny_distill  # tests/turbo/test_distill.py: the tiny run helpers


def two_teachers(path, uniform=False):
    knots = ([], []) if uniform else ([[0.3, 0.0], [0.7, 1.0]], [[0.3, 1.0], [0.7, 0.0]])
    return [{"path": str(path), "guidance_scale": 3.0, "knots": knots[0]},
            {"path": str(path), "guidance_scale": 1.5, "knots": knots[1]}]


def perturbed_mixture(tiny_pipeline_dir, guidance=(2.0, 3.0)):
    """Two different tiny teachers (the second one's weights moved), sigma-weighted with a hand-over."""
    specs = [TeacherSpec(path="a", guidance_scale=guidance[0], knots=[[0.2, 0.0], [0.8, 1.0]]),
             TeacherSpec(path="b", guidance_scale=guidance[1], knots=[[0.2, 1.0], [0.8, 0.0]])]
    mix = TeacherMixture.load([TeacherSpec(path=str(tiny_pipeline_dir))] * 2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in mix.models[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return TeacherMixture(list(mix.models), specs)


def inputs(text_encoder, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a red circle", "two blue squares left of a green triangle", "a big triangle"][:n]
    return (torch.randn(n, 48, 8, 8, generator=g), torch.rand(n, generator=g) * 0.9 + 0.05,
            text_encoder(captions), text_encoder([""] * n))


def test_untrained_router_is_the_sigma_prior_and_its_weights_depend_on_x_sigma_and_caption(text_encoder):
    x, sigma, cond, _ = inputs(text_encoder)
    router = TeacherRouter(48, text_encoder.dim, n_teachers=3, n_objectives=2, hidden=16)
    prior = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    w = router(x, sigma, cond, prior)
    assert w.shape == (3, 2, 3)
    floored = prior.clamp_min(PRIOR_FLOOR)
    torch.testing.assert_close(w, (floored / floored.sum(1, keepdim=True))[:, None].expand(3, 2, 3))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained router: the last layer no longer zero
        torch.nn.init.normal_(router.net[-1].weight, std=1.0)
    w = router(x, sigma, cond, prior)
    assert ((w >= 0) & (w <= 1)).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    assert not torch.allclose(w[:, 0], w[:, 1])  # per-objective heads
    other_text = text_encoder(["three small circles", "a square", "a circle above a square"])
    for changed in (router(x + 1.0, sigma, cond, prior), router(x, sigma.flip(0), cond, prior),
                    router(x, sigma, other_text, prior)):
        assert not torch.allclose(changed, w)


def test_ca_dm_split_with_equal_weights_is_bit_identical_and_otherwise_the_stated_decomposition(
        tiny_pipeline_dir, text_encoder):
    mix = perturbed_mixture(tiny_pipeline_dir)
    x, sigma, cond, uncond = inputs(text_encoder)
    unsplit = mix(x, sigma, cond, uncond)
    w = mix.weights(sigma)
    assert torch.equal(mix(x, sigma, cond, uncond, w), unsplit)
    assert torch.equal(mix(x, sigma, cond, uncond, w, w.clone()), unsplit)  # CA weights = DM weights: exact
    a, b = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]])
    split = mix(x, sigma, cond, uncond, a, b)
    expected = torch.zeros_like(x)
    for k, (model, spec) in enumerate(zip(mix.models, mix.specs)):
        t = sigma * TIMESTEP_SCALE
        v_c, v_u = model(x, t, *cond), model(x, t, *uncond)
        expected += a[:, k, None, None, None] * v_c + b[:, k, None, None, None] * (spec.guidance_scale - 1) * (v_c - v_u)
    torch.testing.assert_close(split, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(split, unsplit)
    x0_cond, x0_cfg = mix.x0_parts(x, sigma, cond, uncond)  # the x0 form: conditional x0 + its CFG augmentation
    s = sigma.view(-1, 1, 1, 1)
    for k, (model, spec) in enumerate(zip(mix.models, mix.specs)):
        v_c, v_g = cond_and_guided_velocity(model, x, sigma, cond, uncond, spec.guidance_scale)
        torch.testing.assert_close(x0_cond[k], x - s * v_c)
        torch.testing.assert_close(x0_cond[k] + x0_cfg[k], x - s * v_g, atol=1e-5, rtol=1e-5)


def test_untrained_split_router_gives_the_unsplit_real_score_exactly(tmp_path, tiny_pipeline_dir, text_encoder):
    trainer = built(tiny_distill(tmp_path, tiny_pipeline_dir, teachers=two_teachers(tiny_pipeline_dir),
                                 teacher_router=True, router_split=True))
    x, sigma, cond, uncond = inputs(text_encoder)
    w = trainer.router(x, sigma, cond, trainer.teachers.weights(sigma))
    assert torch.equal(w[:, 0], w[:, 1])  # both heads start at the same prior
    assert torch.equal(trainer.real_velocity(x, sigma, cond, uncond), trainer.teachers(x, sigma, cond, uncond, w[:, 0]))


class Identity(torch.nn.Module):
    """Predicts x0 = x_t: right at low noise."""

    def forward(self, x, t, text, lens):
        return torch.zeros_like(x)


class Zero(torch.nn.Module):
    """Predicts x0 = 0: better than x_t at high noise."""

    def forward(self, x, t, text, lens):
        return x / (t / TIMESTEP_SCALE).view(-1, 1, 1, 1)


def test_router_learns_to_prefer_the_teacher_that_denoises_real_data_best(tmp_path, tiny_pipeline_dir):
    cfg = tiny_distill(tmp_path, tiny_pipeline_dir, teachers=two_teachers(tiny_pipeline_dir, uniform=True),
                       teacher_router=True, router_lr=1e-2, batch_size=8, dmd_sigma_min=0.02, dmd_sigma_max=0.98)
    trainer = built(cfg)
    specs = [TeacherSpec(path="identity", guidance_scale=1.0), TeacherSpec(path="zero", guidance_scale=1.0)]
    trainer.teachers = TeacherMixture([Identity(), Zero()], specs)
    trainer.prepare_auxiliary()
    batch = trainer.batch(1000, 0)  # held out: a step the updates below never draw
    cond, _ = trainer.encode(list(batch["caption"]))
    x0 = trainer.real_latents(batch["image"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def identity_share_and_error(sigma):
        s = torch.full((len(x0),), sigma)
        xt = (1 - sigma) * x0 + sigma * noise
        w = trainer.router(xt, s, cond, trainer.teachers.weights(s))[:, 0]
        mixed = w[:, 0, None, None, None] * xt  # the zero teacher contributes w_1 * 0
        return w[:, 0].mean().item(), ((mixed - x0) ** 2).mean().item()

    sigmas = (0.05, 0.3, 0.5, 0.7, 0.95)
    before = [identity_share_and_error(s) for s in sigmas]
    assert all(share == pytest.approx(0.5) for share, _ in before)  # uniform prior, untrained router
    for step in range(60):
        batch = trainer.batch(step, 0)
        cond_step, uncond = trainer.encode(list(batch["caption"]))
        trainer.router_update(batch["image"], cond_step, uncond, step)
    after = [identity_share_and_error(s) for s in sigmas]
    assert sum(e for _, e in after) < 0.8 * sum(e for _, e in before)
    assert after[0][0] > 0.6 and after[-1][0] < 0.4  # x_t itself at low noise, the zero guess at high noise


def test_router_run_checkpoints_and_resumes_exactly(tmp_path, tiny_pipeline_dir):
    kw = dict(teachers=two_teachers(tiny_pipeline_dir), teacher_router=True, router_split=True, router_hidden=16)
    DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir, **kw)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=2, **kw)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **kw)).train()
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert set(a["modules"]) == {"model", "ema", "fake", "router"}
    assert set(a["states"]["task"]) == {"fake_optimizer", "fake_scheduler", "router_optimizer"}
    assert_same_state(a["modules"], b["modules"], "modules")
    assert_same_state(a["states"], b["states"], "states")
    assert a["modules"]["router"]["net.4.weight"].abs().sum() > 0  # it trained
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_router" in r]
    assert [r["step"] for r in logged] == [2, 4] and all(r["loss_router_ca"] > 0 and 0 <= r["router_w0"] <= 1 for r in logged)
    with pytest.raises(ValueError, match="teacher_router"):  # a router run does not resume without its router
        DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **{**kw, "teacher_router": False,
                                                                           "router_split": False, "steps": 6})).train()


def test_fresh_fake_samples_differ_per_update_and_resume_exactly(tmp_path, tiny_pipeline_dir):
    kw = dict(fresh_fake_samples=True, fake_updates=3)
    trainer = built(tiny_distill(tmp_path / "probe", tiny_pipeline_dir, **kw))
    first, second, again = (trainer.fresh_sample(trainer.model, 5, j) for j in (0, 1, 0))
    assert not torch.allclose(first[0], second[0]) and not torch.equal(first[2][0], second[2][0])
    assert torch.equal(first[0], again[0]) and first[1] is None  # a function of (seed, step, j); real only with a GAN
    assert not first[0].requires_grad

    kw.update(steps=2, save_every=1)
    DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir, **kw)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **{**kw, "steps": 1})).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **kw)).train()
    DistillTrainer(tiny_distill(tmp_path / "reused", tiny_pipeline_dir, fake_updates=3, steps=2, save_every=1)).train()
    a, b, reused = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split", "reused"))
    assert_same_state(a["modules"], b["modules"], "modules")
    assert_same_state(a["states"], b["states"], "states")
    fake, fake_reused = a["modules"]["fake"], reused["modules"]["fake"]
    assert any(not torch.equal(fake[k], fake_reused[k]) for k in fake)  # fresh samples train the fake score differently


def test_fresh_fake_samples_with_a_gan_head_draw_their_own_real_images(tmp_path, tiny_pipeline_dir):
    trainer = built(tiny_distill(tmp_path, tiny_pipeline_dir, fresh_fake_samples=True, gan_weight=0.5,
                                 gan_feature_depth=1))
    x0, real, cond = trainer.fresh_sample(trainer.model, 0, 0)
    assert real is not None and real.shape == x0.shape and len(cond[0]) == len(x0)


def test_bad_router_settings_are_one_error_line(tmp_path, tiny_pipeline_dir):
    bad, out = tmp_path / "bad.json", tmp_path / "run"
    for settings, message in (({"teacher_router": True}, "at least two teachers"),
                              ({"router_split": True, "teachers": two_teachers(tiny_pipeline_dir)}, "router_split needs"),
                              ({"router_lr": 0}, "router_lr")):
        bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], **settings}))
        result = CliRunner().invoke(app, ["turbo", "train", str(bad), "--output-dir", str(out)])
        assert result.exit_code == 2 and result.output.startswith("error:") and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
