"""Training checkpoints as safetensors + JSON only: nothing on disk is ever unpickled.

A checkpoint folder `checkpoints/step-0000100/` holds one `<name>.safetensors` per module state (model, ema,
...) and `state.json`: step, config, and every other resumable state (optimizer, scheduler, a task's extras)
as a JSON skeleton whose tensors live in `state.safetensors`. Saving writes a hidden temp folder and renames
it; pruning renames a folder to a hidden trash name before deleting it, so a crash leaves either a complete
checkpoint or a hidden leftover that the next save clears, never a half checkpoint that looks whole.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
STATE_TENSORS = "state.safetensors"


# ---- nested state (optimizer, scheduler, ...) <-> JSON skeleton + flat tensors -------------------------
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Any nest of dicts (any hashable JSON-able keys), lists, tuples, numbers, strings, None and tensors ->
    (JSON-safe skeleton, {name: tensor}). Keys keep their types (optimizer states are keyed by int)."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}, tensors
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors)[0], flatten_state(v, tensors)[0]] for k, v in obj.items()]}, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors)[0] for v in obj]
        return ({"__tuple__": items} if isinstance(obj, tuple) else items), tensors
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (only tensors, numbers, text, lists, dicts)")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        raise ValueError(f"unknown entry in a checkpoint state: {sorted(skeleton)[:3]}")
    return skeleton


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ---- checkpoint folders -------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their state.json exists: it is written last), oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def remove_tree(path: Path) -> None:
    """Rename to a hidden trash name first: a crash mid-delete leaves hidden leftovers, not a broken checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, step: int, modules: dict[str, dict[str, torch.Tensor]],
                    states: dict[str, Any], config: dict, keep: int = 2) -> Path:
    """`modules`: name -> flat tensor state dict (saved as name.safetensors); `states`: name -> any nested state
    (optimizer, scheduler, task extras), kept in state.json + state.safetensors."""
    root = Path(output_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for leftover in list(root.glob(".tmp-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    tmp.mkdir()
    for name, state in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
    skeleton, tensors = flatten_state(states)
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": config, "modules": sorted(modules),
                                              "states": skeleton}, indent=1))
    remove_tree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        remove_tree(old)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """-> {"step", "config", "modules": {name: tensors}, "states": {name: nested}, "path"}; a damaged checkpoint is a
    ValueError naming the folder."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint ({STATE_FILE} missing)")
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        modules = {name: load_file(str(path / f"{name}.safetensors")) for name in meta["modules"]}
        states = unflatten_state(meta["states"], load_file(str(path / STATE_TENSORS)))
        return {"step": int(meta["step"]), "config": meta["config"], "modules": modules, "states": states,
                "path": path}
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise ValueError(f"checkpoint {path} is damaged or from an older ernielab: {e}") from None
