"""The unified family's training tasks on the core engine: the numbers of the earlier hand-written loop, exact
resume, time limits, the shipped configs, old model folders and checkpoints, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.core.cli import load_config
from ernielab.core.config import ConfigError
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed, generator
from ernielab.unified.config import ElasticConfig, UnifiedConfig, VQConfig
from ernielab.unified.io import load_model, save_model
from ernielab.unified.model import UnifiedTransformer, full_model_logits, unified_loss
from ernielab.unified.train import (
    PosteriorBalance,
    ShapesCorpus,
    UnifiedTask,
    UnifiedTrainConfig,
    VQTrainConfig,
    build_step_batches,
    step_submodel,
    train_unified,
    train_vq,
)
from ernielab.unified.tokenizer import TextTokenizer, build_text_vocab
from ernielab.unified.vq import VQTokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "unified"


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    result = train_vq(VQTrainConfig(output_dir=str(out), model=VQConfig.tiny(), steps=3, batch_size=4,
                                    train_size=16, eval_size=4, save_every=2))
    assert result["exported"] == str(out) and set(result["eval"]) >= {"psnr", "codes_used", "align_reconstruction"}
    return out


def tiny(out, vq_dir, **kw) -> UnifiedTrainConfig:
    model = kw.pop("model", UnifiedConfig.tiny(num_layers=4))
    return UnifiedTrainConfig(**{**dict(output_dir=str(out), vq_dir=str(vq_dir), model=model, steps=6,
                                        batch_size=2, train_size=16, save_every=3, log_every=1), **kw})


ELASTIC = {"independent": ElasticConfig(),
           "nested_coupled_anchor_distill": ElasticConfig(nested=True, coupled=True, anchor=0.5, distill=1.0)}


def hand_written_loop(cfg: UnifiedTrainConfig, steps: int) -> UnifiedTransformer:
    """The loop the engine replaced (train_unified before the port), reduced to what sets the weights."""
    vq = VQTokenizer(VQConfig.tiny())
    vq.load_state_dict(load_file(str(Path(cfg.vq_dir) / "vq.safetensors")))
    model_cfg = cfg.model.replace(text_vocab=build_text_vocab())
    torch.manual_seed(derive_seed("unified-init", cfg.seed))
    model = UnifiedTransformer(model_cfg)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, "cosine", cfg.min_lr_ratio))
    corpus = ShapesCorpus(vq, TextTokenizer(model_cfg.text_vocab), cfg.train_size, cfg.seed)
    model.train()
    for step in range(steps):
        torch.manual_seed(derive_seed("unified-step", cfg.seed, step))
        sub = step_submodel(model_cfg, cfg.seed, step)
        loss = torch.zeros(())
        distill = model_cfg.elastic.distill > 0 and not sub.is_full()
        for batch in build_step_batches(corpus, cfg, step)[0].values():
            teacher = full_model_logits(model, batch) if distill else None
            loss = loss + unified_loss(model, batch, sub, cfg.mtp_weight, teacher, model_cfg.elastic.distill)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        for i, moe in model.moe_layers():
            moe.router.update_bias(None if sub.expert_masks is None else sub.expert_masks.get(i))
    return model


@pytest.mark.parametrize("elastic", ELASTIC)
def test_engine_trains_the_weights_of_the_hand_written_loop(vq_dir, tmp_path, elastic):
    cfg = tiny(tmp_path, vq_dir, model=UnifiedConfig.tiny(num_layers=4, elastic=ELASTIC[elastic]))
    result = train_unified(cfg)
    assert result["exported"] == str(tmp_path / "model")
    trained = load_file(str(tmp_path / "model" / "model.safetensors"))
    reference = hand_written_loop(cfg, cfg.steps).state_dict()
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[k], reference[k]) for k in trained)  # bit for bit, buffers included
    assert json.loads((tmp_path / "model" / "config.json").read_text())["elastic"] == ELASTIC[elastic].to_dict() | {
        "anchor_cut": None}


def test_resume_after_an_interruption_is_exact(vq_dir, tmp_path, train_until_killed):
    """A run killed after its step-3 checkpoint and started again ends with the weights, router statistics and
    optimizer state of an uninterrupted one (cosine schedule, elastic draws, anchor + distillation)."""
    model = UnifiedConfig.tiny(num_layers=4, elastic=ELASTIC["nested_coupled_anchor_distill"])
    train_unified(tiny(tmp_path / "straight", vq_dir, model=model))

    train_until_killed(tiny(tmp_path / "split", vq_dir, model=model), 4)
    assert latest_checkpoint(tmp_path / "split").name == "step-0000003"
    assert train_unified(tiny(tmp_path / "split", vq_dir, model=model))["step"] == 6
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("straight", "split"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["modules"]["model"][k], b["modules"]["model"][k]) for k in a["modules"]["model"])
    opt_a, opt_b = a["states"]["optimizer"], b["states"]["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["param_groups"][0]["betas"] == (0.9, 0.95)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in state.items())
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # step 4 is not logged twice


def test_vq_resume_is_exact(tmp_path):
    base = dict(model=VQConfig.tiny(), steps=4, batch_size=4, train_size=16, eval_size=2, save_every=2)
    train_vq(VQTrainConfig(output_dir=str(tmp_path / "straight"), **base))
    stopped = train_vq(VQTrainConfig(output_dir=str(tmp_path / "split"), **{**base, "max_minutes": 1e-9}))
    assert stopped["stopped"] and stopped["exported"] is None and not (tmp_path / "split" / "vq.safetensors").exists()
    train_vq(VQTrainConfig(output_dir=str(tmp_path / "split"), **base))
    a, b = (load_file(str(tmp_path / run / "vq.safetensors")) for run in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_limited_run_exports_nothing(vq_dir, tmp_path):
    result = train_unified(tiny(tmp_path, vq_dir, max_minutes=1e-9))
    assert result["step"] == 1 and result["exported"] is None and result["stopped"].startswith("time limit")
    assert not (tmp_path / "model").exists() and latest_checkpoint(tmp_path).name == "step-0000001"
    assert train_unified(tiny(tmp_path, vq_dir))["exported"] == str(tmp_path / "model")  # resumes, finishes


def test_metrics_record_tasks_submodels_and_expert_load(vq_dir, tmp_path):
    model = UnifiedConfig.tiny(num_layers=4, elastic=ElasticConfig(nested=True, coupled=True, anchor=1.0,
                                                                   anchor_cut=(3, 4, 1)))
    train_unified(tiny(tmp_path, vq_dir, model=model, steps=8, log_every=2, tasks=("i2t", "t2i")))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    assert all("i2t_text" in r and "t2i_image" in r and "text_text" not in r for r in logged)
    assert all("load_text_max_over_mean" in r for r in logged if r["full"] > 0)
    for step in range(8):  # anchor 1.0: every shrunken step trains the cut (3 layers, 4 experts, k=1)
        sub = step_submodel(model, 0, step)
        assert sub.is_full() or (sub.layers == (0, 2, 3) and sub.top_k == 1
                                 and all(m.tolist() == [True] * 4 + [False] * 4 for m in sub.expert_masks.values()))
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["model"]["elastic"]["anchor_cut"] == [3, 4, 1] and saved["tasks"] == ["i2t", "t2i"]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change once set: start and leave clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains(vq_dir, tmp_path, fresh_accelerate_state):
    result = train_unified(tiny(tmp_path, vq_dir, steps=2, mixed_precision="bf16"))
    assert result["step"] == 2 and result["exported"]
    model, _, _ = load_model(tmp_path / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_shipped_config_loads():
    from ernielab.unified.rl import UnifiedRLConfig

    configs = sorted(CONFIGS.glob("*.json"))
    assert len(configs) >= 10
    kinds = {"vq": VQTrainConfig, "rl": UnifiedRLConfig}
    loaded = {p.stem: load_config(kinds.get(p.stem.split("_")[0], UnifiedTrainConfig), p) for p in configs}
    loaded = {name: cfg for name, cfg in loaded.items() if isinstance(cfg, UnifiedTrainConfig)}
    for name, cfg in loaded.items():
        if name.startswith("dense"):  # the dense baseline: as wide as the MoE's active experts, not elastic
            assert cfg.model == UnifiedConfig.cpu().dense_twin()
        elif name.startswith("ultra"):  # ERNIE 5.0's ultra-sparse routing: under ~3% of the experts active
            assert cfg.model.top_k / cfg.model.num_experts <= 0.032 and not cfg.model.is_dense
        elif not name.startswith(("vq", "tiny")):
            assert cfg.model.num_experts == 16 and cfg.model.top_k == 4 and not cfg.model.is_dense
    anchor = loaded["anchor_6k"]
    assert (anchor.steps, anchor.seed, anchor.vq_dir) == (6000, 0, "runs/unified_6k/vq")
    assert anchor.model.elastic == ElasticConfig(nested=True, coupled=True, anchor=0.5)
    assert loaded["nested_coupled_distill_3k"].model.elastic.distill == 1.0
    assert not loaded["noelastic_6k"].model.elastic.enabled
    assert loaded["moe"].model == UnifiedConfig.cpu() and loaded["moe"].steps == 1000


def test_bad_configs_are_refused_before_anything_is_written(vq_dir, tmp_path):
    with pytest.raises(ConfigError, match="tasks"):
        tiny(tmp_path, vq_dir, tasks=("t2i", "captions")).validate()
    with pytest.raises(ConfigError, match=r"model.elastic.anchor: must be <= 1"):
        UnifiedTrainConfig.from_dict({"model": {"elastic": {"anchor": 1.5}}})
    with pytest.raises(ConfigError, match=r"elastic.anchor_cut \(depth=3, experts=4, top_k=9\) does not fit"):
        UnifiedTrainConfig.from_dict({"model": {"elastic": {"anchor": 0.5, "anchor_cut": [3, 4, 9]}}})
    with pytest.raises(ConfigError, match=r"model.elastic.anchor_cut: expected 3 values"):
        UnifiedTrainConfig.from_dict({"model": {"elastic": {"anchor_cut": [3, 4]}}})
    with pytest.raises(FileNotFoundError, match="holds no VQ tokenizer"):
        UnifiedTask(tiny(tmp_path / "run", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="the model expects"):
        UnifiedTask(tiny(tmp_path / "run", vq_dir, model=UnifiedConfig.cpu()))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_model_and_old_checkpoints(vq_dir, tmp_path):
    train_unified(tiny(tmp_path, vq_dir, max_minutes=1e-9))
    other = tiny(tmp_path, vq_dir, model=UnifiedConfig.tiny(num_layers=4, elastic=ElasticConfig(anchor=0.5)))
    with pytest.raises(ValueError, match=r"other settings \(model.elastic.anchor\)"):
        train_unified(other)
    # a checkpoint of the hand-written loop (optimizer state pickled in optimizer.pt) is not unpickled
    old = tmp_path / "old" / "checkpoints" / "step-0000002"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 2, "config": {"model": {}, "train": {}}}))
    (old / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="damaged or from an older ernielab"):
        train_unified(tiny(tmp_path / "old", vq_dir))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [".lock", "checkpoints"]


def test_checkpoint_from_before_a_new_setting_resumes(vq_dir, tmp_path):
    """The engine's policy: a setting the checkpoint does not record yet counts as unchanged."""
    train_unified(tiny(tmp_path, vq_dir, max_minutes=1e-9))
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("anchor", "anchor_cut"):  # as written before these settings existed
        del state["config"]["model"]["elastic"][key]
    state_file.write_text(json.dumps(state))
    assert train_unified(tiny(tmp_path, vq_dir))["step"] == 6


def test_model_folders_from_before_the_elastic_section_load(tmp_path):
    vocab = build_text_vocab()
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=vocab))
    save_model(tmp_path, model, VQTokenizer(VQConfig.tiny()), {"train": {"elastic": True, "elastic_coupled": True,
                                                                         "elastic_anchor": 0.5, "anchor_cut": [2, 4, 1],
                                                                         "steps": 6000}})
    data = json.loads((tmp_path / "config.json").read_text())
    del data["elastic"]
    (tmp_path / "config.json").write_text(json.dumps({**data, "elastic_nested": True}))
    loaded, _, _ = load_model(tmp_path)
    assert loaded.config.elastic == ElasticConfig(nested=True, coupled=True, anchor=0.5, anchor_cut=(2, 4, 1))
    assert UnifiedConfig.from_dict({**data, "elastic_nested": True}).elastic == ElasticConfig(nested=True)


def test_decay_groups_live_on_the_model():
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=build_text_vocab()))
    decay, rest = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and "image_pos.weight" in {names[id(p)] for p in rest["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_step_draws_are_functions_of_seed_and_step(vq_dir, tmp_path):
    cfg = tiny(tmp_path, vq_dir)
    corpus = ShapesCorpus(VQTokenizer(VQConfig.tiny()), TextTokenizer(build_text_vocab()), 16, 0)
    a, items_a = build_step_batches(corpus, cfg, 3)
    b, items_b = build_step_batches(corpus, cfg, 3)
    c, items_c = build_step_batches(corpus, cfg, 3, micro=1)
    assert items_a == items_b and all(torch.equal(a[t]["tokens"], b[t]["tokens"]) for t in a)
    assert items_a != items_c and len(items_a) == 3 * cfg.batch_size
    assert generator("unified-batch", 0, 3).initial_seed() == derive_seed("unified-batch", 0, 3)


def test_posterior_balance_weights_are_normalised_precisions():
    balance = PosteriorBalance(("t2i", "i2t", "text"), momentum=0.5, warmup=2)
    assert balance.weights(0) == {"t2i": 1.0, "i2t": 1.0, "text": 1.0} and balance.update() == {}
    for losses in ({"t2i": 4.0, "i2t": 1.0, "text": 2.0}, {"t2i": 2.0, "i2t": 1.0, "text": 2.0}):
        balance.observe(losses)
        balance.observe({k: v + 1 for k, v in losses.items()})  # a second micro-batch: the step's mean counts
        means = balance.update()
    # bias-corrected running means: (0.5 * 0.5 * first + 0.5 * second) / (1 - 0.25)
    expected = {"t2i": (0.25 * 4.5 + 0.5 * 2.5) / 0.75, "i2t": 1.5, "text": 2.5}
    assert means == pytest.approx({f"{k}_loss_mean": v for k, v in expected.items()})
    assert balance.weights(1) == {"t2i": 1.0, "i2t": 1.0, "text": 1.0}  # still warming up
    precision = {k: 1 / v for k, v in expected.items()}
    weights = balance.weights(2)
    assert weights == pytest.approx({k: 3 * p / sum(precision.values()) for k, p in precision.items()})
    assert weights["i2t"] > weights["text"] > weights["t2i"] and sum(weights.values()) == pytest.approx(3)
    restored = PosteriorBalance(("t2i", "i2t", "text"), momentum=0.5, warmup=2)
    restored.load_state(balance.state())
    assert restored.weights(5) == balance.weights(5)
    with pytest.raises(ValueError, match="balances tasks"):
        PosteriorBalance(("i2t",), 0.5, 2).load_state(balance.state())


def test_posterior_balance_weighs_the_task_losses_and_resumes_exactly(vq_dir, tmp_path, train_until_killed):
    """The logged loss is the weighted sum of the task losses; a run killed after its step-3 checkpoint and
    started again ends with the running means and weights of an uninterrupted one."""
    cfg = dict(loss_balance="posterior", balance_warmup=2, balance_momentum=0.5)
    train_unified(tiny(tmp_path / "straight", vq_dir, **cfg))

    train_until_killed(tiny(tmp_path / "split", vq_dir, **cfg), 4)
    train_unified(tiny(tmp_path / "split", vq_dir, **cfg))
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("straight", "split"))
    assert a["states"]["task"]["balance"]["updates"] == b["states"]["task"]["balance"]["updates"] == 6
    assert torch.equal(a["states"]["task"]["balance"]["mean"], b["states"]["task"]["balance"]["mean"])
    assert all(torch.equal(a["modules"]["model"][k], b["modules"]["model"][k]) for k in a["modules"]["model"])
    logs = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "split")}
    assert [r for r in logs["straight"] if "loss" in r] == [
        {**r, "samples_per_s": s["samples_per_s"], "elapsed_s": s["elapsed_s"]}
        for r, s in zip([r for r in logs["split"] if "loss" in r], [r for r in logs["straight"] if "loss" in r])]
    for r in (r for r in logs["straight"] if "loss" in r):
        task_loss = {"t2i": r["t2i_image"], "i2t": r["i2t_text"] + 0.3 * (r["i2t_mtp1"] + r["i2t_mtp2"]),
                     "text": r["text_text"] + 0.3 * (r["text_mtp1"] + r["text_mtp2"])}
        assert r["loss"] == pytest.approx(sum(r[f"{t}_weight"] * v for t, v in task_loss.items()), rel=1e-5)
        assert {"t2i_loss_mean", "i2t_loss_mean", "text_loss_mean"} <= set(r)
        weights = [r[f"{t}_weight"] for t in task_loss]
        assert (weights == [1.0] * 3) == (r["step"] <= 2) and sum(weights) == pytest.approx(3)
