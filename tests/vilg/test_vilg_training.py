import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.core.config import ConfigError
from ernielab.core.engine import Engine
from ernielab.image.config import ErnieImageConfig
from ernielab.image.flow_matching import sample_training_sigmas
from ernielab.image.train import batch_indices
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.vilg.cli import app as vilg_app
from ernielab.vilg.experts import MixtureOfDenoisingExperts, expert_index, expert_of_timestep, uniform_boundaries
from ernielab.vilg.train import (
    KnowledgeConfig,
    Stage2Config,
    VilgTrainConfig,
    VilgTrainer,
    load_stage1,
    sample_sigmas_between,
    stage2_config,
)
from ernielab.worlds.registry import build_dataset, collate

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def tiny(out, **kw) -> VilgTrainConfig:
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384), output_dir=str(out), steps=3,
                batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, save_every=3, ema_decay=0.9,
                data={"kind": "shapes", "size": 1000, "image_size": 32})
    base.update(kw)
    return VilgTrainConfig.from_dict({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in base.items()})


def built(trainer):
    """The trainer's modules as the engine builds them, without training."""
    from accelerate import Accelerator

    Engine(trainer, Accelerator(cpu=True))
    torch.manual_seed(trainer.config.seed)
    trainer.build()
    return trainer


def assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        assert all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(b["state"][i][k])) for k in s)


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
    trainer = built(VilgTrainer(cfg))
    mode = trainer.model
    assert isinstance(mode, MixtureOfDenoisingExperts) and mode.num_experts == 4
    assert trainer.find_unused_parameters  # DDP must allow the experts that get no gradient
    ckpt = latest_checkpoint(stage1.output_dir)
    single = ErnieImageTransformer(stage1.model)
    single.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    ema1 = load_file(str(ckpt / "ema.safetensors"))
    ema = trainer.make_ema(mode)  # the engine's EMA hook
    for k, v in ema1.items():  # EMA copied into every expert, its warm-up counting on from stage 1
        assert all(torch.equal(ema.shadow[f"experts.{i}.{k}"], v) for i in range(4))
    assert ema.offset == stage1.steps
    x = torch.randn(4, 48, 8, 8)
    t = torch.tensor([10.0, 300.0, 600.0, 900.0])
    text, lens = torch.randn(4, 6, 384), torch.tensor([6, 2, 4, 6])
    torch.testing.assert_close(mode(x, t, text, lens), single(x, t, text, lens), rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in mode.state_dict().items()}

    # the step-0 batch and routing, drawn as the engine will draw them
    ds = build_dataset(cfg.data)
    batch = collate([ds[i] for i in batch_indices(len(ds), cfg.batch_size, cfg.seed, 0)])
    inputs = trainer.prepare_batch(batch, trainer.generator(0, 0))
    owner = inputs["expert"]
    assert (mode.route(inputs["sigmas"] * 1000) == owner).all()
    assert trainer.batch(0, 0)["expert"] == owner
    trainer.train()
    after = load_checkpoint(latest_checkpoint(tmp_path / "s2"))["modules"]["model"]
    changed = {i for i in range(4) if any(not torch.equal(before[k], after[k]) for k in before
                                          if k.startswith(f"experts.{i}."))}
    assert changed == {owner}
    # the exported pipeline folder holds the whole mixture, one folder
    exported = json.loads((tmp_path / "s2" / "pipeline" / "transformer" / "config.json").read_text())
    assert exported["model_type"] == "mixture_of_denoising_experts" and len(exported["experts"]) == 4


def test_stage2_copies_adam_moments(stage1, tmp_path):
    cfg = stage2_config(stage1, 2, 1, str(tmp_path / "s2"))
    trainer = built(VilgTrainer(cfg))
    opt = torch.optim.AdamW(trainer.param_groups(trainer.model), lr=cfg.lr)
    trainer.init_optimizer(opt)  # the engine's hook for a fresh run
    single = load_checkpoint(latest_checkpoint(stage1.output_dir))["states"]["optimizer"]
    n = len(single["state"])
    state = opt.state_dict()["state"]
    assert len(state) == 2 * n and opt.param_groups[0]["lr"] == cfg.lr  # moments copied, hyperparameters kept
    for i, s in single["state"].items():
        assert torch.equal(state[i]["exp_avg"], s["exp_avg"])
        assert torch.equal(state[n + i]["exp_avg_sq"], s["exp_avg_sq"])
        assert torch.equal(state[n + i]["step"], s["step"])
    fresh = torch.optim.AdamW(trainer.param_groups(trainer.model), lr=cfg.lr)
    built(VilgTrainer(cfg.replace(mode=cfg.mode.replace(copy_optimizer=False)))).init_optimizer(fresh)
    assert not fresh.state_dict()["state"]


def test_stage1_inputs_are_checked(stage1, tmp_path):
    """Stage-1 runs are read as safetensors + JSON; a missing, old-format or other-model stage 1 is one clear error."""
    loaded = load_stage1(stage1.output_dir)
    assert loaded["step"] == stage1.steps and loaded["optim"]["state"] and loaded["ema"] is not None
    with pytest.raises(FileNotFoundError, match="no such stage-1"):
        load_stage1(tmp_path / "nowhere")
    old = tmp_path / "old" / "checkpoints" / "step-0000003"  # the pickled format of earlier ernielab versions
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 3, "config": {}}))
    (old / "optimizer.pt").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="older ernielab"):
        load_stage1(tmp_path / "old")
    other = stage1.model.replace(num_layers=stage1.model.num_layers + 1)
    with pytest.raises(ValueError, match="another model config"):
        VilgTrainer(stage2_config(stage1, 2, 1, str(tmp_path / "s2"), model=other.to_dict())).train()
    assert not (tmp_path / "s2").exists()  # refused before anything was written


def test_knowledge_inputs_and_zero_boost_is_the_plain_trainer(tmp_path):
    know = KnowledgeConfig(enabled=True, attn_prob=0.5, region_prob=0.5, tagger="lexicon")
    trainer = built(VilgTrainer(tiny(tmp_path / "k", knowledge=know, cfg_dropout=0.0, batch_size=8)))
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
    images = pipe(prompts, num_inference_steps=3, guidance_scale=2.0, seed=5, output_type="pt").images
    # the same sampling by hand, with no attention bias anywhere: identical
    cond, uncond = text_encoder(prompts), text_encoder(["", ""])
    x = euler_sample(cfg_denoiser(pipe.transformer, cond, uncond, 2.0), pipe.initial_noise(2, 32, 32, 5),
                     sigma_schedule(3, pipe.config.shift))
    torch.testing.assert_close(images, pipe.latent_space.decode(x), rtol=0, atol=0)


def test_stage2_resumes_exactly_and_refuses_other_experts(stage1, tmp_path):
    """Through the engine: 2 steps straight == 1 step, then a resumed run to 2 (weights, EMA, Adam state)."""
    VilgTrainer(stage2_config(stage1, 2, 2, str(tmp_path / "straight"), save_every=1)).train()
    VilgTrainer(stage2_config(stage1, 2, 1, str(tmp_path / "split"), save_every=1)).train()
    VilgTrainer(stage2_config(stage1, 2, 2, str(tmp_path / "split"), save_every=1)).train()  # resumes at 1
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 2
    for name in ("model", "ema"):
        assert all(torch.equal(a["modules"][name][k], b["modules"][name][k]) for k in a["modules"][name])
    assert_same_optimizer_state(a["states"]["optimizer"], b["states"]["optimizer"])
    with pytest.raises(ValueError, match=r"other settings \(mode.experts"):
        VilgTrainer(stage2_config(stage1, 4, 3, str(tmp_path / "split"))).train()


def test_vilg_cli_reports_bad_configs_in_one_line(tmp_path):
    missing = runner.invoke(vilg_app, ["train", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in runner.invoke(vilg_app, ["train", str(bad)]).output
    bad.write_text(json.dumps({"steps": 1, "no_such_field": 3}))
    unknown = runner.invoke(vilg_app, ["train", str(bad)])
    assert unknown.exit_code == 2 and "no_such_field" in unknown.output
    for field, value, message in (("mode.routing", "sideways", "mode.routing: must be one of"),
                                  ("mode.experts", "0", "mode.experts: must be >= 1"),
                                  ("knowledge.attn_prob", "1.5", "knowledge.attn_prob: must be <= 1"),
                                  ("mode.boundaries", "[0, 0.7, 0.5, 1]", "boundaries")):
        res = runner.invoke(vilg_app, ["train", str(REPO / "configs" / "vilg" / "stage1.json"), "--set",
                                       f"{field}={value}", "--set", "mode.experts=3" if field == "mode.boundaries"
                                       else "seed=0", "--output-dir", str(tmp_path / "never")])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "never").exists()


def test_every_vilg_config_loads():
    files = sorted((REPO / "configs" / "vilg").glob("*.json"))
    assert {f.name for f in files} >= {"stage1.json", "mode4.json", "stage2.json"}
    for f in files:
        cfg = (Stage2Config if f.name.startswith("stage2") else VilgTrainConfig).load(f)
        assert cfg.output_dir.startswith("runs/"), f
    # the stage-2 config and the hand-written mode4.json describe the same run
    chain = json.loads((REPO / "configs" / "vilg" / "stage2.json").read_text())
    assert VilgTrainConfig.load(REPO / "configs" / "vilg" / "mode4.json").mode.experts == chain["experts"]


def test_cli_train_and_stage2_from_the_shipped_configs(tmp_path):
    """`ernielab vilg train configs/vilg/stage1.json`, then `ernielab vilg stage2` on a config naming that run."""
    short = ["--set", "steps=2", "--set", "batch_size=4", "--set", "log_every=1", "--set", "save_every=2",
             "--set", "knowledge.tagger=lexicon"]
    res = runner.invoke(vilg_app, ["train", str(REPO / "configs" / "vilg" / "stage1.json"), *short,
                                   "--output-dir", str(tmp_path / "s1")])
    assert res.exit_code == 0, res.output
    assert "trained to step 2" in res.output and str(tmp_path / "s1" / "pipeline") in res.output
    s1 = VilgTrainConfig.load(tmp_path / "s1" / "train_config.json")
    assert s1.knowledge.enabled and s1.model.num_layers == 4 and s1.output_dir == str(tmp_path / "s1")

    chain = json.loads((REPO / "configs" / "vilg" / "stage2.json").read_text())
    chain.update(stage1=str(tmp_path / "s1"), experts=2, steps=1, output_dir=str(tmp_path / "s2"))
    (tmp_path / "stage2.json").write_text(json.dumps(chain))
    res = runner.invoke(vilg_app, ["stage2", str(tmp_path / "stage2.json"), "--set", "overrides.save_every=1"])
    assert res.exit_code == 0, res.output
    s2 = VilgTrainConfig.load(tmp_path / "s2" / "train_config.json")
    assert s2.mode.experts == 2 and s2.mode.init_from == str(tmp_path / "s1") and s2.seed == s1.seed + 1
    assert s2.save_every == 1 and s2.batch_size == 4 and s2.steps == 1
    exported = json.loads((tmp_path / "s2" / "pipeline" / "transformer" / "config.json").read_text())
    assert len(exported["experts"]) == 2
    for extra, message in ((["--set", f"stage1={tmp_path / 'none'}"], "train_config.json missing"),
                           (["--set", "experts=0"], "experts: must be >= 1"),
                           (["--set", "overrides.batch_size=0"], "batch_size: must be >= 1"),
                           (["--output-dir", str(tmp_path / "stage2.json")], "is a file, not a folder")):
        res = runner.invoke(vilg_app, ["stage2", str(tmp_path / "stage2.json"), *extra])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output


def test_time_limited_run_exports_nothing_and_says_so(tmp_path):
    tiny(tmp_path / "run", max_minutes=1e-6, steps=3).save(tmp_path / "cfg.json")
    res = runner.invoke(vilg_app, ["train", str(tmp_path / "cfg.json")])
    assert res.exit_code == 0, res.output
    assert "stopped: time limit" in res.output and "nothing exported" in res.output
    assert not (tmp_path / "run" / "pipeline").exists() and latest_checkpoint(tmp_path / "run").name == "step-0000001"


def test_stage2_config_rules():
    with pytest.raises(ConfigError, match="stage1: name the stage-1 run"):
        Stage2Config.from_dict({"experts": 2})
    with pytest.raises(ConfigError, match="3 experts need 4 boundaries"):
        Stage2Config.from_dict({"stage1": "runs/x", "experts": 3, "boundaries": [0, 1]})
    with pytest.raises(ConfigError, match="overrides.mode"):
        Stage2Config.from_dict({"stage1": "runs/x", "overrides": {"mode": {"experts": 2}}})
