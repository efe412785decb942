"""Bradley-Terry training of the aesthetic head on pairwise judgments (the backbone stays frozen), run by the
core engine.

The loss is -log sigmoid(s_winner - s_loser): the likelihood of the judgments under a
Bradley-Terry model whose strengths are the head's scores. Backbone features are computed once per
image and cached (safetensors keyed by backbone and image list), so training only runs the head.
The engine resumes from the latest checkpoint in `output_dir`; the pair batch of step t depends only
on (seed, t), so a resumed run repeats an uninterrupted one.

    ernielab aesthetic train configs/aesthetic/default.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ernielab.aesthetic.scorer import AestheticConfig, AestheticScorer, build_backbone, extract_features, pair_accuracy
from ernielab.aesthetic.tiered import load_images, read_judgments, read_tiered
from ernielab.core.checkpoint import STATE_FILE, latest_checkpoint
from ernielab.core.config import bounded
from ernielab.core.engine import RESUMABLE_CHANGES, Engine, EngineSettings, Task, config_changes
from ernielab.core.seeding import derive_seed, generator


@dataclasses.dataclass
class AestheticTrainConfig(EngineSettings):
    benchmark: str = ""  # root made by `ernielab aesthetic benchmark` (train/judgments.json)
    output_dir: str = "runs/aesthetic/train"
    backbone: str = "inception"  # inception | pixels:<k> | hf:<model folder>
    hidden: int = bounded(128, ge=0)  # 0 = linear head
    dropout: float = bounded(0.1, ge=0, lt=1)
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # of the judgments, held out to report pair accuracy
    feature_cache: str = ""  # folder for cached backbone features; "" = <output_dir>/features
    # engine fields whose defaults differ for this head
    steps: int = bounded(1500, ge=1)
    batch_size: int = bounded(256, ge=1)
    lr: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(50, ge=0)
    lr_schedule: str = bounded("cosine", choices=("constant", "cosine"))
    weight_decay: float = bounded(0.05, ge=0)
    grad_clip: float = bounded(0.0, ge=0)
    log_every: int = bounded(100, ge=1)

    def check(self) -> None:
        if not re.fullmatch(r"inception|pixels:\d+|hf:.+", self.backbone):
            raise ValueError(f"backbone must be 'inception', 'pixels:<k>' or 'hf:<model folder>', got {self.backbone!r}")


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
    """[N, dim] features of the images at `paths`, read from / written to `cache_dir` when given (safetensors)."""
    key = _cache_key(spec, paths)
    file = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9]+', '_', spec)[:40]}-{key[:16]}.safetensors" if cache_dir else None
    if file is not None and file.is_file():
        return load_file(str(file))["features"]
    features = extract_features(build_backbone(spec), load_images(paths), batch_size, progress, desc=spec)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")  # processes extracting at once never share a temp file
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
    raw = scorer.score_features(features, calibrated=False).double().cpu().numpy()
    if np.ptp(raw) == 0:
        return
    scale, offset = np.polyfit(raw, np.asarray(tiers, dtype=np.float64), 1)
    scorer.config.score_scale, scorer.config.score_offset = float(scale), float(offset)


class HeadTask(Task):
    """The engine's task: a Bradley-Terry head on precomputed features [N, D] and (winner, loser) index pairs
    [P, 2]. `export` calibrates on `tiers` (when given) and saves the scorer to <output_dir>/scorer."""

    resumable_changes = frozenset({"feature_cache"})  # only where cached features live

    def __init__(self, config: AestheticTrainConfig, features: Tensor, train_pairs: Tensor,
                 val_pairs: Tensor | None = None, tiers: np.ndarray | None = None):
        config.validate()
        if len(train_pairs) == 0:
            raise ValueError("no training pairs")
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"expected features [N, dim], got {tuple(features.shape)}")
        if int(train_pairs.max()) >= len(features) or int(train_pairs.min()) < 0:
            raise ValueError(f"pair indices must lie in 0..{len(features) - 1}")
        if tiers is not None and len(tiers) != len(features):
            raise ValueError(f"{len(tiers)} tiers for {len(features)} feature rows")
        self.config = config
        self.features, self.train_pairs, self.val_pairs, self.tiers = features, train_pairs, val_pairs, tiers
        self.scorer: AestheticScorer | None = None  # the exported scorer, once a run finishes

    def build(self) -> dict[str, nn.Module]:
        cfg, device = self.config, self.engine.device
        self.rank = self.engine.rank
        torch.manual_seed(derive_seed(cfg.seed, "aesthetic-init"))
        scorer = AestheticScorer(AestheticConfig(backbone=cfg.backbone, feature_dim=self.features.shape[1],
                                                 hidden=cfg.hidden, dropout=cfg.dropout))
        scorer.head.set_normalization(self.features)
        self.device_features = self.features.to(device)
        return {"model": scorer.to(device)}

    def _parts(self, step: int, micro: int) -> tuple:
        """(k,) for the single-process, no-accumulation run (the seeds of the hand-written loop), + rank beyond."""
        k = step * self.config.grad_accum + micro
        return (k, self.rank) if self.rank else (k,)

    def batch(self, step: int, micro: int) -> dict:
        cfg, parts = self.config, self._parts(step, micro)
        idx = torch.randint(len(self.train_pairs), (cfg.batch_size,), generator=generator(cfg.seed, "aesthetic", *parts))
        return {"pairs": self.train_pairs[idx].to(self.engine.device),
                "dropout_seed": derive_seed(cfg.seed, "aesthetic-dropout", *parts)}

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict[str, float]]:
        torch.manual_seed(batch["dropout_seed"])
        scores = model(self.device_features[batch["pairs"].flatten()]).view(-1, 2)
        return bradley_terry_loss(scores[:, 0], scores[:, 1]), {}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        scorer = model.module if hasattr(model, "module") else model
        raw = scorer.score_features(self.device_features, calibrated=False).cpu()
        pairs = self.train_pairs
        report = {"train_pair_accuracy": pair_accuracy(raw, pairs),
                  "train_loss": float(bradley_terry_loss(raw[pairs[:, 0]], raw[pairs[:, 1]]))}
        if self.val_pairs is not None and len(self.val_pairs):
            report["val_pair_accuracy"] = pair_accuracy(raw, self.val_pairs)
        return report

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        scorer = model.cpu().eval()
        if self.tiers is not None:
            calibrate(scorer, self.features, self.tiers)
        self.scorer = scorer
        return scorer.save_pretrained(run_dir / "scorer")


def train_head(features: Tensor, train_pairs: Tensor, cfg: AestheticTrainConfig, val_pairs: Tensor | None = None,
               tiers: np.ndarray | None = None, accelerator=None) -> tuple[AestheticScorer | None, dict]:
    """Fit a head on precomputed features through the engine (resuming from `cfg.output_dir`).
    -> (the scorer, calibrated on `tiers` when given, or None when the run stopped early; the engine's result,
    whose "eval" holds the train/val pair accuracies)."""
    task = HeadTask(cfg, features, train_pairs, val_pairs, tiers)
    result = Engine(task, accelerator).fit()
    return task.scorer, result


def refuse_incompatible_resume(cfg: AestheticTrainConfig) -> None:
    """The engine's resume check, made before the (slow) feature extraction writes its cache."""
    if not cfg.resume:
        return
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint ({STATE_FILE} missing)")
    try:
        saved = json.loads((path / STATE_FILE).read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path} is damaged: {e}") from None
    changed = [k for k in config_changes(saved, cfg.to_dict()) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(f"cannot resume {path}: it was trained with other settings ({', '.join(changed[:5])}); "
                         f"use the same settings, --fresh to start over, or a new output_dir")


def train_from_benchmark(cfg: AestheticTrainConfig, progress: bool = True, accelerator=None) -> dict:
    """Features of the benchmark's train images (cached), Bradley-Terry head on its judgments, calibration on
    its train tiers; the scorer is saved to `<output_dir>/scorer` and the report to `train_report.json`.
    -> the engine's result plus "report" (and "scorer", the scorer itself, unless the run stopped early)."""
    cfg.validate()
    if not cfg.benchmark:
        raise ValueError("set benchmark to a folder made by `ernielab aesthetic benchmark`")
    start = time.perf_counter()
    paths, pairs = read_judgments(cfg.benchmark, "train")
    tier_of = {item.path.name: item.tier for item in read_tiered(cfg.benchmark, "train")}
    missing = [p.name for p in paths if p.name not in tier_of]
    if missing:
        raise ValueError(f"{cfg.benchmark}: train image {missing[0]} has judgments but no tier")
    refuse_incompatible_resume(cfg)
    features = cached_features(cfg.backbone, paths, cfg.feature_cache or Path(cfg.output_dir) / "features", progress)
    feature_s = time.perf_counter() - start
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    tiers = np.asarray([tier_of[p.name] for p in paths])
    scorer, result = train_head(features, torch.from_numpy(train_pairs), cfg, torch.from_numpy(val_pairs), tiers,
                                accelerator)
    if scorer is None:  # stopped by max_minutes: nothing exported, nothing reported
        return result
    report = {"steps": result["step"], **result.get("eval", {}), "n_images": len(paths), "n_pairs": len(pairs),
              "feature_s": feature_s, "total_s": time.perf_counter() - start, "scorer": result["exported"]}
    (Path(cfg.output_dir) / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {**result, "report": report, "scorer": scorer}


def evaluate_benchmark(scorer: AestheticScorer, benchmark: str | Path, split: str = "test",
                       cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """SRCC / PLCC / per-tier mean score of `scorer` on an ERIA-1K-layout split."""
    from ernielab.aesthetic.scorer import tier_report

    items = read_tiered(benchmark, split)
    features = cached_features(scorer.config.backbone, [it.path for it in items], cache_dir, progress)
    scores = scorer.score_features(features)
    return tier_report(scores.numpy(), [it.tier for it in items])
