"""The one training engine on a toy task: exact resume, safe checkpoints, run-folder rules, time budget."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ernielab.core.checkpoint import checkpoint_dirs, flatten_state, latest_checkpoint, load_checkpoint, unflatten_state
from ernielab.core.engine import Engine, EngineSettings, RunInUse, RunLock, Task
from ernielab.core.seeding import generator


class Crash(Exception):
    pass


class ToyTask(Task):
    """Linear regression with an auxiliary module and its own optimizer (state the engine must carry)."""

    def __init__(self, config: EngineSettings, interrupt_at: int | None = None):
        self.config = config
        self.exports = 0
        self.interrupt_at = interrupt_at

    def build(self):
        self.model = nn.Linear(4, 1)
        self.aux = nn.Linear(4, 1)
        self.aux_opt = torch.optim.SGD(self.aux.parameters(), lr=0.1, momentum=0.9)
        return {"model": self.model, "aux": self.aux}

    def batch(self, step, micro):
        g = generator("toy", self.config.seed, step, micro)
        x = torch.randn(self.config.batch_size, 4, generator=g)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, model, batch, step):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"mse": loss.item()}

    def after_step(self, model, step):
        if step == self.interrupt_at:  # a crash after the checkpoint of step `interrupt_at`
            raise Crash
        x = torch.randn(8, 4, generator=generator("aux", self.config.seed, step))
        loss = ((self.aux(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        self.aux_opt.step()
        self.aux_opt.zero_grad()
        return {"aux": loss.item()}

    def state(self):
        return {"aux_opt": self.aux_opt.state_dict()}

    def load_state(self, state):
        self.aux_opt.load_state_dict(state["aux_opt"])

    def export(self, model, run_dir: Path):
        self.exports += 1
        out = run_dir / "model.pt.json"
        out.write_text(json.dumps({"weight": model.weight.tolist()}))
        return out


def settings(out, **kw) -> EngineSettings:
    base = dict(output_dir=str(out), steps=6, batch_size=8, lr=0.05, warmup_steps=2, log_every=2, save_every=2,
                ema_decay=0.9, grad_accum=2, weight_decay=0.01, lr_schedule="cosine")
    return EngineSettings(**{**base, **kw})


def fit(out, interrupt_at: int | None = None, **kw) -> tuple[dict, ToyTask]:
    task = ToyTask(settings(out, **kw), interrupt_at)
    return Engine(task).fit(), task


def test_resume_is_exact_including_auxiliary_optimizer(tmp_path):
    """(A cosine schedule spans `steps`, so the interrupted run keeps its total and stops early instead.)"""
    fit(tmp_path / "straight")
    with pytest.raises(Crash):
        fit(tmp_path / "split", interrupt_at=3)
    result, _ = fit(tmp_path / "split")
    assert result["step"] == 6 and result["exported"]
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    for name in ("model", "aux", "ema"):
        assert all(torch.equal(a["modules"][name][k], b["modules"][name][k]) for k in a["modules"][name])
    flat_a, flat_b = flatten_state(a["states"])[1], flatten_state(b["states"])[1]
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 6]  # no step logged twice


def test_state_round_trips_without_pickle():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.95))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "x": [1, None, float("inf"), (2, "a")]}
    skeleton, tensors = flatten_state(state)
    json.dumps(skeleton)  # JSON-safe
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys survive
    assert back["x"] == [1, None, float("inf"), (2, "a")]
    opt.load_state_dict(back["optimizer"])


def test_planted_pickle_never_runs(tmp_path):
    """A crafted optimizer.pt (the old checkpoint format) whose unpickling would write a marker: resuming
    reads only safetensors and JSON, so the marker never appears."""
    fit(tmp_path / "run", steps=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = latest_checkpoint(tmp_path / "run")
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    (ckpt / "regression_pairs.pt").write_bytes(pickle.dumps(Payload()))
    result, _ = fit(tmp_path / "run", steps=4)
    assert result["step"] == 4 and not marker.exists()


def test_no_unsafe_loading_in_the_package():
    src = Path(__file__).resolve().parents[2] / "src" / "ernielab"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text.replace(" ", ""), path
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "torch.load(" not in text or text.count("torch.load(") == text.count("weights_only=True"), path


def test_changed_settings_are_refused_by_name(tmp_path):
    fit(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        fit(tmp_path, steps=4, lr=0.01)
    with pytest.raises(ValueError, match=r"grad_accum, seed"):
        fit(tmp_path, steps=4, grad_accum=1, seed=3)
    result, _ = fit(tmp_path, steps=4, log_every=1)  # budget and logging may change
    assert result["step"] == 4
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 4  # recorded truthfully


def test_fresh_clears_the_run(tmp_path):
    fit(tmp_path, steps=6)
    result, _ = fit(tmp_path, steps=2, resume="", lr=0.01)
    assert result["step"] == 2
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000002"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 2]
    result, _ = fit(tmp_path, steps=4, lr=0.01)  # a plain rerun continues the fresh run, not the old one
    assert result["step"] == 4


def test_time_limit_saves_and_exports_nothing(tmp_path):
    result, task = fit(tmp_path, steps=50, max_minutes=1e-9)
    assert result["stopped"].startswith("time limit") and result["exported"] is None and task.exports == 0
    assert result["step"] == 1 and latest_checkpoint(tmp_path).name == "step-0000001"
    done, task = fit(tmp_path, steps=50)
    assert done["step"] == 50 and task.exports == 1


def test_run_folder_is_locked(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunInUse, match="in use by another process"):
            fit(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    fit(tmp_path, steps=2)  # released


def test_pruning_keeps_the_newest_and_clears_leftovers(tmp_path):
    (tmp_path / "checkpoints" / ".trash-step-0000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-0000009").mkdir()
    (tmp_path / "checkpoints" / "step-0000099").mkdir()  # half-deleted by a crash: no state.json, never "latest"
    fit(tmp_path, steps=6, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000004", "step-0000006"]
    assert not list(root.glob(".t*"))
    assert set(load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))) == {"weight", "bias"}


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    for bad in (dict(batch_size=0), dict(save_every=0), dict(steps=0), dict(lr=float("nan")), dict(grad_accum=-1),
                dict(lr_schedule="linear"), dict(ema_decay=1.0)):
        with pytest.raises(ValueError):
            fit(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_branch_from_another_run(tmp_path):
    """A new run may start from another run's checkpoint with other settings; the change is recorded, and the
    branch then resumes from its own checkpoints (never again from the origin)."""
    fit(tmp_path / "base", steps=4)
    origin = latest_checkpoint(tmp_path / "base")
    result, _ = fit(tmp_path / "branch", steps=6, lr=0.01, branch_from=str(origin))
    assert result["step"] == 6
    first = json.loads((tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 4, "branched_from": str(origin), "changed": ["lr"]}
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        fit(tmp_path / "branch", steps=8, lr=0.02, branch_from=str(origin))
    assert fit(tmp_path / "branch", steps=8, lr=0.01, branch_from=str(origin))[0]["step"] == 8


def test_fields_added_later_resume_at_their_default(tmp_path):
    """A checkpoint written before a field existed resumes while that field keeps its default."""
    fit(tmp_path, steps=2)
    state = latest_checkpoint(tmp_path) / "state.json"
    meta = json.loads(state.read_text())
    del meta["config"]["min_lr_ratio"]
    state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"other settings \(min_lr_ratio\)"):
        fit(tmp_path, steps=4, min_lr_ratio=0.5)
    assert fit(tmp_path, steps=4)[0]["step"] == 4
