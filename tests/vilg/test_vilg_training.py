import json

import pytest
import torch
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import sample_training_sigmas
from ernielab.image.train import StepBatchSampler
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.vilg.experts import MixtureOfDenoisingExperts, expert_index, expert_of_timestep, uniform_boundaries
from ernielab.vilg.train import KnowledgeConfig, VilgTrainConfig, VilgTrainer, sample_sigmas_between, stage2_config
from ernielab.worlds.registry import build_dataset, collate


def tiny(out, **kw) -> VilgTrainConfig:
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384), output_dir=str(out), steps=3,
                batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, save_every=3, ema_decay=0.9,
                data={"kind": "shapes", "size": 1000, "image_size": 32})
    base.update(kw)
    return VilgTrainConfig.from_dict({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in base.items()})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = tiny(out)
    VilgTrainer(cfg).train()
    return cfg


def test_sigmas_between_stay_inside_and_keep_the_marginal():
    g = torch.Generator().manual_seed(0)
    b = uniform_boundaries(4)
    ref = sample_training_sigmas(10_000, g, "logit_normal", 3.0)
    mix = torch.zeros(10)
    for k in range(4):
        s = sample_sigmas_between(10_000, g, b[k], b[k + 1], "logit_normal", 3.0)
        assert (expert_of_timestep(s * 1000, b) == k).all()  # routed by the float32 timestep the model sees
        mix += torch.histc(s, 10, 0, 1) / len(s) * (expert_index(ref, b) == k).float().mean()
    torch.testing.assert_close(mix, torch.histc(ref, 10, 0, 1) / len(ref), atol=1.5e-2, rtol=0)


def test_stage2_starts_as_stage1_and_trains_only_the_owning_expert(stage1, tmp_path):
    cfg = stage2_config(stage1, 4, 1, str(tmp_path / "s2"), save_every=1)
    trainer = VilgTrainer(cfg)
    mode = trainer.model
    assert isinstance(mode, MixtureOfDenoisingExperts) and mode.num_experts == 4
    ckpt = latest_checkpoint(stage1.output_dir)
    single = ErnieImageTransformer(stage1.model)
    single.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    ema1 = load_file(str(ckpt / "ema.safetensors"))
    for k, v in ema1.items():  # EMA copied into every expert, its warm-up counting on from stage 1
        assert all(torch.equal(trainer.ema.shadow[f"experts.{i}.{k}"], v) for i in range(4))
    assert trainer.ema.offset == stage1.steps
    x = torch.randn(4, 48, 8, 8)
    t = torch.tensor([10.0, 300.0, 600.0, 900.0])
    text, lens = torch.randn(4, 6, 384), torch.tensor([6, 2, 4, 6])
    torch.testing.assert_close(mode(x, t, text, lens), single(x, t, text, lens), rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in mode.state_dict().items()}

    # the step-0 batch and routing, as the training loop will draw them
    ds = build_dataset(cfg.data)
    batch = collate([ds[i] for i in next(iter(StepBatchSampler(len(ds), cfg.batch_size, cfg.seed)))])
    inputs = trainer.prepare_batch(batch, trainer.generator(0, 0))
    owner = inputs["expert"]
    assert (mode.route(inputs["sigmas"] * 1000) == owner).all()
    trainer.train()
    after = mode.state_dict()
    changed = {i for i in range(4) if any(not torch.equal(before[k], after[k]) for k in before
                                          if k.startswith(f"experts.{i}."))}
    assert changed == {owner}
    # the exported pipeline folder holds the whole mixture, one folder
    exported = json.loads((tmp_path / "s2" / "pipeline" / "transformer" / "config.json").read_text())
    assert exported["model_type"] == "mixture_of_denoising_experts" and len(exported["experts"]) == 4


def test_stage2_copies_adam_moments(stage1, tmp_path):
    cfg = stage2_config(stage1, 2, 1, str(tmp_path / "s2"))
    trainer = VilgTrainer(cfg)
    opt = torch.optim.AdamW(trainer.model.parameters(), lr=cfg.lr)
    assert trainer.maybe_resume(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)) == 0
    single = torch.load(latest_checkpoint(stage1.output_dir) / "optimizer.pt", weights_only=False)["optimizer"]
    n = len(single["state"])
    state = opt.state_dict()["state"]
    assert len(state) == 2 * n
    for i, s in single["state"].items():
        assert torch.equal(state[i]["exp_avg"], s["exp_avg"])
        assert torch.equal(state[n + i]["exp_avg_sq"], s["exp_avg_sq"])


def test_knowledge_inputs_and_zero_boost_is_the_plain_trainer(tmp_path):
    know = KnowledgeConfig(enabled=True, attn_prob=0.5, region_prob=0.5, tagger="lexicon")
    trainer = VilgTrainer(tiny(tmp_path / "k", knowledge=know, cfg_dropout=0.0, batch_size=8))
    ds = build_dataset(trainer.config.data)
    batch = collate([ds[i] for i in range(8)])
    inputs = trainer.prepare_batch(batch, trainer.generator(0, 0))
    bias, key, n_img = inputs["attn_bias"], inputs["key_tokens"], 64
    boosted = bias[:, 0, :n_img, n_img:] != 0
    assert torch.equal(boosted, key[:, None, :].expand_as(boosted))  # image queries x key-word keys only
    assert bias[:, :, n_img:].abs().sum() == 0 and bias[:, :, :, :n_img].abs().sum() == 0
    values = bias[:, 0, :n_img, n_img:][boosted]
    torch.testing.assert_close(values, torch.full_like(values, torch.log1p(torch.tensor(0.01)).item()))
    with_key = key.any(1)
    assert 0 < with_key.sum() < 8  # about half the samples
    w = inputs["loss_weight"]
    boxed = (w > 1).flatten(1).any(1)
    assert 0 < boxed.sum() < 8 and torch.equal(w.unique(), torch.tensor([1.0, 1.1]))

    # w_a = w_l = 0 and no caption changes: exactly the plain trainer (knowledge draws its own randomness)
    zero = KnowledgeConfig(enabled=True, attn_boost=0.0, region_boost=0.0, enrich_captions=False, tagger="lexicon")
    VilgTrainer(tiny(tmp_path / "zero", knowledge=zero)).train()
    VilgTrainer(tiny(tmp_path / "plain")).train()
    a = load_file(str(tmp_path / "zero" / "pipeline" / "transformer" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "pipeline" / "transformer" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_knowledge_is_training_only(tmp_path, text_encoder):
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.image.samplers import cfg_denoiser, euler_sample, sigma_schedule

    know = KnowledgeConfig(enabled=True, attn_prob=1.0, region_prob=1.0, pos_markers=True, tagger="lexicon")
    VilgTrainer(tiny(tmp_path, knowledge=know, steps=2)).train()
    folder = tmp_path / "pipeline" / "transformer"
    assert "model_type" not in json.loads((folder / "config.json").read_text())  # a plain transformer folder
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "pipeline", text_encoder=text_encoder)
    assert type(pipe.transformer) is ErnieImageTransformer
    prompts = ["two red circles", "a blue square above a green triangle"]
    images = pipe.generate(prompts, steps=3, guidance_scale=2.0, seed=5)
    # the same sampling by hand, with no attention bias anywhere: identical
    cond, uncond = text_encoder(prompts), text_encoder(["", ""])
    x = euler_sample(cfg_denoiser(pipe.transformer, cond, uncond, 2.0), pipe.initial_noise(2, 32, 32, 5),
                     sigma_schedule(3, pipe.config.shift))
    torch.testing.assert_close(images, pipe.latent_space.decode(x), rtol=0, atol=0)


def test_stage2_resumes_exactly_and_refuses_other_experts(stage1, tmp_path):
    VilgTrainer(stage2_config(stage1, 2, 2, str(tmp_path / "straight"), save_every=1)).train()
    VilgTrainer(stage2_config(stage1, 2, 1, str(tmp_path / "split"), save_every=1)).train()
    VilgTrainer(stage2_config(stage1, 2, 2, str(tmp_path / "split"), save_every=1)).train()  # resumes at 1
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other experts"):
        VilgTrainer(stage2_config(stage1, 4, 3, str(tmp_path / "split"))).train()


def test_vilg_cli_reports_bad_configs_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ernielab.vilg.train import _cli

    runner = CliRunner()
    missing = runner.invoke(_cli(), ["train", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in runner.invoke(_cli(), ["train", str(bad)]).output
    bad.write_text(json.dumps({"steps": 1, "no_such_field": 3}))
    unknown = runner.invoke(_cli(), ["train", str(bad)])
    assert unknown.exit_code == 2 and "no_such_field" in unknown.output
