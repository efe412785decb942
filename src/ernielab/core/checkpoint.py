"""Training checkpoints: safetensors weights (+ EMA), optimizer/scheduler state, step; written atomically."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if (p / "state.json").is_file()), key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: str | Path, step: int, model_state: dict, ema_state: dict | None,
                    optimizer, scheduler, config_dict: dict, keep: int = 2) -> Path:
    """Write into a temp folder, then rename: a crash mid-save never leaves a half checkpoint behind."""
    root = Path(output_dir) / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": config_dict}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (state.json / model.safetensors missing)")
    state = json.loads((path / "state.json").read_text())
    out = {"step": state["step"], "config": state["config"], "model": load_file(str(path / "model.safetensors"))}
    out["ema"] = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    out["optim"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    return out
