"""Teacher (50 steps + CFG) vs. distilled few-step students, in one run: FID/KID, alignment, seconds per image.

Every row draws the same held-out captions, alignment prompts and seeds (image i of a set uses seed + i).
Rows: the teacher at 50 steps + CFG (the reference), the undistilled teacher at 8 (and 4) steps + CFG (the
obvious baseline) and at 8 steps without CFG (a student's starting point), and each student at 8 and 4 steps
without CFG.

Speed is measured separately from the quality sets: each row generates the same `--time-batch` prompts,
rows interleaved and repeated `--time-repeats` times, median taken, so a CPU shared with other jobs
slows every row alike. Text features are cached before timing (every row would pay the same cost).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/turbo.py \
        --student dmd=runs/distill/dmd/student --n-fid 300 --n-align 50     # -> outputs/turbo/turbo.json
    .venv/bin/python benchmarks/turbo.py --smoke     # seconds: tiny random teacher and student, 2 images, no cache

With --smoke, a tiny random teacher (unless --teacher) and a tiny random student "smoke" (unless --student) stand in
for trained models (add e.g. `--hybrid h=STUDENT+TEACHER` for hybrid rows); the report goes to
outputs/turbo/turbo_smoke.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ernielab.core.images import to_uint8
from ernielab.image.evaluate import alignment_prompts, real_split, score_alignment
from ernielab.image.pipeline import DEFAULT_MODEL, PIPELINE_CONFIG, PipelineConfig, TextToImagePipeline
from ernielab.worlds.registry import DataConfig

SMOKE = dict(n_fid=2, n_align=1, batch_size=2, time_batch=1, time_repeats=1, cache="",
             out="outputs/turbo/turbo_smoke.json")


def smoke_pipeline(path: Path, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0) -> Path:
    """A tiny random pipeline (ErnieImageConfig.tiny, the bundled model's text encoder, latent space and image
    size) saved to `path`: what --smoke uses for models that are not in the repo (the numbers mean nothing)."""
    from ernielab.image.config import ErnieImageConfig
    from ernielab.image.transformer import ErnieImageTransformer

    bundled = PipelineConfig.load(DEFAULT_MODEL / PIPELINE_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ErnieImageTransformer(ErnieImageConfig.tiny())
        for p in model.parameters():  # zero-initialised outputs would draw every image alike
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(Path(path) / "transformer")
    bundled.replace(steps=steps, guidance_scale=guidance_scale).save(Path(path) / PIPELINE_CONFIG)
    return Path(path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the bundled model)")
    ap.add_argument("--student", action="append", default=[], help="NAME=FOLDER of a distilled student (repeatable)")
    ap.add_argument("--hybrid", action="append", default=[],
                    help="NAME=STUDENT+TEACHER: the student's steps with the teacher taking the last one, no CFG "
                         "(TextToImagePipeline.with_finisher; same forward count as the student alone)")
    ap.add_argument("--teacher-guidance", type=float, action="append", default=[],
                    help="extra 50-step teacher row at this CFG scale (repeatable), e.g. the scale a student's "
                         "real score used when it differs from the teacher's released one")
    ap.add_argument("--n-fid", type=int, default=300)
    ap.add_argument("--n-align", type=int, default=50, help="prompts per alignment kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--time-batch", type=int, default=16)
    ap.add_argument("--time-repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/turbo/turbo.json",
                    help="report JSON (the measured ones are under benchmarks/results/turbo/; pass --out to replace one)")
    ap.add_argument("--cache", default="runs/distill/bench_cache",
                    help="folder caching generated quality sets (keyed by model, sampling, prompts, seed); '' = off")
    ap.add_argument("--precompute-only", action="store_true",
                    help="only fill the cache with the rows' quality sets (no timing, no report)")
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny random stand-in models, "
                    + ", ".join(f"{k}={v!r}" for k, v in SMOKE.items()))
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    return args


def add_smoke_models(args, root: Path) -> None:
    """--smoke: tiny random stand-ins for the models not given (a teacher and an 8-step student)."""
    if args.teacher is None:
        args.teacher = str(smoke_pipeline(root / "teacher", seed=0))
    if not args.student:
        args.student = [f"smoke={smoke_pipeline(root / 'student', steps=8, guidance_scale=1.0, seed=1)}"]


def rows(args) -> list[dict]:
    """(name, pipeline, sampling) rows; the teacher's guidance and shift are its released ones (4.0, 1.0)."""
    teacher = TextToImagePipeline.from_pretrained(args.teacher)
    cfg = teacher.config
    path = str(args.teacher or DEFAULT_MODEL)
    out = [{"name": f"teacher_{steps}_cfg", "pipe": teacher, "steps": steps, "guidance": cfg.guidance_scale,
            "shift": cfg.shift, "path": path} for steps in (50, 8, 4)]
    out.append({"name": "teacher_8_nocfg", "pipe": teacher, "steps": 8, "guidance": 1.0, "shift": cfg.shift,
                "path": path})  # what a student starts from: same cost per image as an 8-step student
    for scale in args.teacher_guidance:
        out.append({"name": f"teacher_50_cfg{scale:g}", "pipe": teacher, "steps": 50, "guidance": scale,
                    "shift": cfg.shift, "path": path})
    for spec in args.student:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"error: --student must be NAME=FOLDER, got {spec!r}")
        out += few_step_rows(name, TextToImagePipeline.from_pretrained(path), path)
    for spec in args.hybrid:
        name, _, paths = spec.partition("=")
        student_path, _, teacher_path = paths.partition("+")
        if not teacher_path:
            raise SystemExit(f"error: --hybrid must be NAME=STUDENT+TEACHER, got {spec!r}")
        finisher = TextToImagePipeline.from_pretrained(teacher_path).transformer
        pipe = TextToImagePipeline.from_pretrained(student_path).with_finisher(finisher, steps=1)
        out += few_step_rows(name, pipe, student_path, finisher_path=teacher_path)
    return out


def few_step_rows(name: str, pipe, path: str, **extra) -> list[dict]:
    """A distilled pipeline at 8 and 4 steps with its own (shipped) guidance and shift."""
    return [{"name": f"{name}_{steps}", "pipe": pipe, "steps": steps, "guidance": pipe.config.guidance_scale,
             "shift": pipe.config.shift, "path": path, **extra} for steps in (8, 4)]


def generate(row: dict, prompts: list[str], seed: int, batch_size: int) -> torch.Tensor:
    return row["pipe"](prompts, seed=seed, num_inference_steps=row["steps"], guidance_scale=row["guidance"],
                       shift=row["shift"], batch_size=batch_size, output_type="pt").images


def cached_images(row: dict, prompts: list[str], seed: int, args) -> np.ndarray:
    """uint8 images of a quality set; reused from --cache when weights, sampling, prompts and seed match.
    (Quality sets are deterministic; only the timing phase has to run in the same process.)"""
    files = sorted(Path(row["path"]).glob("transformer/*"))
    if row.get("finisher_path"):
        files += sorted(Path(row["finisher_path"]).glob("transformer/*"))
    weights = hashlib.sha1(b"".join(f.read_bytes() for f in files))
    key = json.dumps([weights.hexdigest(), row["steps"], row["guidance"], row["shift"], seed, prompts])
    file = Path(args.cache) / f"{row['name']}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy" if args.cache else None
    if file is not None and file.is_file():
        return np.load(file)
    images = to_uint8(generate(row, prompts, seed, args.batch_size))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.save(file, images)
    return images


def quality(row: dict, real_feats, captions, align_sets, args) -> dict:
    from ernielab.image.fid import fid_kid_from_features, inception_features

    fake = cached_images(row, captions, args.seed, args)
    if real_feats is None:  # --precompute-only
        fake = None
    result = {} if fake is None else {"fid_kid": fid_kid_from_features(real_feats, inception_features(fake, progress=False))}
    for kind, prompts in align_sets.items():
        images = cached_images(row, prompts, args.seed + 100_000, args)
        result.setdefault("alignment", {})[kind] = score_alignment("shapes", prompts, images)["overall"]
    return result


def timings(table: list[dict], prompts: list[str], repeats: int) -> dict[str, float]:
    per_image: dict[str, list[float]] = {r["name"]: [] for r in table}
    for _ in range(repeats):
        for row in table:
            t = time.perf_counter()
            generate(row, prompts, 0, len(prompts))
            per_image[row["name"]].append((time.perf_counter() - t) / len(prompts))
    return {name: statistics.median(v) for name, v in per_image.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="turbo_smoke_") as tmp:
            add_smoke_models(args, Path(tmp))
            return run(args)
    run(args)


def run(args) -> None:
    t0 = time.time()
    table = rows(args)
    data = DataConfig(kind="shapes", image_size=table[0]["pipe"].config.height)
    real = real_split(data, args.n_fid)
    captions = list(real["caption"])
    align_sets = alignment_prompts("shapes", args.n_align, args.seed)
    for row in table:  # cache text features once, so no row pays for them
        row["pipe"].text_encoder.encode_list(captions + sum(align_sets.values(), []) + [""])
    if args.precompute_only:
        for row in table:
            quality(row, None, captions, align_sets, args)
            print(f"cached {row['name']}", flush=True)
        return
    from ernielab.image.fid import inception_features  # here, not at the top: turbo_artifacts imports this module

    real_feats = inception_features(to_uint8(real["image"]), desc="inception (real)")
    speed = timings(table, captions[: args.time_batch], args.time_repeats)
    results = {}
    from tqdm.auto import tqdm

    for row in tqdm(table, desc="rows"):
        results[row["name"]] = {"steps": row["steps"], "guidance_scale": row["guidance"], "shift": row["shift"],
                                **quality(row, real_feats, captions, align_sets, args),
                                "seconds_per_image": speed[row["name"]],
                                "speedup_vs_teacher_50": speed["teacher_50_cfg"] / speed[row["name"]]}
        print(json.dumps({row["name"]: summary(results[row["name"]])}), flush=True)
    report = {"settings": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
              "rows": results, "wall_s": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(markdown(results))
    print(f"wrote {out} in {report['wall_s']:.0f}s")


def summary(r: dict) -> dict:
    return {"fid": round(r["fid_kid"]["fid"], 2), "kid": round(r["fid_kid"]["kid_mean"], 4),
            **{k: v["all"] for k, v in r.get("alignment", {}).items()},
            "s_per_img": round(r["seconds_per_image"], 4), "speedup": round(r["speedup_vs_teacher_50"], 1)}


def markdown(results: dict) -> str:
    lines = ["| row | steps | CFG | FID | KID | single all | count all | relation all | s/image | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a = r.get("alignment", {})
        cells = [f"{a[k]['all']:.2f}" if k in a and a[k]["all"] is not None else "-" for k in ("single", "count", "relation")]
        lines.append(f"| {name} | {r['steps']} | {r['guidance_scale']:g} | {r['fid_kid']['fid']:.1f} | "
                     f"{r['fid_kid']['kid_mean']:.4f} | {' | '.join(cells)} | {r['seconds_per_image']:.4f} | "
                     f"{r['speedup_vs_teacher_50']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
