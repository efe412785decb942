"""One resume-exactness test for every task the engine trains.

For each task: a tiny run of N steps straight through (folder A), and the same config in folder B crashed after
its step-N/2 checkpoint (mid-way through the next step: its optimizer step and EMA update already done in
memory), then resumed to N. Both runs must end with identical weights, identical other saved modules (EMA, fake
score, GAN head, ...), identical optimizer / scheduler / task states, and the same metrics.jsonl, no step logged
twice. `steps` never changes between the halves: a cosine schedule spans it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ernielab.core.checkpoint import flatten_state, latest_checkpoint, load_checkpoint
from ernielab.core.engine import Engine, Task

N = 4  # steps of every run
SAVE_EVERY = 2  # checkpoints at 2 and 4; B dies in step 3, after the step-2 checkpoint
TIMING = ("elapsed_s", "samples_per_s")

# Settings every case shares: a warm-up + cosine schedule over `steps`, EMA on, a log record per step.
COMMON = dict(steps=N, save_every=SAVE_EVERY, log_every=1, warmup_steps=1, lr_schedule="cosine", ema_decay=0.9)


class Crash(Exception):
    pass


def crashing(task: Task, at: int) -> Task:
    """The task, dying in `after_step` of optimizer step `at` (0-based): that step's weights, optimizer state and
    EMA have changed in memory, but its checkpoint is never written."""
    original = task.after_step

    def after_step(model, step):
        if step == at:
            raise Crash
        return original(model, step)

    task.after_step = after_step
    return task


# ---- fixtures the factories need (copied from the families' tests: test modules cannot import each other) ----
@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    """Tiny ListOps: 64 train / 16 val examples of 5-29 tokens, no test split."""
    from ernielab.sparse.lra import ListOpsSpec, generate_listops, write_tsv

    root = tmp_path_factory.mktemp("listops")
    spec = ListOpsSpec(max_depth=3, max_args=3, min_length=4, max_length=30, num_train=64, num_val=16, num_test=0)
    for split, rows in generate_listops(spec, seed=0, progress=False).items():
        if rows:
            write_tsv(root / f"basic_{split}.tsv", rows)
    return root


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """A tiny trained VQ tokenizer folder (what the unified model reads its image codes from)."""
    from ernielab.unified.config import VQConfig
    from ernielab.unified.train import VQTrainConfig, train_vq

    out = tmp_path_factory.mktemp("vq")
    train_vq(VQTrainConfig(output_dir=str(out), model=VQConfig.tiny(), steps=2, batch_size=4, train_size=16,
                           eval_size=2, save_every=2))
    return out


@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory):
    """Preference pairs from the shapes world: chosen = the caption's true render, rejected = another scene's."""
    from PIL import Image

    from ernielab.worlds.shapes import ShapesWorld, render

    folder = tmp_path_factory.mktemp("pairs")
    world = ShapesWorld(1000, image_size=32, seed=0)
    (folder / "img").mkdir()
    lines = []
    for i in range(6):
        scene, text = world.scene(i)
        other, _ = world.scene(500 + i)
        Image.fromarray(render(scene)).save(folder / "img" / f"{i}_w.png")
        Image.fromarray(render(other)).save(folder / "img" / f"{i}_l.png")
        lines.append(json.dumps({"prompt": text, "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png", "id": i}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def vilg_stage1_config(out):
    """A ViLG stage-1 config with knowledge enhancement (attention boost, region weights, POS markers)."""
    from ernielab.image.config import ErnieImageConfig
    from ernielab.vilg.train import KnowledgeConfig, VilgTrainConfig

    know = KnowledgeConfig(enabled=True, attn_prob=0.5, region_prob=0.5, pos_markers=True, tagger="lexicon")
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384).to_dict(), output_dir=str(out),
                batch_size=2, lr=1e-3, data={"kind": "shapes", "size": 1000, "image_size": 32},
                knowledge=know.to_dict(), **COMMON)
    return VilgTrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def vilg_stage1(tmp_path_factory):
    """A finished (2-step) ViLG stage-1 run: what MoDE stage 2 starts its experts and Adam moments from."""
    from ernielab.vilg.train import VilgTrainer

    cfg = vilg_stage1_config(tmp_path_factory.mktemp("stage1")).replace(steps=2)
    Engine(VilgTrainer(cfg)).fit()
    return cfg


# ---- one factory per task: (run folder, fixtures) -> a fresh Task for that folder ----------------------------
def make_image(out, fx):
    from ernielab.image.config import ErnieImageConfig
    from ernielab.image.train import TrainConfig, Trainer

    return Trainer(TrainConfig.from_dict(dict(
        model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384).to_dict(), output_dir=str(out), batch_size=2,
        lr=1e-3, data={"kind": "shapes", "size": 64, "image_size": 32}, **COMMON)))


def make_dpo(out, fx):
    from ernielab.dpo.train import DPOSettings, DPOTrainConfig, DPOTrainer

    return DPOTrainer(DPOTrainConfig(init_from=str(fx["tiny_pipeline_dir"]), dpo=DPOSettings(pairs=str(fx["dpo_pairs"])),
                                     output_dir=str(out), batch_size=2, lr=1e-3, **COMMON))


def make_vilg(out, fx):
    from ernielab.vilg.train import VilgTrainer

    return VilgTrainer(vilg_stage1_config(out))


def make_vilg_mode(out, fx):
    """MoDE stage 2: two experts (per-step routing) from the stage-1 run's weights, EMA and Adam moments."""
    from ernielab.vilg.train import VilgTrainer, stage2_config

    return VilgTrainer(stage2_config(fx["vilg_stage1"], 2, N, str(out)))


def make_turbo(out, fx):
    """DMD2-style distillation with a GAN head: student, EMA, fake score, head, and the fake score's optimizer."""
    from ernielab.turbo.distill import DistillConfig, DistillTrainer

    return DistillTrainer(DistillConfig.from_dict(dict(
        teachers=[{"path": str(fx["tiny_pipeline_dir"]), "guidance_scale": 2.0}], output_dir=str(out),
        data={"kind": "shapes", "size": 64}, student_steps=[4, 2], batch_size=2, lr=1e-3, fake_updates=2,
        gan_weight=0.5, gan_feature_depth=1, **COMMON)))


def make_sparse(out, fx):
    """HST attention with SAR and dropout; validation every 2 steps keeps a best model (task state)."""
    from ernielab.sparse.config import SparseClassifierConfig
    from ernielab.sparse.lra import SparseDataConfig
    from ernielab.sparse.train import SparseTask, SparseTrainConfig

    model = SparseClassifierConfig.tiny("hst", max_len=32, sar_alpha=0.5, dropout=0.1)
    cfg = SparseTrainConfig(model=model, data=SparseDataConfig(task="listops", path=str(fx["listops_dir"])),
                            output_dir=str(out), batch_size=8, lr=3e-3, eval_every=2, **COMMON)
    return SparseTask(cfg, progress=False)


def make_unified(out, fx):
    """MoE with elastic draws (nested, coupled, anchor + in-place distillation), MTP heads, router biases."""
    from ernielab.unified.config import ElasticConfig, UnifiedConfig
    from ernielab.unified.train import UnifiedTask, UnifiedTrainConfig

    elastic = ElasticConfig(nested=True, coupled=True, anchor=0.5, distill=1.0)
    return UnifiedTask(UnifiedTrainConfig(output_dir=str(out), vq_dir=str(fx["vq_dir"]),
                                          model=UnifiedConfig.tiny(num_layers=4, elastic=elastic), batch_size=2,
                                          train_size=16, **COMMON))


def make_vq(out, fx):
    from ernielab.unified.config import VQConfig
    from ernielab.unified.train import VQTask, VQTrainConfig

    return VQTask(VQTrainConfig(output_dir=str(out), model=VQConfig.tiny(), batch_size=4, train_size=16,
                                eval_size=2, **COMMON))


def make_aesthetic(out, fx):
    from ernielab.aesthetic.train import AestheticTrainConfig, HeadTask

    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=g)
    order = features[:, 0].argsort(descending=True)
    pairs = torch.stack([order[:-1], order[1:]], 1)
    cfg = AestheticTrainConfig(output_dir=str(out), backbone="pixels:1", hidden=4, dropout=0.1, batch_size=8,
                               **COMMON)
    return HeadTask(cfg, features, pairs[:30], val_pairs=pairs[30:])


def make_enhancer(out, fx):
    from ernielab.enhancer.train import EnhancerTask, EnhancerTrainConfig

    return EnhancerTask(EnhancerTrainConfig(output_dir=str(out), num_pairs=64, vocab_size=300, n_positions=256,
                                            n_layer=1, n_embd=16, n_head=2, batch_size=4, n_eval=0, **COMMON))


# id -> (factory, fixtures it needs, the modules its checkpoints must hold)
CASES = {
    "image": (make_image, (), {"model", "ema"}),
    "dpo": (make_dpo, ("tiny_pipeline_dir", "dpo_pairs"), {"model", "ema"}),
    "vilg": (make_vilg, (), {"model", "ema"}),
    "vilg_mode": (make_vilg_mode, ("vilg_stage1",), {"model", "ema"}),
    "turbo": (make_turbo, ("tiny_pipeline_dir",), {"model", "ema", "fake", "gan_head"}),
    "sparse": (make_sparse, ("listops_dir",), {"model", "ema"}),
    "unified": (make_unified, ("vq_dir",), {"model", "ema"}),
    "vq": (make_vq, (), {"model", "ema"}),
    "aesthetic": (make_aesthetic, (), {"model", "ema"}),
    "enhancer": (make_enhancer, (), {"model", "ema"}),
}


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_tensors(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{where}: {k} differs after resume"


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_exact(name, tmp_path, request):
    factory, needs, modules = CASES[name]
    fx = {fixture: request.getfixturevalue(fixture) for fixture in needs}
    straight, split = tmp_path / "straight", tmp_path / "split"

    assert Engine(factory(straight, fx)).fit()["step"] == N
    with pytest.raises(Crash):  # dies in step N/2 + 1, after the checkpoint of step N/2
        Engine(crashing(factory(split, fx), at=N // 2)).fit()
    assert latest_checkpoint(split).name == f"step-{N // 2:07d}"
    result = Engine(factory(split, fx)).fit()  # the same config: resumes at N/2
    assert result["step"] == N and result["stopped"] is None

    a, b = (load_checkpoint(latest_checkpoint(run)) for run in (straight, split))
    assert a["step"] == b["step"] == N
    assert set(a["modules"]) == set(b["modules"]) == modules
    for module in modules:  # the weights, the EMA and every auxiliary module
        assert_same_tensors(a["modules"][module], b["modules"][module], module)
    assert set(a["states"]) == set(b["states"]) == {"optimizer", "scheduler", "task"}
    for state in a["states"]:  # optimizer, schedule and the task's own state: skeletons and tensors
        skeleton_a, tensors_a = flatten_state(a["states"][state])
        skeleton_b, tensors_b = flatten_state(b["states"][state])
        assert json.dumps(skeleton_a) == json.dumps(skeleton_b), f"{state} differs after resume"
        assert_same_tensors(tensors_a, tensors_b, state)
    assert a["states"]["scheduler"]["last_epoch"] == N

    logged = records(split)
    train_steps = [r["step"] for r in logged if "lr" in r]
    assert train_steps == list(range(1, N + 1))  # the steps redone after the crash are not logged twice
    assert logged == records(straight)  # losses, learning rates, evaluations: as if never interrupted
