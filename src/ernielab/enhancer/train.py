"""Train the small default prompt enhancer: a tiny GPT-2 that maps shapes-world intents to full captions, run by the
core engine.

Data are `enhancer.intents` pairs from the shapes-world train split, put in the same chat format that
`enhancer.model.PromptEnhancer` builds at inference (system prompt, JSON user message, chat
template), so the shipped model runs through the code path of a real enhancer. The loss covers the
answer tokens only. A byte-level BPE tokenizer is fitted on the corpus with the `tokenizers`
library, so any text can be encoded offline.

    ernielab enhancer train configs/enhancer/default.json     # -> runs/enhancer/enhancer/

Resumable through the engine: the batch of step k is a function of (seed, k), and the fitted tokenizer is kept
in every checkpoint, so a resumed run uses the very same vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ernielab.core.config import bounded
from ernielab.core.engine import Engine, EngineSettings, Task
from ernielab.core.seeding import derive_seed
from ernielab.enhancer.intents import (caption_consistent, intent_pair, paraphrase_pair, parse_caption, parse_intent,
                                       with_nonsense_words)
from ernielab.enhancer.model import EnhancerConfig, PromptEnhancer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END, PAD = "<|end|>", "<|pad|>"
# Each message becomes <|role|>content<|end|>; with add_generation_prompt the answer cue follows.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# Short on purpose: the system message is in every training sequence, and sequence length is the cost.
TRAIN_CONFIG = "train_config.json"
SHAPES_SYSTEM_PROMPT = "Describe the requested picture in full: colour, shape, number and place of every object."


@dataclasses.dataclass
class EnhancerTrainConfig(EngineSettings):
    system_prompt: str = SHAPES_SYSTEM_PROMPT
    num_pairs: int = bounded(20_000, ge=1)  # distinct training pairs (train split of shapes world)
    image_sizes: tuple[int, ...] = bounded((32, 64), ge=1)  # width/height put in the JSON; the answer ignores them
    vocab_size: int = bounded(600, ge=1)  # BPE target; the fitted vocabulary may be smaller
    n_layer: int = bounded(3, ge=1)
    n_embd: int = bounded(128, ge=1)
    n_head: int = bounded(4, ge=1)
    n_positions: int = bounded(128, ge=8)
    n_eval: int = bounded(200, ge=0)  # held-out intents scored at the end
    # Input mix. The defaults (intents only) are the first shipped enhancer's training. A `paraphrase_fraction` of
    # the pairs instead state their whole scene in one of `paraphrase_styles` of `worlds.phrasing` (its train
    # phrasebook; () = every style), so the enhancer learns to keep the facts of wordings unlike the captions'.
    paraphrase_fraction: float = bounded(0.0, ge=0, le=1)
    paraphrase_styles: tuple[str, ...] = ()
    n_eval_paraphrase: int = bounded(0, ge=0)  # per kind, unseen wordings (eval phrasebook) scored at the end
    nonsense_fraction: float = bounded(0.0, ge=0, le=1)  # inputs given 1-3 made-up words that state nothing
    # engine fields whose defaults differ for the enhancer
    output_dir: str = "runs/enhancer"
    lr: float = bounded(2e-3, gt=0)
    lr_schedule: str = bounded("cosine", choices=("constant", "cosine"))
    weight_decay: float = bounded(0.01, ge=0)
    log_every: int = bounded(50, ge=1)

    def check(self) -> None:
        if not self.image_sizes:
            raise ValueError("image_sizes must name at least one size")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.paraphrase_styles:
            from ernielab.worlds.phrasing import STYLES

            unknown = sorted(set(self.paraphrase_styles) - set(STYLES))
            if unknown:
                raise ValueError(f"paraphrase_styles: unknown {unknown}; the styles are {list(STYLES)}")

    def styles(self) -> tuple[str, ...]:
        if self.paraphrase_styles or not self.paraphrase_fraction:
            return tuple(self.paraphrase_styles)
        from ernielab.worlds.phrasing import STYLES

        return tuple(STYLES)


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
    # its own stream, so the intents-only mix draws exactly the pairs it always did
    draws = np.random.default_rng(derive_seed("paraphrased", cfg.seed, split)).random(n)
    paraphrased = draws < cfg.paraphrase_fraction
    styles = cfg.styles()
    noise = np.random.default_rng(derive_seed("nonsense", cfg.seed, split))
    noised = noise.random(n) < cfg.nonsense_fraction
    pairs = []
    for i in tqdm(range(n), desc=f"pairs {split}", leave=False):
        p = paraphrase_pair(cfg.seed, split, i, styles) if paraphrased[i] else intent_pair(cfg.seed, split, i)
        text = with_nonsense_words(p.intent, noise, int(noise.integers(1, 4))) if noised[i] else p.intent
        pairs.append({"intent": text, "target": p.target, "kind": p.kind, "size": int(sizes[i])})
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


def consistency(enhancer: PromptEnhancer, n: int, seed: int = 0, split: str = "val") -> dict[str, float]:
    """Fraction of held-out intents whose rewrite is a valid caption agreeing with the intent (sampled, seed + i)."""
    pairs = [intent_pair(seed, split, i) for i in range(n)]
    revised = enhancer.enhance_many([p.intent for p in pairs], seed=seed)
    ok = [caption_consistent(parse_intent(p.intent), r) for p, r in zip(pairs, revised)]
    by_kind = {f"{kind}_consistent": float(np.mean([k for p, k in zip(pairs, ok) if p.kind == kind]))
               for kind in ("single", "count", "relation") if any(p.kind == kind for p in pairs)}
    return {"n": n, "consistent": float(np.mean(ok)) if ok else 0.0, **by_kind}


def is_caption(text: str) -> bool:
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


def rewrite_if_it_fits(enhancer: PromptEnhancer, prompt: str, seed: int, width: int = 32,
                       height: int = 32) -> str | None:
    """The rewrite (as `enhance_many` makes it for prompt i with seed + i), or None where the prompt does not fit
    the enhancer's context: a failed rewrite, not a failed evaluation."""
    try:
        return enhancer.enhance(prompt, width, height, seed=seed)
    except ValueError as e:
        if "fills the enhancer's context" not in str(e):
            raise
        return None


def paraphrase_consistency(enhancer: PromptEnhancer, n_per_kind: int, seed: int = 0,
                           kinds: tuple[str, ...] = ("single", "count", "relation")) -> dict[str, float]:
    """Rewrites of `worlds.phrasing.paraphrase_prompts` (the eval phrasebook: wordings no training pair used) that
    keep every stated fact ("consistent": `prompt_facts.contradictions` finds none) and also parse as a valid
    shapes-world caption ("consistent_caption"); per kind and over all. Prompt i is sampled with seed + i; one
    too long for the enhancer's context counts as inconsistent ("too_long" says how many)."""
    from ernielab.worlds.phrasing import paraphrase_prompts
    from ernielab.worlds.prompt_facts import contradictions

    out: dict[str, float] = {"paraphrase_n": n_per_kind * len(kinds), "paraphrase_too_long": 0}
    kept_all, valid_all = [], []
    for kind in kinds:
        texts = [text for text, _ in paraphrase_prompts(kind, n_per_kind, seed)]
        revised = [rewrite_if_it_fits(enhancer, t, seed + i) for i, t in enumerate(texts)]
        out["paraphrase_too_long"] += sum(r is None for r in revised)
        kept = [r is not None and not contradictions(t, r) for t, r in zip(texts, revised)]
        valid = [k and is_caption(r) for k, r in zip(kept, revised)]
        out[f"paraphrase_{kind}_consistent"] = float(np.mean(kept)) if kept else 0.0
        kept_all += kept
        valid_all += valid
    out["paraphrase_consistent"] = float(np.mean(kept_all)) if kept_all else 0.0
    out["paraphrase_consistent_caption"] = float(np.mean(valid_all)) if valid_all else 0.0
    return out


def tokenizer_corpus(cfg: EnhancerTrainConfig, pairs: list[dict]) -> list[str]:
    return [cfg.system_prompt] * 1000 + [
        json.dumps({"prompt": p["intent"], "width": p["size"], "height": p["size"]}) for p in pairs
    ] + [p["target"] for p in pairs]


def tokenizer_from_json(text: str):
    """The tokenizer `build_tokenizer` made, from its backend's JSON (as kept in a checkpoint)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), eos_token=END, pad_token=PAD,
                                  additional_special_tokens=list(ROLE_TOKENS), model_max_length=10_000)
    tok.chat_template = CHAT_TEMPLATE
    return tok


class EnhancerTask(Task):
    """Next-token loss on the answer tokens of (chat prompt, full caption) sequences; exports a PromptEnhancer
    folder to <output_dir>/enhancer and scores it on held-out intents."""

    resumable_changes = frozenset({"n_eval", "n_eval_paraphrase"})  # the final evaluation's size, not what is learned

    def __init__(self, config: EnhancerTrainConfig):
        config.validate()
        self.config = config
        self.pairs = make_pairs(config, config.num_pairs, "train")
        self.set_tokenizer(build_tokenizer(tokenizer_corpus(config, self.pairs), config.vocab_size))

    def set_tokenizer(self, tokenizer) -> None:
        """Use `tokenizer` and encode the training pairs with it (long examples are refused here, before any
        file is written)."""
        self.tokenizer = tokenizer
        enhancer = PromptEnhancer(nn.Identity(), tokenizer, EnhancerConfig(system_prompt=self.config.system_prompt))
        self.data = encode_pairs(enhancer, self.pairs, self.config.n_positions)

    def build(self) -> dict[str, nn.Module]:
        self.rank = self.engine.rank
        return {"model": build_model(self.config, self.tokenizer).to(self.engine.device)}

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Matrices decay, biases and norms do not (the model is transformers' GPT-2, so the groups live here)."""
        params = list(model.parameters())
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.config.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    def _parts(self, step: int, micro: int) -> tuple:
        """(seed, k): the seeds of the hand-written loop for one process without accumulation; + rank beyond."""
        k = step * self.config.grad_accum + micro
        return (self.config.seed, k, self.rank) if self.rank else (self.config.seed, k)

    def batch(self, step: int, micro: int) -> dict:
        cfg, parts = self.config, self._parts(step, micro)
        rng = np.random.default_rng(derive_seed("batch", *parts))
        batch = collate([self.data[i] for i in rng.integers(len(self.data), size=cfg.batch_size)],
                        self.tokenizer.pad_token_id)
        return {k: v.to(self.engine.device) for k, v in batch.items()} | {"dropout_seed": derive_seed("dropout", *parts)}

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(batch["dropout_seed"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    def state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.backend_tokenizer.to_str()}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = state.get("tokenizer")
        if saved and saved != self.tokenizer.backend_tokenizer.to_str():  # e.g. another `tokenizers` version
            tokenizer = tokenizer_from_json(saved)
            if len(tokenizer) != len(self.tokenizer):
                raise ValueError(f"the checkpoint's tokenizer has {len(tokenizer)} tokens, a fresh fit "
                                 f"{len(self.tokenizer)}; start over with --fresh")
            self.set_tokenizer(tokenizer)

    def shipped(self, model: nn.Module) -> PromptEnhancer:
        config = EnhancerConfig(system_prompt=self.config.system_prompt, max_new_tokens=64,
                                rewrite_check="shapes_facts")
        return PromptEnhancer(model, self.tokenizer, config)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model = model.module if hasattr(model, "module") else model
        enhancer, cfg = self.shipped(model), self.config
        result = consistency(enhancer, cfg.n_eval, cfg.seed) if cfg.n_eval else {}
        if cfg.n_eval_paraphrase:
            result |= paraphrase_consistency(enhancer, cfg.n_eval_paraphrase, cfg.seed)
        return result

    def export(self, model: nn.Module, run_dir: Path) -> Path:
        out = run_dir / "enhancer"
        self.shipped(model.cpu().eval()).save_pretrained(out)
        self.config.save(out / TRAIN_CONFIG)  # how this enhancer was trained, beside it
        return out


def train_enhancer(cfg: EnhancerTrainConfig, accelerator=None) -> dict[str, Any]:
    """Train through the engine (resuming from the latest checkpoint in `cfg.output_dir`), export the enhancer to
    <output_dir>/enhancer and score it on `n_eval` held-out intents ("held_out", also in result.json)."""
    result = Engine(EnhancerTask(cfg), accelerator).fit()
    if result["stopped"] is None:
        result["held_out"] = result.get("eval", {})
        summary = {"step": result["step"], "train_s": result["elapsed_s"], "held_out": result["held_out"]}
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(summary, indent=2))
    return result
