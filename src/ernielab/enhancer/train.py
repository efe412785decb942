"""Train the small default prompt enhancer: a tiny GPT-2 that maps shapes-world intents to full captions.

Data are `data.intents` pairs from the shapes-world train split, put in the same chat format that
`models.enhancer.PromptEnhancer` builds at inference (system prompt, JSON user message, chat
template), so the shipped model runs through the code path of a real enhancer. The loss covers the
answer tokens only. A byte-level BPE tokenizer is fitted on the corpus with the `tokenizers`
library, so any text can be encoded offline.

    python -m ernielab.enhancer.train --out runs/enhancer --export src/ernielab/assets/enhancer

Resumable: the batch of step k is a function of (seed, k), checkpoints use `training.checkpoint`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.config import Config
from ernielab.core.metrics import MetricsLog
from ernielab.core.schedules import lr_factor
from ernielab.core.seeding import derive_seed
from ernielab.enhancer.intents import caption_consistent, intent_pair, parse_intent
from ernielab.enhancer.model import EnhancerConfig, PromptEnhancer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END, PAD = "<|end|>", "<|pad|>"
# Each message becomes <|role|>content<|end|>; with add_generation_prompt the answer cue follows.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
RESUME_FREE_FIELDS = ("steps", "log_every", "save_every", "n_eval")
# Short on purpose: the system message is in every training sequence, and sequence length is the cost.
SHAPES_SYSTEM_PROMPT = "Describe the requested picture in full: colour, shape, number and place of every object."


@dataclasses.dataclass
class EnhancerTrainConfig(Config):
    seed: int = 0
    system_prompt: str = SHAPES_SYSTEM_PROMPT
    num_pairs: int = 20_000  # distinct training pairs (train split of shapes world)
    image_sizes: tuple[int, ...] = (32, 64)  # width/height put in the JSON; the answer does not depend on them
    vocab_size: int = 600
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    log_every: int = 50
    save_every: int = 500
    n_eval: int = 200  # held-out intents scored at the end


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE fitted on the corpus, with role/end/pad special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, END, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END, pad_token=PAD,
                                  additional_special_tokens=list(ROLE_TOKENS), model_max_length=10_000)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_pairs(cfg: EnhancerTrainConfig, n: int, split: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(derive_seed("sizes", cfg.seed, split))
    sizes = rng.choice(cfg.image_sizes, size=n)
    pairs = []
    for i in tqdm(range(n), desc=f"intents {split}", leave=False):
        p = intent_pair(cfg.seed, split, i)
        pairs.append({"intent": p.intent, "target": p.target, "kind": p.kind, "size": int(sizes[i])})
    return pairs


def build_model(cfg: EnhancerTrainConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(derive_seed("init", cfg.seed))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=4 * cfg.n_embd,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # untied: plain safetensors checkpoints
    return GPT2LMHeadModel(config)


def encode_pairs(enhancer: PromptEnhancer, pairs: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + end, number of prompt tokens) per pair."""
    tok = enhancer.tokenizer
    out = []
    for p in pairs:
        prompt_ids = tok(enhancer.build_input_text(p["intent"], p["size"], p["size"]), add_special_tokens=False)
        answer_ids = tok(p["target"] + END, add_special_tokens=False)
        ids = prompt_ids["input_ids"] + answer_ids["input_ids"]
        if len(ids) > max_len:
            raise ValueError(f"training example of {len(ids)} tokens exceeds n_positions {max_len}")
        out.append((ids, len(prompt_ids["input_ids"])))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])  # the answer and its end token
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prepare_tokenizer(run_dir: Path, cfg: EnhancerTrainConfig, pairs: list[dict]):
    """Fit once and keep in the run folder, so a resumed run uses the very same vocabulary."""
    from transformers import AutoTokenizer

    path = run_dir / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    corpus = [cfg.system_prompt] * 1000 + [
        json.dumps({"prompt": p["intent"], "width": p["size"], "height": p["size"]}) for p in pairs
    ] + [p["target"] for p in pairs]
    tok = build_tokenizer(corpus, cfg.vocab_size)
    tok.save_pretrained(path)
    return tok


def restore(run_dir: Path, model, optimizer, scheduler, cfg: EnhancerTrainConfig) -> int:
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    ckpt = load_checkpoint(path)
    ours = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in RESUME_FREE_FIELDS}
    theirs = {k: v for k, v in ckpt["config"].items() if k not in RESUME_FREE_FIELDS}
    if ours != theirs:
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise ValueError(f"checkpoint {path} was trained with different settings {changed}; use another run folder")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optim"]["optimizer"])
    scheduler.load_state_dict(ckpt["optim"]["scheduler"])
    return ckpt["step"]


def train_enhancer(cfg: EnhancerTrainConfig, run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from the latest checkpoint), save the enhancer to run_dir/enhancer, score it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "train_config.json")
    t0 = time.time()
    pairs = make_pairs(cfg, cfg.num_pairs, "train")
    tokenizer = prepare_tokenizer(run_dir, cfg, pairs)
    model = build_model(cfg, tokenizer)
    enhancer = PromptEnhancer(model, tokenizer, EnhancerConfig(system_prompt=cfg.system_prompt))
    data = encode_pairs(enhancer, pairs, cfg.n_positions)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    start = restore(run_dir, model, optimizer, scheduler, cfg)
    log = MetricsLog(run_dir / "metrics.jsonl", start)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train enhancer", disable=not progress)
    window: list[float] = []
    for step in range(start, cfg.steps):
        rng = np.random.default_rng(derive_seed("batch", cfg.seed, step))
        batch = collate([data[i] for i in rng.integers(len(data), size=cfg.batch_size)], tokenizer.pad_token_id)
        torch.manual_seed(derive_seed("dropout", cfg.seed, step))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.write({"step": done, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0],
                       "elapsed_s": time.time() - t0})
            bar.set_postfix(loss=f"{np.mean(window):.3f}")
            window = []
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(run_dir, done, model.state_dict(), None, optimizer, scheduler, cfg.to_dict())
    bar.close()
    train_s = time.time() - t0
    enhancer = PromptEnhancer(model.eval(), tokenizer, EnhancerConfig(system_prompt=cfg.system_prompt, max_new_tokens=64))
    enhancer.save_pretrained(run_dir / "enhancer")
    result = {"step": cfg.steps, "train_s": train_s, "held_out": consistency(enhancer, cfg.n_eval, cfg.seed)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def consistency(enhancer: PromptEnhancer, n: int, seed: int = 0, split: str = "val") -> dict[str, float]:
    """Fraction of held-out intents whose rewrite is a valid caption agreeing with the intent (sampled, seed + i)."""
    pairs = [intent_pair(seed, split, i) for i in range(n)]
    revised = enhancer.enhance_many([p.intent for p in pairs], seed=seed)
    ok = [caption_consistent(parse_intent(p.intent), r) for p, r in zip(pairs, revised)]
    return {"n": n, "consistent": float(np.mean(ok)) if ok else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description="train the shapes-world prompt enhancer")
    ap.add_argument("--out", default="runs/enhancer", help="run folder (resumes from its checkpoints)")
    ap.add_argument("--export", default="", help="also copy the trained enhancer here (e.g. src/ernielab/assets/enhancer)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. steps=500")
    args = ap.parse_args()
    from ernielab.core.cli import parse_sets

    cfg = EnhancerTrainConfig.from_dict(parse_sets(args.set))
    result = train_enhancer(cfg, args.out)
    if args.export:
        PromptEnhancer.from_pretrained(Path(args.out) / "enhancer").save_pretrained(args.export)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
