"""Preference pairs for Diffusion-DPO: a JSONL file of (prompt, chosen image, rejected image), and a maker.

JSONL, one object a line (blank lines skipped; image paths relative to the JSONL's folder):

    {"prompt": "two red circles", "chosen": "images/00012_c.png", "rejected": "images/00012_r.png",
     "chosen_score": [1, 4], "rejected_score": [0, 3], "kind": "count"}

Only "prompt", "chosen" and "rejected" are required; every other key is kept as metadata. Problems
(bad JSON, missing keys, missing or unreadable images, wrong image size) are reported with the file
and line number when the dataset is built, not mid-training.

`make_pairs` generates K candidates per prompt with a pipeline (seeds differ per candidate), scores
them with a judge and keeps best-vs-worst when the scores differ. A judge is any callable
`(prompts: list[str], images: uint8 [N, H, W, 3]) -> list of comparable scores` (higher is better);
`load_judge("alignment")` is the shapes-world alignment checker, `load_judge("aesthetic[:FOLDER]")` the
aesthetic scorer of `ernielab.aesthetic.scorer`, `load_judge("pkg.module:factory")` any other one.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ernielab.worlds.folder import jsonl_objects, load_rgb

REQUIRED_KEYS = ("prompt", "chosen", "rejected")
PAIRS_FILE = "pairs.jsonl"

Judge = Callable[[list[str], np.ndarray], list[Any]]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: Path
    rejected: Path
    where: str  # "pairs.jsonl:12", for error messages
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def read_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file not found: {path} (expected a .jsonl file)")
    pairs = [_parse_entry(entry, where, path.parent)
             for where, entry in jsonl_objects(path, f"a JSON object with {list(REQUIRED_KEYS)}")]
    if not pairs:
        raise ValueError(f"preference file {path} is empty: no pairs found")
    return pairs


def _parse_entry(entry: dict, where: str, root: Path) -> PreferencePair:
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each line needs {list(REQUIRED_KEYS)}")
    wrong = [k for k in REQUIRED_KEYS if not isinstance(entry[k], str) or not entry[k].strip()]
    if wrong:
        raise ValueError(f"{where}: {wrong} must be non-empty strings")
    metadata = {k: v for k, v in entry.items() if k not in REQUIRED_KEYS}
    return PreferencePair(entry["prompt"], root / entry["chosen"], root / entry["rejected"], where, metadata)


def check_image(path: Path, where: str, role: str, image_size: int | None) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {role} image not found: {path}")
    try:
        with Image.open(path) as image:  # header only
            size = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read {role} image {path}: {e}") from None
    if image_size is not None and size != (image_size, image_size):
        raise ValueError(f"{where}: {role} image {path} is {size[0]}x{size[1]}, expected {image_size}x{image_size}")


def image_tensor(path: Path, where: str) -> torch.Tensor:
    """float32 [3, H, W] in [-1, 1]."""
    try:
        pixels = np.asarray(load_rgb(path), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read image {path}: {e}") from None
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1).contiguous()


class PreferencePairs(Dataset):
    """Items: {"caption": prompt, "chosen": [3, S, S], "rejected": [3, S, S]} in [-1, 1].

    Images must already be S x S (no silent resizing: a chosen and a rejected image of different
    framing would make the preference about the crop). Every image header is checked up front.
    """

    def __init__(self, path: str | Path, image_size: int = 32):
        self.path, self.image_size = Path(path), image_size
        self.pairs = read_pairs(self.path)
        for pair in self.pairs:
            check_image(pair.chosen, pair.where, "chosen", image_size)
            check_image(pair.rejected, pair.where, "rejected", image_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        return {"caption": pair.prompt, "chosen": image_tensor(pair.chosen, pair.where),
                "rejected": image_tensor(pair.rejected, pair.where)}


# ---- judges -------------------------------------------------------------------------------------
class AlignmentJudge:
    """Shapes-world alignment checker: score = (all attributes correct, number of attributes correct)."""

    name = "alignment"

    def __call__(self, prompts: list[str], images: np.ndarray) -> list[tuple[int, int]]:
        from ernielab.worlds.alignment import check

        scores = []
        for prompt, image in zip(prompts, images):
            result = check(prompt, image)
            correct = sum(bool(v) for k, v in result.items() if k != "all" and v is not None)
            scores.append((int(bool(result["all"])), correct))
        return scores


def load_judge(spec: str) -> Judge:
    """'alignment', 'aesthetic' or 'aesthetic:FOLDER' (a saved aesthetic scorer), or 'package.module:name'
    where name is a judge or a zero-argument factory of one."""
    if spec == "alignment":
        return AlignmentJudge()
    if spec == "aesthetic" or spec.startswith("aesthetic:"):  # a sibling family: imported by name, on demand
        judge = importlib.import_module("ernielab.aesthetic.scorer").AestheticJudge
        return judge(spec.partition(":")[2] or None)
    if ":" not in spec:
        raise ValueError(f"unknown judge {spec!r}: use 'alignment' or 'package.module:callable'")
    module_name, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load judge {spec!r}: {e}") from None
    if isinstance(obj, type) or getattr(obj, "is_judge_factory", False):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"judge {spec!r} is not callable")
    return obj


# ---- pair maker ---------------------------------------------------------------------------------
def candidate_seed(seed: int, prompt_index: int, candidate: int, k: int) -> int:
    return seed + prompt_index * k + candidate


def best_and_worst(scores: Sequence[Any]) -> tuple[int, int] | None:
    """Indices of the first best and first worst candidate, or None when all tie."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def _jsonable(score: Any) -> Any:
    if isinstance(score, (tuple, list)):
        return [_jsonable(s) for s in score]
    return score.item() if hasattr(score, "item") else score


def make_pairs(pipe, prompts: list[str], out_dir: str | Path, judge: Judge | None = None, candidates: int = 4,
               seed: int = 0, prompts_per_batch: int = 8, progress: bool = True, **sampling) -> dict:
    """Generate `candidates` images per prompt (candidate c of prompt i uses noise seed
    seed + i * candidates + c), judge them, and write chosen/rejected PNGs + pairs.jsonl to out_dir.

    `sampling`: keyword arguments of the pipeline call (num_inference_steps, guidance_scale, shift, ...)."""
    if candidates < 2:
        raise ValueError(f"need at least 2 candidates per prompt, got {candidates}")
    if not prompts:
        raise ValueError("no prompts to make pairs from")
    judge = judge or AlignmentJudge()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, ties = [], 0
    bar = tqdm(total=len(prompts), desc="make pairs", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start : start + prompts_per_batch]
        repeated = [p for p in chunk for _ in range(candidates)]
        # pipeline seeds image j with seed0 + j, so seed0 = seed + start*K gives candidate_seed() per image
        images = pipe(repeated, seed=seed + start * candidates, batch_size=len(repeated), output_type="np",
                      **sampling).images
        scores = judge(repeated, images)
        for j, prompt in enumerate(chunk):
            i = start + j
            own = scores[j * candidates : (j + 1) * candidates]
            picked = best_and_worst(own)
            if picked is None:
                ties += 1
                continue
            entry = {"prompt": prompt}
            for role, c in zip(("chosen", "rejected"), picked):
                name = f"images/{i:05d}_{role}.png"
                Image.fromarray(images[j * candidates + c]).save(out / name)
                entry.update({role: name, f"{role}_score": _jsonable(own[c]),
                              f"{role}_seed": candidate_seed(seed, i, c, candidates)})
            lines.append(json.dumps({**entry, "judge": getattr(judge, "name", type(judge).__name__)}))
        bar.update(len(chunk))
    bar.close()
    (out / PAIRS_FILE).write_text("".join(line + "\n" for line in lines))
    summary = {"prompts": len(prompts), "candidates": candidates, "pairs": len(lines), "all_tied": ties,
               "seed": seed, "pairs_file": str(out / PAIRS_FILE)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
