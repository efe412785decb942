"""FSDP2 through the engine: 2 CPU processes (gloo) shard the image transformer; the result equals data
parallelism, a sharded run resumes exactly, and its checkpoints are ordinary full-weight safetensors."""
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
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.image.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384), output_dir=str(out), steps=3,
                batch_size=4, lr=1e-3, warmup_steps=2, log_every=1, save_every=2, ema_decay=0.9)
    return TrainConfig.from_dict({**TrainConfig(**base).to_dict(), **kw})


def train_two_processes(config: TrainConfig, path: Path, port: int) -> None:
    config.save(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "ernielab.cli.main", "image", "train", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def final(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / f"{name}.safetensors"))


@pytest.mark.timeout(600)
def test_sharded_equals_data_parallel_and_resumes_exactly(tmp_path):
    train_two_processes(tiny(tmp_path / "ddp"), tmp_path / "ddp.json", 29561)
    train_two_processes(tiny(tmp_path / "fsdp", steps=2, fsdp=True), tmp_path / "fsdp2.json", 29562)
    train_two_processes(tiny(tmp_path / "fsdp", fsdp=True), tmp_path / "fsdp3.json", 29563)  # resumes at step 2
    for name in ("model", "ema"):
        ddp, fsdp = final(tmp_path / "ddp", name), final(tmp_path / "fsdp", name)
        assert ddp.keys() == fsdp.keys()
        for k in ddp:  # same data per process, same averaged gradients, same elementwise AdamW
            torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["sharded"] is True and records[-1]["world_size"] == 2 and records[-1]["replicas_in_sync"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # the resumed run continued at step 3
    # the export is an ordinary pipeline holding the EMA weights
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "fsdp" / "pipeline")
    ema = final(tmp_path / "fsdp", "ema")
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, ema[k].to(v.dtype))


def test_fsdp_on_one_process_trains_unsharded(tmp_path):
    """One process has nothing to shard: the run is exactly the unsharded one."""
    Trainer(tiny(tmp_path / "plain", steps=2)).train()
    Trainer(tiny(tmp_path / "flag", steps=2, fsdp=True)).train()
    a, b = final(tmp_path / "plain", "model"), final(tmp_path / "flag", "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, what", [(dict(lora={"rank": 2}), "LoRA"),
                                         (dict(validation_every=1, validation_prompts=["a red circle"]),
                                          "validation sheets")])
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, extra, what):
    with pytest.raises(ValueError, match=f"fsdp: .*{what}"):
        Trainer(tiny(tmp_path / "run", fsdp=True, **extra))
    assert not (tmp_path / "run").exists()
