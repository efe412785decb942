"""Prompt enhancer: a causal LM that rewrites a short prompt into a full, structured description.

It follows ERNIE-Image's input format: the user message is a JSON string
`{"prompt": ..., "width": ..., "height": ...}`, an optional system message asks for a structured
visual description, the tokenizer's chat template turns the messages into text, and the answer is
sampled (temperature 0.6, top-p 0.95 by default); only the newly generated tokens are decoded.

Any transformers causal-LM folder (model + tokenizer) works. An optional `enhancer.json` in the
folder (an `EnhancerConfig`) sets the system prompt and sampling defaults. Tokenizers without a chat
template get this fallback, documented in docs/enhancer.md:

    System: {system}\n\nUser: {json}\n\nAssistant:

The default enhancer ships in `ernielab/assets/enhancer` (a tiny GPT-2 trained on shapes world, see
`ernielab.enhancer.train`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch

from ernielab.core.config import Config, bounded

DEFAULT_ENHANCER = Path(__file__).resolve().parent.parent / "assets" / "enhancer"
ENHANCER_CONFIG = "enhancer.json"
REWRITE_CHECKS = ("none", "shapes_facts")
DEFAULT_SYSTEM_PROMPT = (
    "You turn a short image request into one complete, structured description of the picture. "
    "The request is JSON with the prompt and the image width and height. Name the colour, shape and "
    "number of every object and, for two objects, where one stands relative to the other. Keep "
    "everything the request says and fill in what it leaves open. Answer with the description only."
)


@dataclasses.dataclass
class EnhancerConfig(Config):
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: no system message
    temperature: float = 0.6  # 0 means greedy decoding
    top_p: float = 0.95
    max_new_tokens: int = 256
    # The release's template ends the user block with its own answer cue; chat models need the cue added.
    add_generation_prompt: bool = True
    # Tokenise the templated text with the tokenizer's special tokens (the release adds BOS this way).
    add_special_tokens: bool = False
    # How a pipeline checks a rewrite against its prompt before drawing from it (a rewrite that contradicts the
    # prompt is dropped for the prompt): "shapes_facts" = `worlds.prompt_facts.contradictions`; "none" = no check.
    rewrite_check: str = bounded("none", choices=REWRITE_CHECKS)

    @classmethod
    def release(cls) -> "EnhancerConfig":
        """Exactly the formatting of diffusers' ErnieImagePipeline for the release's pe/: no system message,
        no generation prompt, BOS added by the tokenizer; temperature 0.6, top-p 0.95."""
        return cls(system_prompt=None, add_generation_prompt=False, add_special_tokens=True)


def fallback_chat_text(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Plain "Role: content" turns, for tokenizers that have no chat template."""
    text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text + ("\n\nAssistant:" if add_generation_prompt else "")


class PromptEnhancer:
    """Wraps a causal LM and its tokenizer; `enhance` returns the revised prompt."""

    def __init__(self, model, tokenizer, config: EnhancerConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EnhancerConfig()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu",
                        config: EnhancerConfig | None = None) -> "PromptEnhancer":
        """Load a causal-LM folder (default: the bundled shapes-world enhancer)."""
        path = Path(path) if path is not None else DEFAULT_ENHANCER
        if not path.is_dir():
            raise FileNotFoundError(f"prompt enhancer folder not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a transformers model folder")
        if config is None and (path / ENHANCER_CONFIG).is_file():
            config = EnhancerConfig.load(path / ENHANCER_CONFIG)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).to(device)
        except (OSError, ValueError, KeyError) as e:  # transformers' own errors are long; keep the gist
            raise ValueError(f"cannot load a causal LM + tokenizer from {path}: {str(e).splitlines()[0]}") from None
        return cls(model, tokenizer, config)

    @property
    def rewrite_check(self):
        """The check its config names: a callable (prompt, rewrite) -> reasons the rewrite contradicts the prompt
        (empty: it keeps every stated fact), or None. Pipelines use it by default (`enhancer_check="auto"`)."""
        if self.config.rewrite_check == "shapes_facts":
            from ernielab.worlds.prompt_facts import contradictions

            return contradictions
        return None

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.config.save(path / ENHANCER_CONFIG)

    # ---- input format ----------------------------------------------------------------------------
    def build_messages(self, prompt: str, width: int, height: int) -> list[dict]:
        user = json.dumps({"prompt": prompt, "width": int(width), "height": int(height)}, ensure_ascii=False)
        messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return messages + [{"role": "user", "content": user}]

    def build_input_text(self, prompt: str, width: int, height: int) -> str:
        messages = self.build_messages(prompt, width, height)
        cue = self.config.add_generation_prompt
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=cue)
        return fallback_chat_text(messages, cue)

    def build_inputs(self, prompt: str, width: int, height: int):
        """The tokenised model input (input_ids, attention_mask) for one prompt."""
        return self.tokenizer(self.build_input_text(prompt, width, height), return_tensors="pt",
                              add_special_tokens=self.config.add_special_tokens)

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def enhance(self, prompt: str, width: int = 32, height: int = 32, seed: int = 0,
                temperature: float | None = None, top_p: float | None = None) -> str:
        """The revised prompt; the same seed gives the same text. An empty answer keeps the prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("cannot enhance an empty prompt")
        temperature = self.config.temperature if temperature is None else temperature
        top_p = self.config.top_p if top_p is None else top_p
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        inputs = self.build_inputs(prompt, width, height).to(self.model.device)
        n_in = inputs["input_ids"].shape[1]
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        # Sampling draws from torch's global generator: fork it so a seed fixes the answer and
        # the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=self._room(n_in), **sampling,
                                      pad_token_id=self._pad_id(), eos_token_id=self.tokenizer.eos_token_id)
        revised = self.tokenizer.decode(out[0, n_in:], skip_special_tokens=True).strip()
        return revised or prompt

    def enhance_many(self, prompts: Sequence[str], width: int = 32, height: int = 32, seed: int = 0,
                     progress: bool = False, **sampling) -> list[str]:
        """Prompt i uses seed + i, like image i, so a rewrite does not depend on its batch."""
        from tqdm.auto import tqdm

        items = tqdm(list(prompts), desc="enhance", disable=not progress)
        return [self.enhance(p, width, height, seed + i, **sampling) for i, p in enumerate(items)]

    def _room(self, n_in: int) -> int:
        """max_new_tokens, clipped to the model's context (a tiny model has few positions)."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        room = self.config.max_new_tokens if limit is None else min(self.config.max_new_tokens, limit - n_in)
        if room <= 0:
            raise ValueError(f"the prompt fills the enhancer's context ({n_in} tokens of {limit})")
        return room

    def _pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id
