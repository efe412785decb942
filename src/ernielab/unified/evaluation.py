"""Evaluate a unified model: text perplexity, caption accuracy, image alignment, decoding speed, routing.

- text perplexity: next-token perplexity of held-out (val split) shapes-world captions, text only;
- caption accuracy: greedy captions of held-out images (through the VQ), judged by the foundation's
  alignment checker against the *true* image (colour, shape, count and relation all right; an
  unparseable caption is wrong);
- image alignment: images generated for balanced evaluation prompts (`make_prompts`), decoded by the
  VQ and scored by `ernielab.worlds.alignment.score` ("all" = every attribute right);
- decoding speed: generated tokens per second at a fixed batch, best of a few repeats, per wall-clock
  second and per CPU second of the decoding thread;
- routing: expert load balance per modality on held-out sequences (routing never sees the modality).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ernielab.core.images import to_uint8
from ernielab.core.seeding import generator
from ernielab.unified.config import EvalSettings
from ernielab.unified.generate import caption_codes, generate_image_codes, text_nll
from ernielab.unified.model import IMAGE, IMAGE_START, TEXT, SubModel, UnifiedTransformer
from ernielab.unified.moe import balance_stats, expert_load
from ernielab.unified.sequences import collate, image_to_text_sequence, model_inputs, text_to_image_sequence
from ernielab.unified.tokenizer import TextTokenizer
from ernielab.unified.vq import NO_CODE, VQTokenizer
from ernielab.worlds.alignment import check, score
from ernielab.worlds.shapes import KINDS, ShapesWorld, make_prompts


def heldout(n: int, image_size: int, seed: int = 0, split: str = "val") -> tuple[torch.Tensor, list[str]]:
    ds = ShapesWorld(n, image_size, seed=seed, split=split)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def caption_correct(caption: str, image: np.ndarray) -> bool:
    try:
        return bool(check(caption, image)["all"])
    except ValueError:  # outside the shapes-world grammar
        return False


@torch.no_grad()
def caption_accuracy(model: UnifiedTransformer, vq: VQTokenizer, tok: TextTokenizer, images: torch.Tensor,
                     sub: SubModel | None = None, batch_size: int = 100, per_item: bool = False) -> dict:
    """Share of greedy captions the checker finds true of their image; per_item adds the list of
    per-image outcomes (for paired comparisons of two models on the same images)."""
    correct, examples = [], []
    truth = to_uint8(images)
    for start in range(0, len(images), batch_size):
        codes = vq.encode(images[start: start + batch_size])
        ids, _ = caption_codes(model, codes, sub=sub)
        for j, row in enumerate(ids):
            text = tok.decode(row)
            correct.append(caption_correct(text, truth[start + j]))
            if len(examples) < 5:
                examples.append(text)
    out = {"accuracy": float(np.mean(correct)), "n": len(correct), "examples": examples}
    return {**out, "correct": [bool(c) for c in correct]} if per_item else out


@torch.no_grad()
def image_alignment(model: UnifiedTransformer, vq: VQTokenizer, tok: TextTokenizer, per_kind: int,
                    sub: SubModel | None = None, seed: int = 0, guidance: float = 3.0, temperature: float = 1.0,
                    top_k: int = 0, batch_size: int = 64) -> tuple[dict, np.ndarray, list[str]]:
    prompts = [p for kind in KINDS for p in make_prompts(kind, per_kind, seed=seed)]
    gen = generator("unified-eval-images", seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        ids = [tok.encode(p) for p in prompts[start: start + batch_size]]
        codes, _ = generate_image_codes(model, ids, sub, guidance, temperature, top_k, gen)
        images.append(to_uint8(vq.decode(codes)))
    images = np.concatenate(images)
    report = score(prompts, images)
    summary = {"all": report["overall"]["all"], "n": report["n"],
               "by_kind": {k: v["all"] for k, v in report["by_kind"].items()}}
    return summary, images, prompts


@torch.no_grad()
def decoding_speed(model: UnifiedTransformer, vq: VQTokenizer, tok: TextTokenizer, images: torch.Tensor,
                   sub: SubModel | None = None, batch: int = 8, repeats: int = 5) -> dict:
    """Tokens/s of image generation (one row or scale per step, no guidance, greedy) and of greedy captioning."""
    prompts = [tok.encode(p) for p in make_prompts("single", batch, seed=1)]
    codes = vq.encode(images[:batch])

    def best_time(fn) -> tuple[float, float, int]:
        """Best wall time and best CPU time of this thread (the latter ignores time spent descheduled
        while another process has the core, so it is steadier on a shared machine)."""
        fn()  # warm-up
        wall, cpu, out = [], [], None
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        return min(wall), max(min(cpu), 1e-9), out

    t_img, c_img, (img_codes, img_steps) = best_time(lambda: generate_image_codes(model, prompts, sub, 1.0, 0.0))
    t_txt, c_txt, (ids, txt_steps) = best_time(lambda: caption_codes(model, codes, sub=sub))
    text_tokens = sum(len(r) + 1 for r in ids)  # + EOS
    image_tokens = int((img_codes != NO_CODE).sum())  # multi-scale codes pad each scale to the grid
    return {"image_tokens_per_s": image_tokens / t_img, "image_steps": img_steps,
            "image_tokens_per_step": image_tokens // (batch * img_steps),
            "text_tokens_per_s": text_tokens / t_txt, "batch": batch, "image_seconds_per_image": t_img / batch,
            "image_tokens_per_cpu_s": image_tokens / c_img, "text_tokens_per_cpu_s": text_tokens / c_txt}


@torch.no_grad()
def routing_report(model: UnifiedTransformer, vq: VQTokenizer, tok: TextTokenizer, images: torch.Tensor,
                   captions: list[str], sub: SubModel | None = None) -> dict:
    """Per-modality expert load (max/mean, entropy) averaged over MoE layers, and how similar the text
    and image load profiles are (cosine of the per-expert load vectors)."""
    if not model.moe_layers():
        return {}
    codes = vq.encode(images)
    seqs = [text_to_image_sequence(tok.encode(c), x) for c, x in zip(captions, codes)]
    seqs += [image_to_text_sequence(x, tok.encode(c)) for c, x in zip(captions, codes)]
    batch = collate(seqs)
    model(**model_inputs(batch), sub=sub)
    modality, valid = batch["modality"].reshape(-1), batch["valid"].reshape(-1)
    groups = {"text": (modality == TEXT) & valid, "image": ((modality == IMAGE) | (modality == IMAGE_START)) & valid}
    layers = sub.layers if sub is not None and sub.layers is not None else None
    per_layer = []
    for i, index in model.routing(layers).items():
        moe = model.blocks[i].ffn
        mask = sub.expert_masks.get(i) if sub is not None and sub.expert_masks else None
        loads = {name: expert_load(index[sel], moe.num_experts) for name, sel in groups.items()}
        row = {name: balance_stats(load, mask) for name, load in loads.items()}
        row["all"] = balance_stats(loads["text"] + loads["image"], mask)
        t, im = loads["text"].double(), loads["image"].double()
        row["text_image_cosine"] = float(t @ im / (t.norm() * im.norm()).clamp_min(1e-12))
        per_layer.append(row)
    out = {}
    for name in ("text", "image", "all"):
        out[name] = {stat: float(np.mean([r[name][stat] for r in per_layer])) for stat in ("max_over_mean", "entropy")}
    out["text_image_cosine"] = float(np.mean([r["text_image_cosine"] for r in per_layer]))
    out["per_layer"] = per_layer
    return out


DEFAULTS = EvalSettings()


def evaluate(model: UnifiedTransformer, vq: VQTokenizer, sub: SubModel | None = None,
             n_text: int = DEFAULTS.n_text, n_caption: int = DEFAULTS.n_caption, per_kind: int = DEFAULTS.per_kind,
             seed: int = DEFAULTS.seed, guidance: float = DEFAULTS.guidance, temperature: float = DEFAULTS.temperature,
             top_k: int = DEFAULTS.top_k, speed: bool = DEFAULTS.speed) -> dict:
    """All metrics of docs/unified.md for one model (or one elastic sub-model of it)."""
    model.eval()
    tok = TextTokenizer(model.config.text_vocab)
    size = vq.config.image_size
    images, captions = heldout(max(n_text, n_caption), size, seed)
    nll, count = text_nll(model, [tok.encode(c) for c in captions[:n_text]], sub)
    out = {"text_perplexity": float(np.exp(nll / max(1, count))),
           "caption": caption_accuracy(model, vq, tok, images[:n_caption], sub)}
    out["image_alignment"] = None  # per_kind 0: no images generated (caption / text metrics only)
    if per_kind > 0:
        out["image_alignment"], _, _ = image_alignment(model, vq, tok, per_kind, sub, seed, guidance, temperature,
                                                       top_k)
    if speed:
        out["speed"] = decoding_speed(model, vq, tok, images, sub)
    out["routing"] = routing_report(model, vq, tok, images[:64], captions[:64], sub)
    out["settings"] = {"n_text": n_text, "n_caption": n_caption, "per_kind": per_kind, "seed": seed,
                       "guidance": guidance, "temperature": temperature, "top_k": top_k}
    return out
