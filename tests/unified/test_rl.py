"""RL post-training of the unified model (unified/rl.py): checked rewards, group baselines, the clipped
importance-weighted objective with its sequence and well-learned masks, annealed hints, exact resume."""
import json

import pytest
import torch

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.io import load_model
from ernielab.unified.rl import UnifiedRLConfig, UnifiedRLTask, group_advantages, hint_share, train_rl
from ernielab.unified.train import UnifiedTrainConfig, VQTrainConfig, train_unified, train_vq
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny unified model trained for a few steps (the RL starting point)."""
    root = tmp_path_factory.mktemp("rl")
    train_vq(VQTrainConfig(output_dir=str(root / "vq"), model=VQConfig.tiny(), steps=3, batch_size=4, train_size=16,
                           eval_size=4, save_every=3))
    train_unified(UnifiedTrainConfig(output_dir=str(root / "moe"), vq_dir=str(root / "vq"),
                                     model=UnifiedConfig.tiny(), steps=3, batch_size=2, train_size=16, save_every=3))
    return root / "moe" / "model"


def rl_config(out, policy_dir, **kw) -> UnifiedRLConfig:
    base = dict(output_dir=str(out), init_from=str(policy_dir), steps=3, batch_size=2, group_size=2, reuse=2,
                save_every=1, log_every=1, hint_steps=2, eval_per_kind=2, eval_captions=4, kl_weight=0.1, lr=1e-3)
    return UnifiedRLConfig(**{**base, **kw})


def test_group_advantages_and_hint_anneal(tmp_path, policy_dir):
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), 2)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    cfg = rl_config(tmp_path, policy_dir, hint_fraction=0.5, hint_steps=4)
    assert [hint_share(cfg, s) for s in (0, 2, 4, 9)] == [0.5, 0.25, 0.0, 0.0]


def test_rl_trains_resumes_exactly_and_exports(tmp_path, policy_dir):
    result = train_rl(rl_config(tmp_path / "straight", policy_dir))
    train_rl(rl_config(tmp_path / "split", policy_dir, steps=1))  # stops inside a reused rollout batch
    train_rl(rl_config(tmp_path / "split", policy_dir))
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    start, _, _ = load_model(policy_dir)
    assert any(not torch.equal(a[k], v) for k, v in start.state_dict().items() if k in a)  # it moved
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 3 and all(0 <= r["t2i_reward"] <= 1 and 0 <= r["i2t_reward"] <= 1 for r in logged)
    assert all("t2i_kl" in r and "i2t_sequence_masked" in r and r["samples_per_s"] > 0 for r in logged)
    assert set(result["eval"]) >= {"caption_accuracy", "image_alignment"}
    model, _, meta = load_model(tmp_path / "straight" / "model")
    assert meta["rl_from"] == str(policy_dir)


def built(cfg):
    from accelerate import Accelerator

    from ernielab.core.engine import Engine

    task = UnifiedRLTask(cfg)
    Engine(task, Accelerator(cpu=True))
    task.build()
    return task


def test_objective_on_policy_and_its_masks(tmp_path, policy_dir):
    task = built(rl_config(tmp_path, policy_dir, hint_fraction=0.0, positive_mask_prob=1.0))
    rollouts = task.batch(0, 0)["tasks"]
    for name, kind in (("t2i", "image"), ("i2t", "text")):
        r = rollouts[name]
        assert not r["hinted"].any() and r["reward"].shape == (4,)
        # on policy the ratio is 1: nothing clipped or masked, and the gradient is the plain policy gradient
        loss, logs = task.policy_loss(task.model, r, kind)
        assert logs["token_clipped"] == 0 and logs["sequence_masked"] == 0 and logs["positive_masked"] == 0
        # a behaviour policy far from the current one masks whole sequences (multi-granularity clipping)
        _, logs = task.policy_loss(task.model, {**r, "old_logp": r["old_logp"] - 1.0}, kind)
        assert logs["sequence_masked"] == 1.0 and logs["token_clipped"] == 1.0
        # a well-learned positive sample is left out of the gradient
        task.model.zero_grad()
        forced = {**r, "advantage": torch.ones(4), "well_learned": torch.tensor([True, True, True, True])}
        loss, _ = task.policy_loss(task.model, forced, kind)
        assert loss.item() == 0.0


def test_annealed_hints_give_part_of_the_answer(tmp_path, policy_dir):
    task = built(rl_config(tmp_path, policy_dir, hint_fraction=0.5, hint_steps=10))
    rollouts = task.batch(0, 0)["tasks"]
    grid = task.model.config.image_grid
    r = rollouts["t2i"]
    hinted = r["hinted"].view(-1, 2)
    assert hinted.all(1).eq(hinted.any(1)).all()  # a group is hinted whole or not at all
    wrong_first = hinted.any(1)
    targets = (r["batch"]["image_target"] != -100).sum(1)
    expected = torch.where(r["hinted"], torch.tensor(grid * (grid - round(0.5 * grid))), torch.tensor(grid * grid))
    assert torch.equal(targets, expected)
    assert wrong_first.any(), "the tiny model should fail some prompt outright"
