"""Distillation (DMD2-style and MT-DMD) on a random tiny teacher: runs on the core engine, resumes exactly,
ships a pipeline."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.cli.main import app
from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.turbo.distill import REGRESSION_META, REGRESSION_TENSORS, DistillConfig, DistillTrainer
from ernielab.turbo.teachers import TeacherMixture, TeacherSpec, mixture_weights, parse_teachers

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "turbo"


def tiny_distill(tmp_path, teacher, **kw):
    base = dict(teachers=[{"path": str(teacher), "guidance_scale": 2.0}], output_dir=str(tmp_path),
                data={"kind": "shapes", "size": 64}, student_steps=[4, 2], steps=4, batch_size=2,
                lr=1e-3, warmup_steps=1, fake_updates=2, log_every=2, save_every=2, ema_decay=0.9)
    return DistillConfig.from_dict({**base, **kw})


def built(cfg: DistillConfig) -> DistillTrainer:
    """A trainer with its modules (student, teachers, fake score, head) built, as the engine would, untrained."""
    from accelerate import Accelerator

    from ernielab.core.engine import Engine

    trainer = DistillTrainer(cfg)
    Engine(trainer, Accelerator(cpu=True))
    trainer.build()
    return trainer


def assert_same_state(a, b, where=""):
    """Nested checkpoint states (tensors, numbers, lists, dicts) are identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_distill_runs_resumes_exactly_and_ships_student(tmp_path, tiny_pipeline_dir):
    from ernielab.image.pipeline import TextToImagePipeline

    result = DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=2)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir)).train()  # resumes at step 2
    assert result["step"] == 4 and result["stopped"] is None
    assert result["exported"] == str(tmp_path / "straight" / "student")
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_dmd" in r]
    assert [r["step"] for r in losses] == [2, 4]
    assert all(torch.isfinite(torch.tensor([r["loss_dmd"], r["loss_fake"]])).all() for r in losses)
    straight, split = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert straight["step"] == split["step"] == 4
    assert set(straight["modules"]) == {"model", "ema", "fake"}
    # student, its EMA, the fake score, the generator's and the fake score's optimizer and schedule: all identical
    assert_same_state(straight["modules"], split["modules"], "modules")
    assert_same_state(straight["states"], split["states"], "states")
    assert set(straight["states"]["task"]) == {"fake_optimizer", "fake_scheduler"}
    a = straight["modules"]["model"]
    teacher = load_file(str(tiny_pipeline_dir / "transformer" / "model.safetensors"))
    assert max((a[k] - teacher[k]).abs().max().item() for k in a) > 0  # the student moved

    student = TextToImagePipeline.from_pretrained(tmp_path / "straight" / "student")
    assert (student.config.steps, student.config.guidance_scale) == (4, 1.0)
    batches = []  # guidance 1: one conditional forward per step, no unconditional pass
    student.transformer.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    images = student(["a red circle", "two blue squares"], seed=0, output_type="pt").images
    assert batches == [2, 2, 2, 2]
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    teacher_pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    assert not torch.allclose(images, teacher_pipe(["a red circle", "two blue squares"], seed=0, num_inference_steps=4,
                                                   guidance_scale=1.0, output_type="pt").images)


def test_mt_dmd_with_regression(tmp_path, tiny_pipeline_dir):
    teachers = [{"path": str(tiny_pipeline_dir), "guidance_scale": 2.0, "knots": [[0.0, 0.0], [1.0, 1.0]]},
                {"path": str(tiny_pipeline_dir), "guidance_scale": 1.0, "knots": [[0.0, 1.0], [1.0, 0.0]]}]
    cfg = tiny_distill(tmp_path, tiny_pipeline_dir, teachers=teachers, steps=2, regression_pairs=4,
                       regression_batch=2, regression_weight=0.5, teacher_steps=3, student_steps=[2])
    DistillTrainer(cfg).train()
    record = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss_reg" in l][-1]
    assert record["loss_reg"] > 0 and torch.isfinite(torch.tensor(record["loss_reg"]))
    tensors = load_file(str(tmp_path / REGRESSION_TENSORS))  # safetensors + JSON, nothing pickled
    meta = json.loads((tmp_path / REGRESSION_META).read_text())
    assert tensors["target"].shape == tensors["noise"].shape == (4, 48, 8, 8)
    assert len(meta["captions"]) == 4 and meta["teacher_steps"] == 3 and [t["guidance_scale"] for t in meta["teachers"]] == [2.0, 1.0]
    assert not list(tmp_path.glob("*.pt"))
    assert json.loads((tmp_path / "train_config.json").read_text())["sampling"]["guidance_scale"] == 1.0
    # the cached targets are reused while captions, noise and teachers match, and recomputed when the teachers change
    stamp = (tmp_path / REGRESSION_TENSORS).stat().st_mtime_ns
    pairs = built(cfg).regression_pairs()
    assert torch.equal(pairs["target"], tensors["target"]) and (tmp_path / REGRESSION_TENSORS).stat().st_mtime_ns == stamp
    other = built(cfg.replace(teachers=[TeacherSpec(path=str(tiny_pipeline_dir), guidance_scale=3.0)])).regression_pairs()
    assert not torch.equal(other["target"], tensors["target"])
    assert json.loads((tmp_path / REGRESSION_META).read_text())["teachers"][0]["guidance_scale"] == 3.0


def test_gan_head_trains_resumes_exactly_and_leaves_the_fake_net_out_of_the_generator_step(tmp_path, tiny_pipeline_dir):
    gan = dict(gan_weight=0.5, gan_feature_depth=1)
    DistillTrainer(tiny_distill(tmp_path / "straight", tiny_pipeline_dir, **gan)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=2, **gan)).train()
    DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, **gan)).train()
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_gan" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["loss_gan"] > 0 and r["loss_disc"] > 0 and 0 <= r["disc_acc"] <= 1 for r in logged)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert set(a["modules"]) == {"model", "ema", "fake", "gan_head"}
    assert_same_state(a["modules"], b["modules"], "modules")  # the head resumes exactly too
    assert_same_state(a["states"], b["states"], "states")  # and the fake-score optimizer that trains it
    # a run that started with the head refuses to resume without it (before anything is written)
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "split").rglob("*"))
    with pytest.raises(ValueError, match="gan_weight"):
        DistillTrainer(tiny_distill(tmp_path / "split", tiny_pipeline_dir, steps=6)).train()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "split").rglob("*")) == files

    # the generator's GAN loss reaches the student's sample, not the fake net's weights
    trainer = built(tiny_distill(tmp_path / "probe", tiny_pipeline_dir, **gan))
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
    images = hybrid(prompts, seed=0, num_inference_steps=4, guidance_scale=2.0, output_type="pt").images
    assert calls == {"student": [4, 4, 4], "finisher": [2]}  # CFG doubles the student's batch, never the finisher's
    assert not torch.allclose(images, student(prompts, seed=0, num_inference_steps=4, guidance_scale=2.0,
                                              output_type="pt").images)
    hybrid.save_pretrained(tmp_path / "hybrid")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "hybrid")
    assert loaded.config.finisher_steps == 1
    assert torch.allclose(loaded(prompts, seed=0, num_inference_steps=4, guidance_scale=2.0, output_type="pt").images,
                          images, atol=1e-5)
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
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    out = tmp_path / "run"

    def train(*args):
        result = runner.invoke(app, ["turbo", "train", str(bad), "--output-dir", str(out), *args])
        assert result.exit_code == 2 and result.output.strip().startswith("error:"), result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()  # nothing written
        return result.output

    bad.write_text(json.dumps({"teachers": [{"path": str(tmp_path / "missing")}]}))
    assert "missing" in train()
    bad.write_text(json.dumps({"teachers": []}))
    assert "at least one teacher" in train()
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], "fake_updates": 0}))
    assert "fake_updates" in train("--set", "steps=1")
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], "student_steps": "eight"}))
    assert "student_steps" in train()
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir), "knots": [[0.0, 0.0], [0.5, 0.0], [0.6, 1.0]]}]}))
    assert "all zero" in train()
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], "dmd_sigma_min": 0.9, "dmd_sigma_max": 0.5}))
    assert "dmd_sigma_min" in train()
    bad.write_text(json.dumps({"teachers": [{"path": str(tiny_pipeline_dir)}], "distill_steps": 3}))
    assert "distill_steps" in train()
    bad = tmp_path / "nope.json"
    assert "not found" in train()
    assert runner.invoke(app, ["distill", str(bad)]).exit_code == 2  # the old top-level command is gone


def test_final_step_loss_matches_the_teacher_at_the_last_step(tmp_path, tiny_pipeline_dir):
    trainer = built(tiny_distill(tmp_path, tiny_pipeline_dir, final_step_weight=1.0))
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
    with pytest.raises(ValueError, match=r"other settings \(fake_init_from"):
        DistillTrainer(cfg).train()


def plain_train_config_for(cfg: DistillConfig):
    """The plain flow-matching config with the same values for every field the two share."""
    from ernielab.image.train import TrainConfig
    from ernielab.turbo.distill import resolve_config

    names = set(TrainConfig.__dataclass_fields__)
    return TrainConfig.from_dict({k: v for k, v in resolve_config(cfg).to_dict().items() if k in names})


def test_every_turbo_config_loads_and_names_its_models():
    names = sorted(p.stem for p in CONFIGS.glob("*.json"))
    assert {"dmd", "dmd_reg", "dmd_final", "dmd_gan", "mt_dmd", "mt_dmd_branch"} <= set(names)
    for path in CONFIGS.glob("*.json"):
        cfg = DistillConfig.load(path)  # strict: unknown keys and out-of-range values fail
        raw = json.loads(path.read_text())
        # teachers and student are named explicitly (the Turbo table's base is runs/default_v1, not today's bundle)
        assert raw.get("init_from") and raw.get("teachers"), path.name
        assert all(t.path != "src/ernielab/assets/default" for t in cfg.teachers), path.name
        assert cfg.output_dir.startswith("runs/distill/"), path.name


def cli_overrides(teacher):
    """Shrink a shipped config to a seconds-long run on the tiny teacher."""
    sets = {"teachers": json.dumps([{"path": str(teacher), "guidance_scale": 2.0}]), "init_from": str(teacher),
            "steps": 2, "batch_size": 2, "data.size": 64, "student_steps": "[2]", "regression_pairs": 2,
            "regression_batch": 2, "teacher_steps": 2, "log_every": 1, "save_every": 1, "max_minutes": 0}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_cli_trains_a_shipped_config(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["turbo", "train", str(CONFIGS / "dmd.json"), *cli_overrides(tiny_pipeline_dir),
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output and f"exported to {out / 'student'}" in result.output
    assert (out / "student" / "pipeline.json").is_file() and (out / REGRESSION_META).is_file()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["regression_weight"] == 0.25 and saved["sampling"]["steps"] == 2


def test_time_limit_saves_and_exports_nothing(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "run"
    args = ["turbo", "train", str(CONFIGS / "dmd.json"), *cli_overrides(tiny_pipeline_dir), "--output-dir", str(out)]
    result = CliRunner().invoke(app, [*args, "--set", "max_minutes=1e-9"])
    assert result.exit_code == 0, result.output
    assert "time limit" in result.output and "nothing exported" in result.output
    assert not (out / "student").exists()  # no partial student
    assert load_checkpoint(latest_checkpoint(out))["step"] == 1  # but the step it reached is saved
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["done"] is False and "time limit" in records[-1]["stopped"]
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.image.train import export_checkpoint

    partial = export_checkpoint(out, tmp_path / "partial")  # a partial student only when asked for explicitly
    assert (TextToImagePipeline.from_pretrained(partial).config.steps, partial.parent) == (2, tmp_path)
    result = CliRunner().invoke(app, args)  # the same command without the limit resumes and ships
    assert result.exit_code == 0 and "trained to step 2" in result.output, result.output
    assert (out / "student" / "pipeline.json").is_file()
