"""The sigma-only teacher weighting is unchanged by the router / CA-DM / fresh-sample options: two tiny runs
(one teacher; two teachers mixed by sigma, with regression) must end with bit-identical weights to a reference
that was computed with the code before those options existed (tests/turbo/data/sigma_only_reference.json).

Regenerate (only when a change to the numbers is intended): TURBO_WRITE_REFERENCE=1 pytest this file."""
import hashlib
import json
import os
from pathlib import Path

import torch

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint
from ernielab.turbo.distill import DistillConfig, DistillTrainer

REFERENCE = Path(__file__).parent / "data" / "sigma_only_reference.json"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def reference_runs(tmp_path: Path, teacher: Path) -> dict:
    base = dict(output_dir="", data={"kind": "shapes", "size": 64}, student_steps=[4, 2], steps=2, batch_size=2,
                lr=1e-3, warmup_steps=1, fake_updates=2, log_every=1, save_every=2, ema_decay=0.9)
    runs = {
        "single": dict(teachers=[{"path": str(teacher), "guidance_scale": 2.0}]),
        "mixture": dict(teachers=[{"path": str(teacher), "guidance_scale": 3.0, "knots": [[0.3, 0.0], [0.7, 1.0]]},
                                  {"path": str(teacher), "guidance_scale": 1.5, "knots": [[0.3, 1.0], [0.7, 0.0]]}],
                        regression_pairs=4, regression_batch=2, regression_weight=0.5, teacher_steps=3),
    }
    out = {}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        DistillTrainer(DistillConfig.from_dict({**base, **extra, "output_dir": str(run_dir)})).train()
        checkpoint = load_checkpoint(latest_checkpoint(run_dir))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = {"modules": {k: digest(v) for k, v in sorted(checkpoint["modules"].items())},
                     "losses": [[r["step"], r["loss_dmd"], r["loss_fake"]] for r in records if "loss_dmd" in r]}
    return out


def test_sigma_only_path_is_bit_identical_to_the_stored_reference(tmp_path, tiny_pipeline_dir):
    measured = reference_runs(tmp_path, tiny_pipeline_dir)
    if os.environ.get("TURBO_WRITE_REFERENCE") == "1":
        REFERENCE.write_text(json.dumps(measured, indent=1) + "\n")
    assert measured == json.loads(REFERENCE.read_text())
