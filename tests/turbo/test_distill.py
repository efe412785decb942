"""Distillation (DMD2-style and MT-DMD) on a random tiny teacher: runs, resumes exactly, ships a pipeline."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.turbo.distill import DistillConfig, DistillTrainer
from ernielab.turbo.teachers import TeacherMixture, TeacherSpec, mixture_weights, parse_teachers


def tiny_distill(tmp_path, teacher, **kw):
    base = dict(teachers=[{"path": str(teacher), "guidance_scale": 2.0}], output_dir=str(tmp_path),
                data={"kind": "shapes", "size": 64}, student_steps=[4, 2], steps=4, batch_size=2,
                lr=1e-3, warmup_steps=1, fake_updates=2, log_every=2, save_every=2, ema_decay=0.9)
    return DistillConfig.from_dict({**base, **kw})


def test_distill_runs_resumes_exactly_and_ships_student(tmp_path, tiny_pipeline_dir):
    from ernielab.image.pipeline import TextToImagePipeline

    result = DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=2)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir)).train()  # resumes at step 2
    assert result["step"] == 4
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_dmd" in r]
    assert [r["step"] for r in losses] == [2, 4]
    assert all(torch.isfinite(torch.tensor([r["loss_dmd"], r["loss_fake"]])).all() for r in losses)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher = load_file(str(tiny_pipeline_dir / "transformer" / "model.safetensors"))
    assert max((a[k] - teacher[k]).abs().max().item() for k in a) > 0  # the student moved

    student = TextToImagePipeline.from_pretrained(tmp_path / "straight" / "student")
    assert (student.config.steps, student.config.guidance_scale) == (4, 1.0)
    batches = []  # guidance 1: one conditional forward per step, no unconditional pass
    student.transformer.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    images = student.generate(["a red circle", "two blue squares"], seed=0)
    assert batches == [2, 2, 2, 2]
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    teacher_pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    assert not torch.allclose(images, teacher_pipe.generate(["a red circle", "two blue squares"], seed=0,
                                                            steps=4, guidance_scale=1.0))


def test_mt_dmd_with_regression(tmp_path, tiny_pipeline_dir):
    teachers = [{"path": str(tiny_pipeline_dir), "guidance_scale": 2.0, "knots": [[0.0, 0.0], [1.0, 1.0]]},
                {"path": str(tiny_pipeline_dir), "guidance_scale": 1.0, "knots": [[0.0, 1.0], [1.0, 0.0]]}]
    cfg = tiny_distill(tmp_path, tiny_pipeline_dir, teachers=teachers, steps=2, regression_pairs=4,
                       regression_batch=2, regression_weight=0.5, teacher_steps=3, student_steps=[2])
    DistillTrainer(cfg).train()
    record = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss_reg" in l][-1]
    assert record["loss_reg"] > 0 and torch.isfinite(torch.tensor(record["loss_reg"]))
    assert torch.load(tmp_path / "regression_pairs.pt", weights_only=False)["target"].shape == (4, 48, 8, 8)
    assert json.loads((tmp_path / "train_config.json").read_text())["sampling"]["guidance_scale"] == 1.0


def test_gan_head_trains_resumes_exactly_and_leaves_the_fake_net_out_of_the_generator_step(tmp_path, tiny_pipeline_dir):
    gan = dict(gan_weight=0.5, gan_feature_depth=1)
    DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir, **gan)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=2, **gan)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **gan)).train()
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_gan" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["loss_gan"] > 0 and r["loss_disc"] > 0 and 0 <= r["disc_acc"] <= 1 for r in logged)
    a, b = (torch.load(latest_checkpoint(tmp_path / d) / "optimizer.pt", weights_only=False) for d in ("straight", "split"))
    head_a, head_b = a["optimizer"]["gan_head"], b["optimizer"]["gan_head"]
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)  # the head resumes exactly too
    # a run that started without the head refuses to resume with it
    with pytest.raises(ValueError, match="GAN head"):
        DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=6)).train()

    # the generator's GAN loss reaches the student's sample, not the fake net's weights
    trainer = DistillTrainer(tiny_distill(tmp_path / "probe", tiny_pipeline_dir, **gan))
    x0 = torch.randn(2, 48, 8, 8, requires_grad=True)
    cond, _ = trainer.encode(["a red circle", "two blue squares"])
    trainer.gan_generator_loss(x0, cond, torch.Generator().manual_seed(0)).backward()
    assert x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in trainer.fake.parameters()) and all(p.requires_grad for p in trainer.fake.parameters())


def test_finisher_takes_the_last_step_and_round_trips(tmp_path, tiny_pipeline_dir):
    import copy

    from ernielab.image.pipeline import TextToImagePipeline

    student = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    teacher = copy.deepcopy(student.transformer)
    for p in teacher.parameters():  # a different network, so its step shows in the output
        p.data.add_(0.05 * torch.randn_like(p))
    hybrid = student.with_finisher(teacher, steps=1)
    calls = {"student": [], "finisher": []}
    student.transformer.register_forward_hook(lambda m, a, o: calls["student"].append(len(a[0])))
    teacher.register_forward_hook(lambda m, a, o: calls["finisher"].append(len(a[0])))
    prompts = ["a red circle", "two blue squares"]
    images = hybrid.generate(prompts, seed=0, steps=4, guidance_scale=2.0)
    assert calls == {"student": [4, 4, 4], "finisher": [2]}  # CFG doubles the student's batch, never the finisher's
    assert not torch.allclose(images, student.generate(prompts, seed=0, steps=4, guidance_scale=2.0))
    hybrid.save_pretrained(tmp_path / "hybrid")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "hybrid")
    assert loaded.config.finisher_steps == 1
    assert torch.allclose(loaded.generate(prompts, seed=0, steps=4, guidance_scale=2.0), images, atol=1e-5)
    (tmp_path / "hybrid" / "finisher" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="finisher"):
        TextToImagePipeline.from_pretrained(tmp_path / "hybrid")
    from ernielab.image.config import ErnieImageConfig
    from ernielab.image.transformer import ErnieImageTransformer

    wrong_text = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=48, text_in_dim=32))
    with pytest.raises(ValueError, match="text_in_dim 32 differs from 384"):
        student.with_finisher(wrong_text)


def test_distill_ships_the_teacher_as_finisher_when_asked(tmp_path, tiny_pipeline_dir):
    from ernielab.image.pipeline import TextToImagePipeline

    DistillTrainer(tiny_distill(tmp_path, tiny_pipeline_dir, steps=1, finisher_steps=1)).train()
    shipped = TextToImagePipeline.from_pretrained(tmp_path / "student")
    teacher = load_file(str(tiny_pipeline_dir / "transformer" / "model.safetensors"))
    finisher = load_file(str(tmp_path / "student" / "finisher" / "model.safetensors"))
    assert shipped.config.finisher_steps == 1 and all(torch.equal(teacher[k], finisher[k]) for k in teacher)


def test_hidden_states_are_the_image_tokens_after_that_many_blocks(tiny_pipeline_dir):
    from ernielab.image.transformer import ErnieImageTransformer

    model = ErnieImageTransformer.from_pretrained(tiny_pipeline_dir / "transformer").eval()
    x, t, text = torch.randn(1, 48, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, model.config.text_in_dim)
    seen = []
    model.layers[0].register_forward_hook(lambda module, args, out: seen.append(out[:, :64]))
    out, hidden = model(x, t, text, return_hidden_at=1)
    assert torch.equal(out, model(x, t, text)) and torch.equal(hidden, seen[0])
    with pytest.raises(ValueError, match="return_hidden_at"):
        model(x, t, text, return_hidden_at=model.config.num_layers + 1)


def test_mixture_weights_sum_to_one_and_route_by_sigma():
    layout = TeacherSpec(path="a", knots=[[0.3, 0.0], [0.7, 1.0]], center=0.9)
    detail = TeacherSpec(path="b", knots=[[0.3, 1.0], [0.7, 0.0]], center=0.1)
    sigma = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    for weighting in ("piecewise_linear", "softmax"):
        w = mixture_weights(sigma, [layout, detail], weighting)
        torch.testing.assert_close(w.sum(1), torch.ones(5))
        assert (w >= 0).all()
        assert w[0, 1] > 0.9 and w[-1, 0] > 0.9  # detail teacher at low noise, layout teacher at high noise
        assert (w[1:, 0] >= w[:-1, 0]).all()  # layout's share grows with sigma
    torch.testing.assert_close(mixture_weights(sigma, [layout, detail])[2], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="all zero"):
        mixture_weights(sigma, [TeacherSpec(path="a", knots=[[0.0, 0.0], [0.5, 0.0], [0.6, 1.0]])])
    with pytest.raises(ValueError, match="knots"):
        parse_teachers([{"path": "a", "knots": [[2.0, 1.0]]}])


def test_mixture_velocity_is_the_weighted_teacher_velocity():
    """Two constant 'teachers' with a hand-off at sigma 0.5: the mixture equals the weighted sum per sample."""

    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x, t, text, lens):
            return torch.full_like(x, self.value)

    specs = [TeacherSpec(path="a", guidance_scale=1.0, knots=[[0.0, 1.0], [1.0, 0.0]]),
             TeacherSpec(path="b", guidance_scale=3.0, knots=[[0.0, 0.0], [1.0, 1.0]])]
    mix = TeacherMixture([Constant(1.0), Constant(5.0)], specs)
    x, sigma = torch.zeros(3, 2, 2, 2), torch.tensor([0.0, 0.5, 1.0])
    text = (torch.zeros(3, 1, 4), torch.ones(3, dtype=torch.long))
    v = mix(x, sigma, text, text)
    torch.testing.assert_close(v[:, 0, 0, 0], torch.tensor([1.0, 3.0, 5.0]))


def test_cli_bad_config_is_one_error_line(tmp_path, tiny_pipeline_dir):
    from ernielab.cli.main import app

    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"teachers": [{"path": str(tmp_path / "missing")}]}))
    result = runner.invoke(app, ["distill", str(bad)])
    assert result.exit_code == 2 and result.output.strip().startswith("error:") and "missing" in result.output
    bad.write_text(json.dumps({"teachers": [], "output_dir": str(tmp_path)}))
    result = runner.invoke(app, ["distill", str(bad)])
    assert result.exit_code == 2 and "at least one teacher" in result.output
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], "fake_updates": 0}))
    result = runner.invoke(app, ["distill", str(bad), "--set", "steps=1"])
    assert result.exit_code == 2 and "fake_updates" in result.output
    result = runner.invoke(app, ["distill", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "not found" in result.output


def test_final_step_loss_matches_the_teacher_at_the_last_step(tmp_path, tiny_pipeline_dir):
    trainer = DistillTrainer(tiny_distill(tmp_path, tiny_pipeline_dir, final_step_weight=1.0))
    cond, _ = trainer.encode(["a red circle", "two blue squares"])
    x_k = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    student = trainer.model
    assert trainer.final_step_loss(student, x_k, 0, 4, cond).item() < 1e-10  # starts as the teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    hook = student.register_forward_hook(lambda m, a, o: calls.append(float(a[1][0])))
    loss = trainer.final_step_loss(student, x_k, 1, 4, cond)
    hook.remove()
    assert loss.item() > 1e-6
    assert calls == pytest.approx([750.0, 500.0, 250.0])  # steps 1 and 2 without grad, then the last sigma (0.25)
    loss.backward()
    assert all(p.grad is None for p in trainer.teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    DistillTrainer(tiny_distill(tmp_path / "run", tiny_pipeline_dir, steps=2, final_step_weight=1.0)).train()
    record = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss_final" in l]
    assert record and torch.isfinite(torch.tensor(record[-1]["loss_final"]))


def test_distill_refuses_to_resume_a_plain_training_run(tmp_path, tiny_pipeline_dir):
    from ernielab.image.train import Trainer

    cfg = tiny_distill(tmp_path, tiny_pipeline_dir, steps=1)
    Trainer(plain_train_config_for(cfg)).train()  # a plain run's checkpoint in the same folder
    with pytest.raises(ValueError, match="not a distillation checkpoint"):
        DistillTrainer(cfg).train()


def plain_train_config_for(cfg: DistillConfig):
    from ernielab.turbo.distill import plain_train_config, resolve_config

    return plain_train_config(resolve_config(cfg))
