"""ERNIE-ViLG 2.0 ablation on the shapes world: MoDE and knowledge enhancement at an equal sample budget.

Variants (every one sees exactly `steps * batch` training samples):
  baseline        one model, `steps` steps
  mode2 / mode4   MoDE: stage 1 = the baseline's first `stage1` steps (its checkpoint), stage 2 =
                  `steps - stage1` steps training only the owning expert each step
  knowledge       baseline + textual/visual knowledge (w_a = 0.01, w_l = 0.1, each on 50% of samples)
  mode4_knowledge MoDE-4 whose stage 1 is the knowledge run's checkpoint, knowledge kept in stage 2
A constant learning rate after warm-up makes the baseline's step-`stage1` checkpoint exactly a stage-1 run.

Each is scored on FID/KID (generated vs real held-out shapes images), shapes-world alignment
(colour, shape, count, relation, all-correct, on canonical prompts) and sampling seconds per image.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vilg_ablation.py --out runs/vilg_ablation_long
    .venv/bin/python benchmarks/vilg_ablation.py --smoke      # seconds: tiny model, 2 + 1 steps, 2 images, 2 variants

(defaults: 1600 steps x 32 = 51,200 samples per variant, about 40 min on one idle core; docs/vilg.md has
the table and a smaller `--steps 400 --stage1 200` run). Besides FID/KID/alignment it reports the held-out
velocity MSE per quarter of sigma, a low-variance view of where experts help.

Runs resume: finished variants are skipped, interrupted ones continue from their last checkpoint.
Runs and the report (results.json, results.md) go to --out, default outputs/vilg_ablation; with --smoke the runs go
to a fresh temporary folder (unless --out names one) and the report to outputs/vilg_ablation_smoke.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ernielab.core.checkpoint import CKPT_DIR
from ernielab.core.images import save_grid, to_uint8
from ernielab.image.config import ErnieImageConfig
from ernielab.image.evaluate import alignment_prompts, real_split, score_alignment
from ernielab.image.fid import fid_kid_from_features, inception_features
from ernielab.image.flow_matching import add_noise, flow_matching_loss
from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline
from ernielab.image.text_encoder import TextEncoder
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.vilg.train import KnowledgeConfig, VilgTrainConfig, VilgTrainer, stage2_config
from ernielab.worlds.registry import DataConfig

VARIANTS = ("baseline", "mode2", "mode4", "knowledge", "mode4_knowledge")
SMOKE = dict(steps=3, stage1=2, batch=2, warmup=0, n_fid=2, n_align=1, sample_steps=2, timing_repeats=1,
             tagger="lexicon", variants="baseline,mode4_knowledge")  # trains baseline, knowledge, mode4_knowledge


def base_config(args, out: Path) -> VilgTrainConfig:
    model = ErnieImageConfig(hidden_size=128, num_attention_heads=4, num_layers=4, ffn_hidden_size=384,
                             in_channels=48, out_channels=48, patch_size=1, text_in_dim=384,
                             rope_axes_dim=(8, 12, 12))
    if args.smoke:
        model = ErnieImageConfig.tiny()
    return VilgTrainConfig(
        model=model, data=DataConfig(kind="shapes", size=1_000_000, image_size=32),
        sampling=PipelineConfig(steps=args.sample_steps, guidance_scale=args.guidance, shift=1.0),
        output_dir=str(out / "baseline"), steps=args.steps, batch_size=args.batch, lr=args.lr,
        warmup_steps=args.warmup, lr_schedule="constant", ema_decay=args.ema, cfg_dropout=0.1,
        timestep_sampling="logit_normal", log_every=25, save_every=args.stage1, keep_checkpoints=100,
        seed=args.seed)


def configs(args, out: Path) -> dict[str, VilgTrainConfig]:
    base = base_config(args, out)
    know = base.replace(output_dir=str(out / "knowledge"), knowledge=KnowledgeConfig(enabled=True, tagger=args.tagger))
    stage2 = args.steps - args.stage1
    cont = dict(save_every=stage2, warmup_steps=0)  # stage 2 continues stage 1 (Adam moments and EMA copied)

    def stage1_ckpt(cfg):
        return str(Path(cfg.output_dir) / CKPT_DIR / f"step-{args.stage1:07d}")

    return {
        "baseline": base,
        "knowledge": know,
        "mode2": stage2_config(base, 2, stage2, str(out / "mode2"), init_from=stage1_ckpt(base), **cont),
        "mode4": stage2_config(base, 4, stage2, str(out / "mode4"), init_from=stage1_ckpt(base), **cont),
        "mode4_knowledge": stage2_config(know, 4, stage2, str(out / "mode4_knowledge"),
                                         init_from=stage1_ckpt(know), **cont),
    }


def train(name: str, cfg: VilgTrainConfig, text_encoder: TextEncoder) -> dict:
    pipe_dir = Path(cfg.output_dir) / "pipeline"
    if pipe_dir.is_dir():
        print(f"[{name}] trained already")
        return json.loads((Path(cfg.output_dir) / "train_summary.json").read_text())
    trainer = VilgTrainer(cfg)
    trainer.text_encoder = text_encoder  # one feature cache for every run: captions repeat across variants
    t0 = time.time()
    result = trainer.train()
    summary = {"steps": result["step"], "samples": result["step"] * cfg.batch_size, "train_s": time.time() - t0,
               "parameters": sum(p.numel() for p in trainer.model.parameters())}
    (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps(summary))
    return summary


def sampling_seconds_per_image(pipes: dict[str, TextToImagePipeline], args) -> dict[str, float]:
    """Seconds per image at the evaluation settings (16 prompts, one batch). Variants take turns within
    each repeat and the fastest repeat counts, so load from other jobs on the shared CPU hits all alike."""
    prompts = alignment_prompts("shapes", 16, args.seed + 1)["relation"]
    gen = dict(num_inference_steps=args.sample_steps, guidance_scale=args.guidance, shift=1.0, batch_size=len(prompts),
               output_type="pt")
    best = {name: float("inf") for name in pipes}
    for name, pipe in pipes.items():  # warm-up
        pipe(prompts, seed=0, **gen)
    for r in range(args.timing_repeats):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe(prompts, seed=r, **gen)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(prompts))
    return best


@torch.no_grad()
def heldout_loss_by_interval(pipe: TextToImagePipeline, real: dict, intervals: int = 4, levels: int = 4) -> list[float]:
    """Velocity MSE on the held-out images, per quarter of sigma ([0, .25), ..., [.75, 1]): `levels` evenly
    spaced sigmas inside each interval, the same noise for every variant. Far less noisy than FID on 200."""
    x0 = pipe.latent_space.encode(real["image"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    text, lens = pipe.text_encoder(list(real["caption"]))
    out = []
    for k in range(intervals):
        losses = []
        for j in range(levels):
            sigma = torch.full((len(x0),), (k + (j + 0.5) / levels) / intervals)
            xt = add_noise(x0, noise, sigma)
            losses.append(flow_matching_loss(pipe.transformer(xt, sigma * 1000, text, lens), x0, noise).mean())
        out.append(float(torch.stack(losses).mean()))
    return out


def evaluate_variant(name: str, cfg: VilgTrainConfig, args, text_encoder, real: dict, real_feats) -> dict:
    report_file = Path(cfg.output_dir) / "ablation_eval.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if "heldout_loss" not in report:  # reports written before this measurement existed
            pipe = TextToImagePipeline.from_pretrained(Path(cfg.output_dir) / "pipeline", text_encoder=text_encoder)
            report["heldout_loss"] = heldout_loss_by_interval(pipe, real)
            report_file.write_text(json.dumps(report, indent=2))
        return report
    pipe = TextToImagePipeline.from_pretrained(Path(cfg.output_dir) / "pipeline", text_encoder=text_encoder)
    gen = dict(num_inference_steps=args.sample_steps, guidance_scale=args.guidance, shift=1.0, batch_size=50,
               output_type="pt")
    fake = torch.cat([pipe(list(real["caption"][i : i + 50]), seed=i, **gen).images
                      for i in range(0, len(real["caption"]), 50)])
    report = {"fid_kid": fid_kid_from_features(real_feats, inception_features(to_uint8(fake), progress=False))}
    report["alignment"] = {}
    sheet_images, sheet_prompts = [], []
    for kind, prompts in alignment_prompts("shapes", args.n_align, args.seed).items():
        images = to_uint8(torch.cat([pipe(prompts[i : i + 50], seed=100_000 + i, **gen).images
                                     for i in range(0, len(prompts), 50)]))
        report["alignment"][kind] = score_alignment("shapes", prompts, images)
        sheet_images += list(images[:8])
        sheet_prompts += prompts[:8]
    save_grid(sheet_images, Path(cfg.output_dir) / "contact_sheet.png", captions=sheet_prompts, cols=8)
    report["heldout_loss"] = heldout_loss_by_interval(pipe, real)
    report["transformer"] = type(pipe.transformer).__name__
    report_file.write_text(json.dumps(report, indent=2))
    return report


def pooled_alignment(report: dict) -> dict[str, float]:
    """Per attribute over all alignment prompts (relation over relation prompts only)."""
    out = {}
    groups = report["alignment"]
    for attr in ("color", "shape", "count", "relation", "all"):
        num = den = 0.0
        for kind, res in groups.items():
            rate = res["overall"][attr]
            if rate is None:
                continue
            num += rate * res["n"]
            den += res["n"]
        out[attr] = num / den if den else float("nan")
    return out


def table(rows: dict[str, dict], extra_losses: dict[str, list[float]]) -> str:
    head = ("| variant | params (active) | train samples | FID | KID x1e3 | colour | shape | count | relation | "
            "all | all: single / count / relation | s / image |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        ev, tr = r["eval"], r["train"]
        a = pooled_alignment(ev)
        by = " / ".join(f"{ev['alignment'][k]['overall']['all']:.2f}" for k in ("single", "count", "relation"))
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {tr['total_samples']} | "
            f"{ev['fid_kid']['fid']:.1f} | "
            f"{1e3 * ev['fid_kid']['kid_mean']:.1f} ± {1e3 * ev['fid_kid']['kid_std']:.1f} | "
            f"{a['color']:.2f} | {a['shape']:.2f} | {a['count']:.2f} | {a['relation']:.2f} | {a['all']:.2f} | {by} | "
            f"{ev['sec_per_image']:.3f} |")
    lines += ["", "| variant | held-out velocity MSE, sigma in [0, .25) | [.25, .5) | [.5, .75) | [.75, 1] | mean |",
              "|---|---|---|---|---|---|"]
    losses = {**extra_losses, **{name: r["eval"]["heldout_loss"] for name, r in rows.items()}}
    for name, loss in losses.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in loss) + f" | {sum(loss) / len(loss):.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="runs and report (default: outputs/vilg_ablation; with --smoke a "
                   "fresh temporary folder for the runs, the report in outputs/vilg_ablation_smoke)")
    p.add_argument("--steps", type=int, default=1600, help="training steps per variant (stage 1 + stage 2 for MoDE)")
    p.add_argument("--stage1", type=int, default=800, help="MoDE stage-1 steps (taken from the baseline run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tagger", default="auto")
    p.add_argument("--n-fid", type=int, default=200)
    p.add_argument("--n-align", type=int, default=50, help="prompts per alignment kind (single, count, relation)")
    p.add_argument("--sample-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--smoke", action="store_true",
                   help="seconds: a tiny model, " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
        if args.out is None:
            with tempfile.TemporaryDirectory(prefix="vilg_ablation_smoke_") as tmp:
                args.out = tmp
                run(args)
                report = Path("outputs/vilg_ablation_smoke")
                report.mkdir(parents=True, exist_ok=True)
                for name in ("results.json", "results.md"):
                    shutil.copy(Path(tmp) / name, report / name)
                print(f"report: {report}")
            return
    args.out = args.out or "outputs/vilg_ablation"
    run(args)


def run(args) -> None:
    torch.set_num_threads(1)
    if not 0 < args.stage1 < args.steps:
        raise SystemExit("--stage1 must lie strictly between 0 and --steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    cfgs = configs(args, out)
    # stage-2 variants need their stage-1 run
    needed = list(dict.fromkeys([{"mode2": "baseline", "mode4": "baseline", "mode4_knowledge": "knowledge"}.get(n, n)
                                 for n in names] + names))
    text_encoder = TextEncoder(cfgs["baseline"].text_encoder, cache_size=1_000_000)
    t_start = time.time()
    summaries = {n: train(n, cfgs[n], text_encoder) for n in needed}

    real_file = out / f"real_features_{args.n_fid}.safetensors"
    real = real_split(cfgs["baseline"].data, args.n_fid)
    if real_file.is_file():
        real_feats = load_file(str(real_file))["features"]
    else:
        real_feats = inception_features(to_uint8(real["image"]), progress=False)
        save_file({"features": real_feats.contiguous()}, str(real_file))

    rows, pipes = {}, {}
    for n in names:
        cfg = cfgs[n]
        ev = evaluate_variant(n, cfg, args, text_encoder, real, real_feats)
        pipes[n] = TextToImagePipeline.from_pretrained(Path(cfg.output_dir) / "pipeline", text_encoder=text_encoder)
        t = pipes[n].transformer
        active = t.num_active_parameters() if hasattr(t, "num_active_parameters") else t.num_parameters()
        total = summaries[n]["samples"] + (args.stage1 * args.batch if n.startswith("mode") else 0)
        rows[n] = {"eval": ev, "train": {**summaries[n], "total_samples": total}, "params": t.num_parameters(),
                   "active": active}
        print(f"[{n}] done: FID {ev['fid_kid']['fid']:.1f}, all-correct {pooled_alignment(ev)['all']:.3f}")
    rows_extra = {}
    if "baseline" in pipes:  # where stage 2 starts from: the baseline's stage-1 checkpoint (EMA weights)
        stage1_file = out / "stage1_heldout.json"
        if not stage1_file.is_file():
            ckpt = Path(cfgs["baseline"].output_dir) / CKPT_DIR / f"step-{args.stage1:07d}"
            model = ErnieImageTransformer(cfgs["baseline"].model)
            model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
            base = pipes["baseline"]
            stage1_pipe = TextToImagePipeline(model, text_encoder, base.latent_space, base.config)
            stage1_file.write_text(json.dumps(heldout_loss_by_interval(stage1_pipe, real)))
        rows_extra[f"stage 1 only ({args.stage1 * args.batch} samples)"] = json.loads(stage1_file.read_text())
    for n, sec in sampling_seconds_per_image(pipes, args).items():
        rows[n]["eval"]["sec_per_image"] = sec
    md = table(rows, rows_extra)
    settings = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                  "wall_s": time.time() - t_start}, indent=2))
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
