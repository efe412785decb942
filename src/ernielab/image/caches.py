"""On-disk caches of what a frozen encoder makes of the training data: image latents and caption features.

Fine-tuning on a folder encodes the same images and captions at every epoch; with `cache_dir` set they are
encoded once (a progress bar), written as one safetensors file per entry, and read back by the trainer
instead. An entry stores exactly what the encoder returns (`latent_space.encode` of the image alone, the text
encoder's unpadded features of the caption), so training reads the same numbers it would have computed.

Keys, so a stale entry is never used:

- a latent: sha256 of the image file's bytes + the bucket size it is cropped to, in a folder named by the
  latent space's identity (its config, and for an autoencoder a hash of its weights);
- a caption: sha256 of the caption text, in a folder named by the text encoder's identity (its config:
  name, hidden layer, max length, tokenizer).

A changed image gets a new key (its entry is encoded again); a changed model gets a new folder. Entries are
written to a temp name and renamed, so an interrupted build leaves whole entries only, and the next build
encodes only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

IDENTITY_CHARS = 16  # hex digits of an identity hash in a folder name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def latent_space_identity(latent_space: torch.nn.Module) -> str:
    """Its config plus, for an autoencoder, the hash of its weights: another VAE never shares entries."""
    parts = {"config": latent_space.config.to_dict(), "class": type(latent_space).__name__}
    vae = getattr(latent_space, "vae", None)
    if vae is not None:
        parts["weights"] = module_digest(vae)
    return sha256_text(json.dumps(parts, sort_keys=True))[:IDENTITY_CHARS]


def text_encoder_identity(text_encoder) -> str:
    return sha256_text(json.dumps({"config": text_encoder.config.to_dict()}, sort_keys=True))[:IDENTITY_CHARS]


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class FeatureCache:
    """Latents of a folder dataset's images (at their bucket sizes) and features of its captions, on disk."""

    def __init__(self, root: str | Path, latent_space: torch.nn.Module, text_encoder):
        self.root = Path(root)
        self.latent_space, self.text_encoder = latent_space, text_encoder
        self.latent_dir = self.root / "latents" / latent_space_identity(latent_space)
        self.text_dir = self.root / "text" / text_encoder_identity(text_encoder)
        self.digests: list[str] = []
        self.sizes: list[tuple[int, int]] = []

    def latent_path(self, i: int) -> Path:
        h, w = self.sizes[i]
        return self.latent_dir / f"{self.digests[i]}-{h}x{w}.safetensors"

    def text_path(self, caption: str) -> Path:
        return self.text_dir / f"{sha256_text(caption)}.safetensors"

    def index(self, dataset, sizes: list[tuple[int, int]]) -> None:
        """Key every item: the hash of its image file and the size it is cropped to."""
        self.digests = [sha256_file(r.image) for r in dataset.records]
        self.sizes = list(sizes)

    @torch.no_grad()
    def build(self, dataset, sizes: list[tuple[int, int]], device, progress: bool = True) -> dict[str, int]:
        """Encode what is missing; -> {"latents": encoded now, "texts": encoded now, "reused": entries found}."""
        self.index(dataset, sizes)
        todo = [i for i in range(len(self.digests)) if not self.latent_path(i).is_file()]
        captions = sorted({r.caption for r in dataset.records} | {""})  # "": the caption dropped for CFG
        texts = [c for c in captions if not self.text_path(c).is_file()]
        reused = len(self.digests) - len(todo) + len(captions) - len(texts)
        bar = tqdm(total=len(todo) + len(texts), disable=not progress or not (todo or texts), desc="cache")
        for i in todo:
            h, w = self.sizes[i]
            image = dataset.item(i, h, w)["image"] if (h, w) != (dataset.image_size,) * 2 else dataset[i]["image"]
            latent = self.latent_space.encode(image[None].to(device))[0]
            _write(self.latent_path(i), {"latent": latent},
                   {"source": str(dataset.records[i].image), "sha256": self.digests[i], "size": f"{h}x{w}"})
            bar.update(1)
        for caption in texts:
            hidden = self.text_encoder.encode_list([caption])[0]
            _write(self.text_path(caption), {"hidden": hidden}, {"caption": caption})
            bar.update(1)
        bar.close()
        return {"latents": len(todo), "texts": len(texts), "reused": reused}

    def latents(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([load_file(str(self.latent_path(i)))["latent"] for i in indices])

    def text(self, captions: list[str]) -> list[torch.Tensor]:
        return [load_file(str(self.text_path(c)))["hidden"] for c in captions]
