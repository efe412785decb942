"""Prompt diversification: each image gets N rewrites of its caption in the styles real users write.

The ERNIE-Image report rewrites its post-training prompts into the forms users type: a short intent, a free
paraphrase, a detailed structured description, a keyword list, numbers as digits or as words, relations in
every wording. `ernielab data diversify` does this as a corpus step, with a pluggable rewriter:

- `grammar`: shapes-world rows, from the row's scene (world ground truth in `meta`) or its parsed caption,
  through `ernielab.worlds.phrasing` (a grammar, so nothing is lost or invented);
- `lm`: any transformers causal LM (a folder or a cached hub id), one instruction per style
  (`STYLE_INSTRUCTIONS`), batched generation, sampling seeded per rewrite.

Columns: `prompts` (list of {style, text}), `prompts_rejected` (list of {style, text, problems, attempt}:
rewrites the `--check` hook flagged, kept for inspection, never used), `prompts_by` (JSON of the settings that
made them; a rerun with other settings is refused unless --redo).

Rewrite k of row i uses the seed SeedSequence([seed, i, k]) (retry r: [seed, i, k, r]) and style k of a
per-row shuffle of the chosen styles, so a rewrite depends on (seed, row id, k) alone: not on batching,
resumption or the other rows.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ernielab.corpus.steps import _open, load_callable, meta, run_step

# One instruction per style for the LM rewriter (the style names follow the report's list).
STYLE_INSTRUCTIONS = {
    "short": "Rewrite the image description as a short request of a few words, the way a user types it.",
    "paraphrase": "Rewrite the image description in other words. Keep every fact: objects, colours, numbers, "
                  "sizes and positions.",
    "detailed": "Rewrite the image description as a detailed, structured description: every object with its "
                "number, colour, shape, size and position, then the background.",
    "keywords": "Rewrite the image description as a comma-separated list of keywords.",
    "digits": "Rewrite the image description, writing every number as digits (3, not three).",
    "words": "Rewrite the image description, writing every number as words (three, not 3).",
    "relation": "Rewrite the image description, saying where the objects are relative to each other in "
                "other words.",
}
DEFAULT_STYLES = ("short", "paraphrase", "detailed", "keywords", "digits")
# Which caption a row is rewritten from when --source is auto: the first non-empty one.
SOURCE_COLUMNS = ("caption_medium", "caption", "caption_detailed", "caption_short")
REWRITERS = ("grammar", "lm")
MAX_PER_IMAGE = 64
MAX_RETRIES = 10
# Plain prompt for tokenizers without a chat template.
PLAIN_PROMPT = "{instruction}\n\nDescription: {caption}\nRewrite:"


@dataclass
class Request:
    row: dict
    source: str | None  # the caption to rewrite
    style: str
    seed: int


# ----------------------------------------------------------------------------- choices per row


def parse_styles(styles: str, known: Sequence[str], rewriter: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in styles.split(",") if s.strip()))
    if not names:
        raise ValueError("--styles is empty")
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"--styles: the {rewriter} rewriter has no style(s) {unknown}; it knows {list(known)}")
    return names


def rewrite_seed(seed: int, row_id: int, k: int, attempt: int = 0) -> int:
    key = [seed, row_id, k] + ([attempt] if attempt else [])  # a retry draws afresh
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def styles_for_row(styles: Sequence[str], per_image: int, seed: int, row_id: int) -> list[str]:
    """Per image: the styles in a shuffled order, cycled to `per_image` (all distinct while N <= len(styles))."""
    order = np.random.default_rng([seed, row_id, 1 << 20]).permutation(len(styles))
    return [styles[order[k % len(styles)]] for k in range(per_image)]


def source_text(row: dict, column: str) -> str | None:
    columns = SOURCE_COLUMNS if column == "auto" else (column,)
    for c in columns:
        text = row.get(c)
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


# ----------------------------------------------------------------------------- rewriters


class GrammarRewriter:
    """Shapes world, through `ernielab.worlds.phrasing`: from the scene in `meta`, else the parsed caption."""

    name = "grammar"

    def __init__(self) -> None:
        try:
            from ernielab.worlds import phrasing
        except ImportError as e:
            raise ValueError(f"--rewriter grammar needs ernielab.worlds.phrasing ({e})") from None
        self.phrasing = phrasing
        self.styles = tuple(phrasing.STYLES)

    def subject(self, row: dict, source: str | None):
        """The scene (ground truth) or the parsed prompt spec of a row; ValueError when neither exists."""
        from ernielab.worlds.shapes import Scene, parse_prompt

        m = meta(row)
        if m.get("world") == "shapes" and m.get("scene"):
            return Scene.from_dict(m["scene"])
        if source is None:
            raise ValueError(f"{row['path']}: the grammar rewriter needs a shapes-world scene or caption")
        try:
            return parse_prompt(source)
        except ValueError as e:
            raise ValueError(f"{row['path']}: the grammar rewriter needs shapes-world rows ({e})") from None

    def check_rows(self, rows: list[dict], column: str) -> None:
        for row in rows:
            self.subject(row, source_text(row, column))

    def rewrite(self, requests: list[Request]) -> list[str]:
        return [self.phrasing.phrase(self.subject(r.row, r.source), r.style, np.random.default_rng(r.seed),
                                     split="train") for r in requests]


class RowSampler:
    """Temperature + top-p sampling with one torch.Generator per sequence, as a logits processor that leaves
    only the drawn token (so `generate` runs greedy over it). Each rewrite then depends on its own seed only,
    not on which other prompts share its batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > self.top_p, 0)  # keeps the top token
        cdf = sorted_probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None]).clamp_max(cdf.shape[-1] - 1)
        token = order.gather(-1, pick)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token, 0.0)


def load_lm(spec: str, device: str = "cpu"):
    """(model, tokenizer) from a local folder or a hub id (the local cache only when HF_HUB_OFFLINE is set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(spec).expanduser()
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise ValueError(f"--lm {spec}: no config.json there, not a transformers model folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path if local else spec)
        model = AutoModelForCausalLM.from_pretrained(path if local else spec).eval()
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local and offline:
            raise ValueError(f"--lm {spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                             f"(download it once online, or give a model folder)") from None
        raise ValueError(f"--lm {spec}: cannot load a causal LM and its tokenizer ({first})") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:  # an unknown device, or CUDA missing
        raise ValueError(f"--device {device}: {str(e).strip().splitlines()[0]}") from None
    return model, tokenizer


class LMRewriter:
    """Any causal LM: one instruction per style; chat template if the tokenizer has one, else PLAIN_PROMPT."""

    name = "lm"

    def __init__(self, spec: str, device: str = "cpu", temperature: float = 0.7, top_p: float = 0.95,
                 max_new_tokens: int = 96, instructions: dict[str, str] | None = None):
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(f"need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1, got "
                             f"{temperature}, {top_p}, {max_new_tokens}")
        self.instructions = dict(instructions or STYLE_INSTRUCTIONS)
        self.styles = tuple(self.instructions)
        self.model, self.tokenizer = load_lm(spec, device)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:  # many causal LMs have none; padding is masked anyway
            if self.tokenizer.eos_token is None:
                raise ValueError(f"--lm {spec}: the tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id
        # A chat template writes its own BOS; a plain prompt gets the tokenizer's (Llama-style models want one).
        self.add_special_tokens = not getattr(self.tokenizer, "chat_template", None)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.device = device

    def check_rows(self, rows: list[dict], column: str) -> None:
        missing = [r["id"] for r in rows if source_text(r, column) is None]
        if missing:
            raise ValueError(f"{len(missing)} row(s) have no caption to rewrite (first: id {missing[0]}); run "
                             f"`ernielab data caption` first or choose --source")

    def prompt_text(self, instruction: str, caption: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": instruction}, {"role": "user", "content": caption}]
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - some templates refuse a system turn: put it in the user turn
                messages = [{"role": "user", "content": f"{instruction}\n\n{caption}"}]
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return PLAIN_PROMPT.format(instruction=instruction, caption=caption)

    def _room(self, n_in: int) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        room = self.max_new_tokens if limit is None else min(self.max_new_tokens, limit - n_in)
        if room < 1:
            raise ValueError(f"a prompt of {n_in} tokens fills the LM's context ({limit} positions); "
                             f"use shorter captions (--source) or a larger LM")
        return room

    def rewrite(self, requests: list[Request]) -> list[str]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        texts = [self.prompt_text(self.instructions[r.style], r.source) for r in requests]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=self.add_special_tokens).to(self.device)
        n_in = inputs["input_ids"].shape[1]
        config = GenerationConfig(max_new_tokens=self._room(n_in), do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=self.tokenizer.eos_token_id)
        processors = LogitsProcessorList()
        if self.temperature > 0:
            processors.append(RowSampler([r.seed for r in requests], self.temperature, self.top_p))
        with torch.no_grad():
            out = self.model.generate(**inputs, generation_config=config, logits_processor=processors)
        answers = self.tokenizer.batch_decode(out[:, n_in:], skip_special_tokens=True)
        return [clean_answer(a) for a in answers]


def clean_answer(text: str) -> str:
    """The first paragraph, whitespace collapsed (small LMs ramble on after a blank line)."""
    first = text.strip().split("\n\n")[0]
    return " ".join(first.split())


# ----------------------------------------------------------------------------- the step


def resolve_check(spec: str | None) -> Callable[[str, str], list[str]] | None:
    """None/'none'; 'shapes' = ernielab.worlds.prompt_facts.contradictions; or 'module:callable' taking
    (caption, rewrite) and returning a list of problems (empty = the rewrite keeps the caption's facts)."""
    if spec in (None, "", "none"):
        return None
    if spec == "shapes":
        try:
            from ernielab.worlds.prompt_facts import contradictions
        except ImportError as e:
            raise ValueError(f"--check shapes needs ernielab.worlds.prompt_facts ({e})") from None
        return contradictions
    return load_callable(spec, "--check")


def _problems(check, source: str | None, text: str) -> list[str]:
    if not text:
        return ["empty rewrite"]
    if check is None or source is None:
        return []
    problems = check(source, text)
    if not isinstance(problems, (list, tuple)) or not all(isinstance(p, str) for p in problems):
        raise ValueError(f"--check must return a list of strings, got {problems!r}")
    return list(problems)


def _changes(before: str | None, now: str) -> str:
    try:
        was = json.loads(before or "{}")
    except json.JSONDecodeError:
        was = {}
    new = json.loads(now)
    return ", ".join(f"{k}: {was.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(was) | set(new))
                     if was.get(k) != new.get(k)) or "unknown"


def diversify(manifest: Path, styles: str | None = None, per_image: int = 3, rewriter: str = "lm",
              lm: str | None = None, seed: int = 0, out: Path | None = None, redo: bool = False,
              check: str | None = None, source: str = "auto", batch_size: int = 16, save_every: int = 1000,
              device: str = "cpu", temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 96,
              retries: int = 0, progress: bool = True) -> dict:
    """Add `per_image` rewrites per row (see the module docstring); every input is checked before writing."""
    if rewriter not in REWRITERS:
        raise ValueError(f"--rewriter must be one of {list(REWRITERS)}, got {rewriter!r}")
    if not 1 <= per_image <= MAX_PER_IMAGE:
        raise ValueError(f"--per-image must be in 1..{MAX_PER_IMAGE}, got {per_image}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"--retries must be in 0..{MAX_RETRIES}, got {retries}")
    if rewriter == "grammar" and lm is not None:
        raise ValueError("--lm is for --rewriter lm")
    checker = resolve_check(check)
    rows, out = _open(manifest, out, needs=("sha256",), step="diversify")
    if source != "auto" and all(source not in r for r in rows):
        raise ValueError(f"--source {source!r} is not a column of {manifest}")
    lm_spec = None
    if rewriter == "lm":
        from ernielab.enhancer.model import DEFAULT_ENHANCER

        lm_spec = str(Path(lm).expanduser().resolve()) if lm and Path(lm).expanduser().exists() else \
            (lm or str(DEFAULT_ENHANCER))
    # Cheap checks first: a bad style or a stale column fails before the LM loads.
    known = tuple(STYLE_INSTRUCTIONS) if rewriter == "lm" else None
    engine = GrammarRewriter() if rewriter == "grammar" else None
    known = known or engine.styles
    names = parse_styles(styles if styles is not None else ",".join(DEFAULT_STYLES if rewriter == "lm" else known),
                         known, rewriter)
    stamp = json.dumps({"rewriter": rewriter, "lm": lm_spec, "styles": names, "per_image": per_image, "seed": seed,
                        "source": source, "check": check or None, "retries": retries,
                        **({"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
                           if rewriter == "lm" else {})}, sort_keys=True)
    if redo:
        for r in rows:
            r.update(prompts=None, prompts_rejected=None, prompts_by=None)
    stale = [r["id"] for r in rows if r.get("prompts") is not None and r.get("prompts_by") != stamp]
    if stale:
        raise ValueError(f"{len(stale)} row(s) were diversified with other settings "
                         f"({_changes(rows[stale[0]].get('prompts_by'), stamp)}); use --redo to replace them, "
                         f"or --out to write another manifest")
    todo = [r for r in rows if r.get("prompts") is None]
    if engine is None:
        engine = LMRewriter(lm_spec, device, temperature, top_p, max_new_tokens)
    engine.check_rows(todo, source)

    def work(chunk: list[dict]) -> list[dict]:
        slots = [(i, k, Request(row, source_text(row, source), style, rewrite_seed(seed, row["id"], k)))
                 for i, row in enumerate(chunk)
                 for k, style in enumerate(styles_for_row(names, per_image, seed, row["id"]))]
        kept: list[dict[int, dict]] = [{} for _ in chunk]
        rejected: list[list[dict]] = [[] for _ in chunk]
        for attempt in range(retries + 1):  # a flagged rewrite is redrawn with a new seed, up to --retries times
            if not slots:
                break
            texts = engine.rewrite([req for _, _, req in slots])
            again = []
            for (i, k, req), text in zip(slots, texts):
                problems = _problems(checker, req.source, text)
                if not problems:
                    kept[i][k] = {"style": req.style, "text": text}
                    continue
                rejected[i].append({"style": req.style, "text": text, "problems": problems, "attempt": attempt})
                again.append((i, k, replace(req, seed=rewrite_seed(seed, chunk[i]["id"], k, attempt + 1))))
            slots = again
        return [{"prompts": [kept[i][k] for k in sorted(kept[i])], "prompts_rejected": rejected[i],
                 "prompts_by": stamp} for i in range(len(chunk))]

    start = time.perf_counter()
    done = run_step(rows, out, lambda r: r.get("prompts") is None, work, "diversify", batch_size, save_every,
                    progress)
    kept = sum(len(r["prompts"]) for r in rows)
    rejected = sum(len(r.get("prompts_rejected") or []) for r in rows)
    return {"rows": len(rows), "rewritten_now": done, "prompts": kept, "rejected": rejected,
            "rewriter": rewriter, "styles": names, "per_image": per_image,
            "seconds": round(time.perf_counter() - start, 2)}
