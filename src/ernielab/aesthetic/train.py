"""Bradley-Terry training of the aesthetic head on pairwise judgments (the backbone stays frozen).

The loss is -log sigmoid(s_winner - s_loser): the likelihood of the judgments under a
Bradley-Terry model whose strengths are the head's scores. Backbone features are computed once per
image and cached (safetensors keyed by backbone and image list), so training only runs the head.
Training resumes from the latest checkpoint in `output_dir`; the pair batch of step t depends only
on (seed, t), so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ernielab.aesthetic.scorer import AestheticConfig, AestheticScorer, build_backbone, extract_features, pair_accuracy
from ernielab.aesthetic.tiered import load_images, read_judgments, read_tiered
from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.config import Config
from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed, generator


@dataclass
class AestheticTrainConfig(Config):
    benchmark: str = ""  # root made by `ernielab aesthetic make-benchmark` (train/judgments.json)
    output_dir: str = "runs/aesthetic/train"
    backbone: str = "inception"
    hidden: int = 128  # 0 = linear head
    dropout: float = 0.1
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    val_fraction: float = 0.1  # of the judgments, held out to report pair accuracy
    seed: int = 0
    save_every: int = 500
    log_every: int = 100
    feature_cache: str = ""  # folder for cached backbone features; "" = <output_dir>/features


def bradley_terry_loss(winner_scores: Tensor, loser_scores: Tensor) -> Tensor:
    """Mean -log P(winner beats loser) with P = sigmoid(s_w - s_l)."""
    return torch.nn.functional.softplus(loser_scores - winner_scores).mean()


def _cache_key(spec: str, paths: list[Path]) -> str:
    h = hashlib.sha1(spec.encode())
    for p in paths:
        stat = p.stat()
        h.update(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_features(spec: str, paths: list[Path], cache_dir: str | Path | None, progress: bool = True,
                    batch_size: int = 50) -> Tensor:
    """[N, dim] features of the images at `paths`, read from / written to `cache_dir` when given."""
    key = _cache_key(spec, paths)
    file = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9]+', '_', spec)[:40]}-{key[:16]}.safetensors" if cache_dir else None
    if file is not None and file.is_file():
        return load_file(str(file))["features"]
    features = extract_features(build_backbone(spec), load_images(paths), batch_size, progress, desc=spec)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({"features": features.contiguous()}, str(tmp), metadata={"backbone": spec, "key": key})
        tmp.replace(file)
    return features


def split_pairs(pairs: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(derive_seed(seed, "aesthetic-val-pairs"))
    perm = rng.permutation(len(pairs))
    n_val = int(round(val_fraction * len(pairs)))
    return pairs[perm[n_val:]], pairs[perm[:n_val]]


def calibrate(scorer: AestheticScorer, features: Tensor, tiers: np.ndarray) -> None:
    """Affine map of raw scores onto tiers by least squares (order and correlations unchanged)."""
    raw = scorer.score_features(features, calibrated=False).double().numpy()
    if np.ptp(raw) == 0:
        return
    scale, offset = np.polyfit(raw, np.asarray(tiers, dtype=np.float64), 1)
    scorer.config.score_scale, scorer.config.score_offset = float(scale), float(offset)


def train_head(features: Tensor, train_pairs: Tensor, cfg: AestheticTrainConfig, val_pairs: Tensor | None = None,
               progress: bool = True) -> tuple[AestheticScorer, dict]:
    """Fit a head on precomputed features [N, D] and (winner, loser) index pairs [P, 2]; resumable."""
    if len(train_pairs) == 0:
        raise ValueError("no training pairs")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(derive_seed(cfg.seed, "aesthetic-init"))
    scorer = AestheticScorer(AestheticConfig(backbone=cfg.backbone, feature_dim=features.shape[1],
                                             hidden=cfg.hidden, dropout=cfg.dropout))
    scorer.head.set_normalization(features)
    optimizer = torch.optim.AdamW(scorer.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps))
    step = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        scorer.head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"]["optimizer"])
        scheduler.load_state_dict(state["optim"]["scheduler"])
        step = state["step"]
    log = MetricsLog(out / "metrics.jsonl", step)
    bar = tqdm(total=cfg.steps, initial=step, desc="aesthetic head", disable=not progress, leave=False)
    scorer.head.train()
    while step < cfg.steps:
        idx = torch.randint(len(train_pairs), (cfg.batch_size,), generator=generator(cfg.seed, "aesthetic", step))
        batch = train_pairs[idx]
        torch.manual_seed(derive_seed(cfg.seed, "aesthetic-dropout", step))
        scores = scorer.head(features[batch.flatten()]).view(-1, 2)
        loss = bradley_terry_loss(scores[:, 0], scores[:, 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, scorer.head.state_dict(), None, optimizer, scheduler, cfg.to_dict())
    bar.close()
    scorer.eval()
    raw = scorer.score_features(features, calibrated=False)
    report = {"steps": step, "train_pair_accuracy": pair_accuracy(raw, train_pairs),
              "train_loss": float(bradley_terry_loss(raw[train_pairs[:, 0]], raw[train_pairs[:, 1]]))}
    if val_pairs is not None and len(val_pairs):
        report["val_pair_accuracy"] = pair_accuracy(raw, val_pairs)
    return scorer, report


def train_from_benchmark(cfg: AestheticTrainConfig, progress: bool = True) -> tuple[AestheticScorer, dict]:
    """Features of the benchmark's train images (cached), Bradley-Terry head on its judgments,
    calibration on its train tiers; the scorer is saved to `<output_dir>/scorer`."""
    if not cfg.benchmark:
        raise ValueError("set benchmark to a folder made by `ernielab aesthetic make-benchmark`")
    start = time.perf_counter()
    paths, pairs = read_judgments(cfg.benchmark, "train")
    features = cached_features(cfg.backbone, paths, cfg.feature_cache or Path(cfg.output_dir) / "features", progress)
    feature_s = time.perf_counter() - start
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    scorer, report = train_head(features, torch.from_numpy(train_pairs), cfg, torch.from_numpy(val_pairs), progress)
    tiers = {item.path.name: item.tier for item in read_tiered(cfg.benchmark, "train")}
    calibrate(scorer, features, np.asarray([tiers[p.name] for p in paths]))
    scorer.save_pretrained(Path(cfg.output_dir) / "scorer")
    report.update(n_images=len(paths), n_pairs=len(pairs), feature_s=feature_s,
                  total_s=time.perf_counter() - start, scorer=str(Path(cfg.output_dir) / "scorer"))
    (Path(cfg.output_dir) / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return scorer, report


def evaluate_benchmark(scorer: AestheticScorer, benchmark: str | Path, split: str = "test",
                       cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """SRCC / PLCC / per-tier mean score of `scorer` on an ERIA-1K-layout split."""
    from ernielab.aesthetic.scorer import tier_report

    items = read_tiered(benchmark, split)
    features = cached_features(scorer.config.backbone, [it.path for it in items], cache_dir, progress)
    scores = scorer.score_features(features)
    return tier_report(scores.numpy(), [it.tier for it in items])
