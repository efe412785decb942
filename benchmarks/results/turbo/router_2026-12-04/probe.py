"""Where a trained router departs from its sigma prior: mean weight of teacher 0 (the relation-heavy teacher) per
sigma over 64 held-out real images (shapes world, data seed 0, indices from a fixed generator), DM and CA heads.

    .venv/bin/python outputs/turbo_router_probe.py runs/distill/mt_router_split/checkpoints/step-N
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ernielab.image.latents import build_latent_space
from ernielab.image.text_encoder import TextEncoder
from ernielab.turbo.distill import DistillConfig
from ernielab.turbo.router import TeacherRouter
from ernielab.turbo.teachers import mixture_weights, parse_teachers
from ernielab.worlds.registry import build_dataset, collate

ckpt = Path(sys.argv[1])
cfg = DistillConfig.from_dict(json.loads((ckpt.parents[1] / "train_config.json").read_text()))
state = load_file(str(ckpt / "router.safetensors"))
heads = 2 if cfg.router_split else 1
router = TeacherRouter(cfg.model.in_channels, cfg.model.text_in_dim, len(cfg.teachers), heads, cfg.router_hidden)
router.load_state_dict(state)
data = build_dataset(cfg.data)
g = torch.Generator().manual_seed(12345)
batch = collate([data[i] for i in torch.randint(len(data), (64,), generator=g).tolist()])
x0 = build_latent_space(cfg.latent).encode(batch["image"]).float()
cond = TextEncoder(cfg.text_encoder)(list(batch["caption"]))
noise = torch.randn(x0.shape, generator=g)
specs = parse_teachers(cfg.teachers)
rows = {}
with torch.no_grad():
    for sigma in (0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9):
        s = torch.full((64,), sigma)
        prior = mixture_weights(s, specs, cfg.teacher_weighting, cfg.teacher_temperature)
        w = router((1 - sigma) * x0 + sigma * noise, s, cond, prior)
        rows[sigma] = {"prior": round(prior[0, 0].item(), 3), "dm_mean": round(w[:, 0, 0].mean().item(), 3),
                       "dm_std": round(w[:, 0, 0].std().item(), 3)}
        if heads == 2:
            rows[sigma].update(ca_mean=round(w[:, 1, 0].mean().item(), 3), ca_std=round(w[:, 1, 0].std().item(), 3))
print(json.dumps({"checkpoint": str(ckpt), "teacher0": specs[0].path, "weight_of_teacher0": rows}, indent=1))
