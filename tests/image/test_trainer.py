import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.image.config import ErnieImageConfig
from ernielab.image.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384), output_dir=str(out), steps=6,
                batch_size=4, lr=1e-3, warmup_steps=2, log_every=2, save_every=3, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_exact(tmp_path):
    Trainer(tiny_config(tmp_path / "straight")).train()
    Trainer(tiny_config(tmp_path / "split", steps=3)).train()
    Trainer(tiny_config(tmp_path / "split")).train()  # resumes from step 3
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert latest_checkpoint(tmp_path / "split").name == "step-0000006"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ema_a = load_file(str(latest_checkpoint(tmp_path / "straight") / "ema.safetensors"))
    ema_b = load_file(str(latest_checkpoint(tmp_path / "split") / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert (tmp_path / "straight" / "pipeline" / "pipeline.json").is_file()


def test_resume_refuses_other_model(tmp_path):
    Trainer(tiny_config(tmp_path, steps=3)).train()
    other = tiny_config(tmp_path, model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384).replace(num_layers=3))
    with pytest.raises(ValueError, match=r"other settings \(model.num_layers\)"):
        Trainer(other).train()


def test_channel_mismatch_is_reported(tmp_path):
    with pytest.raises(ValueError, match="latent channels"):
        Trainer(tiny_config(tmp_path, model=ErnieImageConfig.tiny(in_channels=12, text_in_dim=384)))


def test_learns_on_a_fixed_batch(tmp_path):
    """Loss must fall well below its start when a tiny model trains on a few repeated samples."""
    cfg = tiny_config(tmp_path, steps=80, log_every=10, save_every=1000, lr=3e-3, cfg_dropout=0.0,
                      data={"kind": "shapes", "size": 8, "image_size": 32})
    cfg = TrainConfig.from_dict(cfg.to_dict())
    Trainer(cfg).train()
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.timeout(300)
def test_two_process_gloo(tmp_path):
    """Same trainer, 2 CPU processes through torch.distributed (gloo): replicas stay identical."""
    cfg = tiny_config(tmp_path / "ddp", steps=4, save_every=2)
    cfg.save(tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "ernielab.cli.main", "image", "train", str(tmp_path / "cfg.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["world_size"] == 2 and final["replicas_in_sync"] is True
    assert (tmp_path / "ddp" / "pipeline" / "transformer" / "model.safetensors").is_file()


def test_init_from_a_pipeline(tmp_path):
    """Fine-tuning starts from saved weights (step 0, fresh optimizer); mismatched configs are refused."""
    Trainer(tiny_config(tmp_path / "base", steps=2, ema_decay=0)).train()
    saved = load_file(str(tmp_path / "base" / "pipeline" / "transformer" / "model.safetensors"))
    tuned = Trainer(tiny_config(tmp_path / "tune", steps=2, init_from=str(tmp_path / "base" / "pipeline"))).build_model()
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in saved.items())
    bigger = ErnieImageConfig.tiny(in_channels=48, text_in_dim=384).replace(num_layers=3)
    with pytest.raises(ValueError, match="differs"):
        Trainer(tiny_config(tmp_path / "bad", model=bigger, init_from=str(tmp_path / "base" / "pipeline"))).train()
    assert not (tmp_path / "bad" / "train_config.json").exists()  # refused before anything is written
