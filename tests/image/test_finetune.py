"""Fine-tuning on a folder: latent/caption caches, aspect-ratio buckets, validation sheets (docs/finetune.md)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.image.buckets import BucketSampler, assign_buckets, make_buckets
from ernielab.image.caches import FeatureCache
from ernielab.image.config import ErnieImageConfig
from ernielab.image.latents import LatentSpaceConfig, build_latent_space
from ernielab.image.train import TrainConfig, Trainer
from ernielab.worlds.folder import ImageCaptionFolder

REPO = Path(__file__).resolve().parents[2]

SIZES = [(16, 16), (32, 16), (16, 32), (24, 16), (40, 16), (16, 24), (20, 20), (48, 16)]  # (width, height)


def write_folder(root, sizes=SIZES):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i % 3}")
    return root


def config(out, data_dir, **kw) -> TrainConfig:
    base = dict(model=ErnieImageConfig.tiny(in_channels=48, text_in_dim=384).to_dict(), output_dir=str(out), steps=4,
                batch_size=2, lr=1e-3, warmup_steps=1, log_every=2, save_every=2, ema_decay=0.9,
                data={"kind": "folder", "path": str(data_dir), "image_size": 16},
                sampling={"steps": 2, "guidance_scale": 2.0})
    base.update(kw)
    return TrainConfig.from_dict(base)


def weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_buckets_assign_by_aspect_and_draw_one_bucket():
    buckets = make_buckets(16 * 16, 4, max_ratio=2.0)
    assert (16, 16) in buckets and all(h % 4 == 0 and w % 4 == 0 for h, w in buckets)
    assert all(max(h, w) / min(h, w) <= 2.0 + 0.5 for h, w in buckets)
    assert all(abs(h * w - 256) / 256 < 0.3 for h, w in buckets)
    sizes = [(h, w) for w, h in SIZES]
    assignment = assign_buckets(sizes, buckets)
    for (h, w), b in zip(sizes, assignment):
        bh, bw = buckets[b]
        assert (w > h) == (bw > bh) and (w < h) == (bw < bh)
    sampler = BucketSampler(assignment, buckets)
    for k in range(20):
        size, indices = sampler.draw(4, seed=3, k=k)
        assert all(buckets[assignment[i]] == size for i in indices)
        assert sampler.draw(4, seed=3, k=k) == (size, indices)  # a function of (seed, k, rank)
    assert len({sampler.draw(4, 3, k)[0] for k in range(40)}) > 1


def test_bucketed_batches_stack_at_their_bucket_size(tmp_path):
    data = write_folder(tmp_path / "data")
    trainer = Trainer(config(tmp_path / "run", data, buckets=True))
    trainer.accelerator = type("A", (), {"device": torch.device("cpu")})()
    trainer.rank = 0
    shapes = set()
    for step in range(12):
        batch = trainer.batch(step, 0)
        (h, w), _ = trainer.sampler.draw(2, 0, step, 0)
        assert batch["x0"].shape == (2, 48, h // 4, w // 4)
        shapes.add((h, w))
    assert len(shapes) > 1
    item = trainer.dataset.item(4, 12, 20)  # a 40x16 image into a 12x20 bucket: cover, then centre crop
    assert item["image"].shape == (3, 12, 20)


def test_cache_entries_are_exact_and_keyed_by_content_and_model(tmp_path):
    data = write_folder(tmp_path / "data")
    dataset = ImageCaptionFolder(data, image_size=16)
    trainer = Trainer(config(tmp_path / "run", data))
    sizes = [(16, 16)] * len(dataset)
    cache = FeatureCache(tmp_path / "cache", trainer.latent_space, trainer.text_encoder)
    made = cache.build(dataset, sizes, "cpu", progress=False)
    assert made == {"latents": len(SIZES), "texts": 4, "reused": 0}  # 3 captions + "" (dropped for CFG)
    for i in range(len(dataset)):
        expected = trainer.latent_space.encode(dataset[i]["image"][None])
        assert torch.equal(cache.latents([i]), expected)
    assert torch.equal(cache.text(["picture 1"])[0], trainer.text_encoder.encode_list(["picture 1"])[0])
    assert cache.build(dataset, sizes, "cpu", progress=False) == {"latents": 0, "texts": 0, "reused": 12}

    old = cache.latent_path(2)
    Image.fromarray(np.full((32, 16, 3), 7, np.uint8)).save(data / "img2.png")  # the image changes
    made = cache.build(dataset, sizes, "cpu", progress=False)
    assert made["latents"] == 1 and cache.latent_path(2) != old
    assert torch.equal(cache.latents([2]), trainer.latent_space.encode(dataset[2]["image"][None]))

    other = build_latent_space(LatentSpaceConfig(kind="pixel", patch_size=4, scale=0.5))  # another model
    other_cache = FeatureCache(tmp_path / "cache", other, trainer.text_encoder)
    assert other_cache.latent_dir != cache.latent_dir and other_cache.text_dir == cache.text_dir
    assert other_cache.build(dataset, sizes, "cpu", progress=False)["latents"] == len(SIZES)


@pytest.mark.parametrize("buckets", [False, True])
def test_cache_trains_the_same_numbers(tmp_path, buckets):
    data = write_folder(tmp_path / "data")
    Trainer(config(tmp_path / "plain", data, buckets=buckets)).train()
    Trainer(config(tmp_path / "cached", data, buckets=buckets, cache_dir=str(tmp_path / "cache"))).train()
    assert_same(weights(tmp_path / "plain"), weights(tmp_path / "cached"))
    assert len(list((tmp_path / "cache").glob("latents/*/*.safetensors"))) == len(SIZES)


def test_validation_sheets_at_the_right_steps(tmp_path):
    data = write_folder(tmp_path / "data")
    cfg = config(tmp_path / "run", data, steps=5, validation_every=2, validation_steps=2,
                 validation_prompts=["picture 0", "picture 1", "picture 2"])
    Trainer(cfg).train()
    sheets = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert sheets == ["step-0000002.png", "step-0000004.png"]
    assert Image.open(tmp_path / "run" / "validation" / sheets[0]).size[0] > 0


def test_resume_is_exact_with_the_options_on(tmp_path):
    data = write_folder(tmp_path / "data")
    on = dict(buckets=True, cache_dir=str(tmp_path / "cache"), validation_every=3, validation_steps=1,
              validation_prompts=["picture 0"])
    Trainer(config(tmp_path / "straight", data, steps=6, **on)).train()
    Trainer(config(tmp_path / "split", data, steps=3, **on)).train()
    Trainer(config(tmp_path / "split", data, steps=6, **on)).train()  # resumes from step 3
    assert latest_checkpoint(tmp_path / "split").name == "step-0000006"
    assert_same(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    ema_a = load_file(str(latest_checkpoint(tmp_path / "straight") / "ema.safetensors"))
    ema_b = load_file(str(latest_checkpoint(tmp_path / "split") / "ema.safetensors"))
    assert_same(ema_a, ema_b)
    last = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("step") == 6 and "loss" in r] for run in (tmp_path / "straight", tmp_path / "split")]
    assert last[0] == last[1] and len(last[0]) == 1
    assert sorted(p.name for p in (tmp_path / "split" / "validation").iterdir()) == ["step-0000003.png",
                                                                                     "step-0000006.png"]


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="data.kind 'folder'"):
        TrainConfig(output_dir=str(tmp_path), cache_dir=str(tmp_path / "c")).validate()
    with pytest.raises(ValueError, match="validation_prompts"):
        TrainConfig(output_dir=str(tmp_path), validation_every=5).validate()


def test_folder_finetune_config_runs_a_lora(tmp_path):
    """configs/image/folder_finetune.json on a folder: LoRA + cache + buckets + validation, exported adapter."""
    data = write_folder(tmp_path / "data")
    raw = json.loads((REPO / "configs/image/folder_finetune.json").read_text())
    raw.update(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), steps=2, batch_size=2,
               validation_every=2, validation_steps=1, save_every=2, warmup_steps=0)
    raw["data"].update(path=str(data), image_size=16)
    result = Trainer(TrainConfig.from_dict(raw)).train()
    assert result["exported"] == str(tmp_path / "run" / "lora")
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "step-0000002.png").is_file()
