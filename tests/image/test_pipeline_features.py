"""Inference features of TextToImagePipeline: img2img, inpainting, several images per prompt, per-prompt negatives,
precomputed prompt embeddings, the step-end callback, model CPU offload and VAE tiling; and the CLI's --image,
--strength, --mask and --n-per-prompt."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ernielab.cli.main import app
from ernielab.image.flow_matching import add_noise
from ernielab.image.pipeline import TextToImagePipeline
from ernielab.image.samplers import cfg_denoiser, euler_sample, img2img_start, sigma_schedule

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return TextToImagePipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def picture():
    """A 32x32 uint8 picture with structure (a gradient and a square)."""
    y, x = np.mgrid[0:32, 0:32]
    a = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    a[8:20, 10:22] = (250, 30, 30)
    return a


def pt(pipe, prompts, **kw) -> torch.Tensor:
    return pipe(prompts, output_type="pt", **kw).images


def as_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1


# ---- img2img ----------------------------------------------------------------------------------
def test_strength_one_is_text_to_image(pipe, picture):
    txt = pt(pipe, PROMPTS, seed=3)
    for image in (Image.fromarray(picture), picture, as_float(picture), [Image.fromarray(picture)] * 3):
        assert torch.equal(pt(pipe, PROMPTS, seed=3, image=image, strength=1.0), txt)


def test_img2img_is_the_noised_image_denoised_from_the_start_step(pipe, picture):
    steps, strength, seed = 4, 0.5, 2
    got = pipe("a red circle", image=Image.fromarray(picture), strength=strength, num_inference_steps=steps,
               seed=seed, output_type="latent").images
    sigmas = sigma_schedule(steps, pipe.config.shift)[img2img_start(steps, strength):]
    assert len(sigmas) == 3 and math.isclose(float(sigmas[0]), 0.5)  # shift 1: sigma 0.5 = strength
    x0 = pipe.latent_space.encode(as_float(picture)[None])
    noise = pipe.initial_noise(1, 32, 32, seed)
    cond = pipe.text_encoder(["a red circle"])
    uncond = pipe.text_encoder([""])
    x = euler_sample(cfg_denoiser(pipe.transformer, cond, uncond, pipe.config.guidance_scale),
                     add_noise(x0, noise, sigmas[:1]), sigmas)
    assert torch.equal(got, x)


def test_small_strength_keeps_the_image_close(pipe, picture):
    target = as_float(picture)[None]
    dist = {s: (pt(pipe, "a red circle", image=picture, strength=s, num_inference_steps=8) - target).abs().mean()
            for s in (0.125, 0.5, 1.0)}
    assert dist[0.125] < dist[0.5] < dist[1.0]
    assert dist[0.125] < 0.35 * dist[1.0], dist


def test_img2img_per_prompt_images_and_size_default(pipe, picture):
    other = 255 - picture
    both = pt(pipe, PROMPTS[:2], image=[picture, other], strength=0.5, seed=4)
    first = pt(pipe, PROMPTS[0], image=picture, strength=0.5, seed=4)
    second = pt(pipe, PROMPTS[1], image=other, strength=0.5, seed=5)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-4, atol=1e-4)
    big = np.zeros((48, 64, 3), np.uint8)  # height/width default to the image's
    assert pipe("x", image=big, strength=0.5, output_type="np").images.shape == (1, 48, 64, 3)


# ---- inpainting -------------------------------------------------------------------------------
def test_inpainting_keeps_the_unmasked_region(pipe, picture):
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # repaint the left half (latent columns 0-3 of the 8x8 grid)
    for strength in (1.0, 0.6):
        out = pipe("a red circle", image=picture, mask_image=Image.fromarray(mask), strength=strength, seed=1,
                   output_type="np").images[0]
        assert np.array_equal(out[:, 16:], picture[:, 16:])  # kept exactly (pixel space decodes losslessly)
        assert np.abs(out[:, :16].astype(int) - picture[:, :16]).mean() > 5  # the masked half was repainted
    # a mask on the latent grid, or a float tensor, is the same mask
    latent_mask = torch.zeros(8, 8)
    latent_mask[:, :4] = 1
    a = pt(pipe, "a red circle", image=picture, mask_image=mask, seed=1)
    assert torch.equal(pt(pipe, "a red circle", image=picture, mask_image=latent_mask, seed=1), a)
    assert torch.equal(pt(pipe, "a red circle", image=picture, mask_image=torch.from_numpy(mask) / 255.0, seed=1), a)
    assert torch.equal(pt(pipe, "a red circle", image=picture, mask_image=mask > 0, seed=1), a)
    assert torch.equal(pt(pipe, "a red circle", image=picture, mask_image=[Image.fromarray(mask)], seed=1), a)


def test_inpainting_mask_takes_every_cell_a_white_pixel_touches(pipe, picture):
    mask = np.zeros((32, 32), np.uint8)
    mask[5, 5] = 255  # one pixel: its 4x4 cell (rows/cols 4-7) is repainted, everything else kept
    out = pipe("a red circle", image=picture, mask_image=mask, seed=1, output_type="np").images[0]
    keep = np.ones((32, 32), bool)
    keep[4:8, 4:8] = False
    assert np.array_equal(out[keep], picture[keep])
    assert not np.array_equal(out[4:8, 4:8], picture[4:8, 4:8])


# ---- several images per prompt, negatives, embeddings -----------------------------------------
def test_num_images_per_prompt_seeds(pipe):
    out = pipe(PROMPTS[:2], num_images_per_prompt=2, seed=5, output_type="pt")
    assert out.seeds == [5, 6, 7, 8]
    assert out.revised_prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert torch.equal(out.images, pt(pipe, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], seed=5))
    for k in range(4):  # image i of prompt p is the single-prompt image with seed + p * n + i
        alone = pt(pipe, PROMPTS[k // 2], seed=5 + k, batch_size=1)
        torch.testing.assert_close(out.images[k : k + 1], alone, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out.images[0], out.images[1])
    noise = pipe.initial_noise(4, 32, 32, seed=5)
    assert torch.equal(pipe(PROMPTS[:2], num_images_per_prompt=2, latents=noise, output_type="pt").images,
                       out.images)


def test_per_prompt_negatives_equal_separate_calls(pipe):
    negatives = ["blurry", "a dark night sky with many stars"]
    together = pt(pipe, PROMPTS[:2], negative_prompt=negatives, seed=2, batch_size=1)
    for i in range(2):
        assert torch.equal(together[i : i + 1], pt(pipe, PROMPTS[i], negative_prompt=negatives[i], seed=2 + i))
    batched = pt(pipe, PROMPTS[:2], negative_prompt=negatives, seed=2, batch_size=2)
    torch.testing.assert_close(batched, together, rtol=1e-4, atol=1e-4)
    assert not torch.equal(together, pt(pipe, PROMPTS[:2], negative_prompt="blurry", seed=2, batch_size=1))
    # with several images per prompt each image takes its prompt's negative
    many = pt(pipe, PROMPTS[:2], negative_prompt=negatives, num_images_per_prompt=2, seed=2, batch_size=1)
    assert torch.equal(many[3:4], pt(pipe, PROMPTS[1], negative_prompt=negatives[1], seed=5))


def test_prompt_embeds_equal_prompts(pipe):
    text, lens = pipe.encode_prompt(PROMPTS)
    assert text.shape[0] == 3 and lens.tolist() == [int(n) for n in lens]
    neg_text, neg_lens = pipe.encode_prompt(["blurry"])
    for batch_size in (1, 2, 16):
        ref = pipe(PROMPTS, seed=4, batch_size=batch_size, negative_prompt="blurry", output_type="pt")
        got = pipe(prompt_embeds=text, prompt_embeds_lens=lens, negative_prompt_embeds=neg_text,
                   negative_prompt_embeds_lens=neg_lens, seed=4, batch_size=batch_size, output_type="pt")
        assert torch.equal(got.images, ref.images)
        assert got.revised_prompts == ["", "", ""] and got.seeds == ref.seeds
    listed = [text[i, : lens[i]] for i in range(3)]  # a list of [T_i, D] tensors; default negative from config
    assert torch.equal(pt(pipe, None, prompt_embeds=listed, seed=4), pt(pipe, PROMPTS, seed=4))
    two = pt(pipe, None, prompt_embeds=text[:2], prompt_embeds_lens=lens[:2], num_images_per_prompt=2, seed=4)
    assert torch.equal(two, pt(pipe, PROMPTS[:2], num_images_per_prompt=2, seed=4))


# ---- callback ---------------------------------------------------------------------------------
def test_callback_on_step_end(pipe, picture):
    calls = []

    def record(p, step, sigma, latents):
        assert p is pipe and latents.shape == (3, 48, 8, 8)
        calls.append((step, sigma))

    plain = pt(pipe, PROMPTS, num_inference_steps=5, seed=1)
    assert torch.equal(pt(pipe, PROMPTS, num_inference_steps=5, seed=1, callback_on_step_end=record), plain)
    assert [s for s, _ in calls] == [0, 1, 2, 3, 4]
    sigmas = [s for _, s in calls]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] == 0.0
    calls.clear()  # img2img: only the steps that run
    pipe(PROMPTS, image=picture, strength=0.5, num_inference_steps=4, callback_on_step_end=record)
    assert calls == [(0, 0.25), (1, 0.0)]

    def zero_last(p, step, sigma, latents):
        return {"latents": torch.zeros_like(latents)} if sigma == 0 else None

    out = pipe(PROMPTS, num_inference_steps=3, callback_on_step_end=zero_last, output_type="latent").images
    assert torch.equal(out, torch.zeros(3, 48, 8, 8))

    def halve_first(p, step, sigma, latents):
        return {"latents": latents * 0.5} if step == 0 else {}

    assert not torch.equal(pt(pipe, PROMPTS, num_inference_steps=3, callback_on_step_end=halve_first),
                           pt(pipe, PROMPTS, num_inference_steps=3))


def test_callback_and_inpainting_with_a_finisher(pipe, picture):
    finished = pipe.with_finisher(pipe.transformer, steps=2)
    calls = []
    finished(PROMPTS[:1], num_inference_steps=4, callback_on_step_end=lambda p, i, s, x: calls.append((i, s)))
    assert calls == [(0, 0.75), (1, 0.5), (2, 0.25), (3, 0.0)]  # the finisher's steps continue the count
    mask = np.zeros((32, 32), np.uint8)
    mask[16:] = 255
    out = finished("a red circle", image=picture, mask_image=mask, strength=0.8, output_type="np").images[0]
    assert np.array_equal(out[:16], picture[:16]) and not np.array_equal(out[16:], picture[16:])


# ---- memory -----------------------------------------------------------------------------------
def test_model_cpu_offload_gives_identical_images_and_moves_modules(tiny_pipeline_dir, pipe, picture,
                                                                    monkeypatch):
    offloaded = TextToImagePipeline.from_pretrained(tiny_pipeline_dir).enable_model_cpu_offload("cpu")
    assert offloaded.execution_device == torch.device("cpu")
    moves = []
    for name in ("transformer", "latent_space", "text_encoder"):
        module = getattr(offloaded, name)
        original = module.to

        def spy(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", spy)
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    for kw in (dict(), dict(image=picture, strength=0.7, mask_image=mask)):
        moves.clear()
        assert torch.equal(pt(offloaded, PROMPTS, seed=6, batch_size=2, **kw), pt(pipe, PROMPTS, seed=6, batch_size=2,
                                                                                  **kw))
        for name in ("transformer", "latent_space", "text_encoder"):  # onto the device while it runs, then back
            mine = [d for n, d in moves if n == name]
            assert mine and len(mine) % 2 == 0 and mine[-1] == "cpu", (name, mine)
        assert [n for n, _ in moves].count("transformer") == 4  # in and out once per batch
    offloaded.to("cpu")
    assert getattr(offloaded, "_offload_device") is None  # to() turns offload off


def test_vae_tiling(pipe):
    with pytest.raises(ValueError, match="VAE tiling needs a diffusers VAE"):
        pipe.enable_vae_tiling()
    pipe.disable_vae_tiling()  # nothing to do, no error
    from diffusers import AutoencoderKL

    from ernielab.image.latents import DiffusersAutoencoder, LatentSpaceConfig

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    space = DiffusersAutoencoder(LatentSpaceConfig(kind="diffusers", patch_size=1), vae=vae)
    with_vae = TextToImagePipeline(pipe.transformer, pipe.text_encoder, space)
    with_vae.enable_vae_tiling()
    assert vae.use_tiling
    with_vae.disable_vae_tiling()
    assert not vae.use_tiling
    odd = TextToImagePipeline(pipe.transformer, pipe.text_encoder, pipe.latent_space)
    odd.latent_space = SimpleNamespace(vae=object())
    with pytest.raises(ValueError, match="VAE tiling"):
        odd.enable_vae_tiling()


def test_release_vae_img2img_inpainting_and_tiling(tiny_release_dir):
    """The same features through a diffusers VAE latent space (the release's layout, tiny random weights)."""
    from ernielab.image.pipeline import image_tensor

    rel = TextToImagePipeline.from_pretrained(tiny_release_dir)
    y, x = np.mgrid[0:64, 0:64]
    picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    kw = dict(num_inference_steps=3, seed=2)
    txt = rel("a red circle", height=64, width=64, output_type="pt", **kw).images
    assert torch.equal(rel("a red circle", image=picture, strength=1.0, output_type="pt", **kw).images, txt)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # latent grid 16x16: columns 0-7 repainted
    x0 = rel.latent_space.encode(image_tensor(picture))
    for strength in (1.0, 0.7):
        lat = rel("a red circle", image=picture, mask_image=mask, strength=strength, output_type="latent",
                  **kw).images
        assert torch.equal(lat[..., 8:], x0[..., 8:])  # the kept cells end as the original's latents
        assert not torch.allclose(lat[..., :8], x0[..., :8], atol=1e-2)
    near = rel("a red circle", image=picture, strength=0.34, output_type="latent", **kw).images
    far = rel("a red circle", image=picture, strength=1.0, output_type="latent", **kw).images
    assert (near - x0).abs().mean() < (far - x0).abs().mean()
    rel.enable_vae_tiling()
    assert rel.latent_space.vae.use_tiling
    rel.disable_vae_tiling()
    assert not rel.latent_space.vae.use_tiling


# ---- bad inputs -------------------------------------------------------------------------------
class NoWork:
    def enhance_many(self, *args, **kwargs):
        raise AssertionError("the pipeline started work before refusing a bad argument")


def bad_cases(picture):
    mask = np.zeros((32, 32), np.uint8)
    return [
        (dict(image=picture, strength=0.0), "strength"),
        (dict(image=picture, strength=1.5), "strength"),
        (dict(image=picture, strength=math.nan), "strength"),
        (dict(image=picture, strength="0.5"), "strength"),
        (dict(strength=0.5), "strength needs image"),
        (dict(mask_image=mask), "mask_image needs image"),
        (dict(image=picture, height=64), "image is 32x32 but the call draws 64x32"),
        (dict(image=np.zeros((30, 30, 3), np.uint8)), "multiple of 4"),
        (dict(image=[picture] * 3), "1 image or one per prompt"),
        (dict(image=torch.full((3, 32, 32), 2.0)), r"\[-1, 1\]"),
        (dict(image=np.zeros((32, 32, 3), np.float32)), "uint8"),
        (dict(image="picture.png"), "image"),
        (dict(image=picture, mask_image=np.zeros((16, 16), np.uint8)), "mask is 16x16"),
        (dict(image=picture, mask_image=[mask] * 3), "1 mask or one per prompt"),
        (dict(image=picture, mask_image=torch.zeros(2, 3, 32, 32)), "mask tensors"),
        (dict(image=picture, mask_image=np.full((32, 32), 2.0)), r"\[0, 1\]"),
        (dict(image=picture, mask_image=np.zeros((32, 32), np.int64)), "uint8"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(num_images_per_prompt=2, latents=torch.zeros(2, 48, 8, 8)), r"\(4, 48, 8, 8\)"),
        (dict(negative_prompt=["a"]), "one per prompt"),
        (dict(negative_prompt=["a", 3]), "negative_prompt"),
        (dict(callback_on_step_end=3), "callable"),
        (dict(prompt_embeds=torch.zeros(2, 4, 384)), "not both"),
        (dict(prompt=None), "no prompts"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 4, 7)), "7 wide"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 4, 384), prompt_embeds_lens=torch.tensor([4, 5])),
         "prompt_embeds_lens"),
        (dict(prompt=None, prompt_embeds=torch.zeros(4, 384)), r"\[N, T, D\]"),
        (dict(negative_prompt_embeds=torch.zeros(3, 4, 384)), "1 or 2"),
    ]


def test_bad_inputs_are_refused_before_any_work(pipe, picture):
    for case, match in bad_cases(picture):
        kw = {"prompt": ["a red circle", "two blue squares"], **case}
        with pytest.raises(ValueError, match=match):
            pipe(kw.pop("prompt"), enhancer=NoWork(), **kw)
        kw = {"prompt": ["a red circle", "two blue squares"], **case}
        with pytest.raises(ValueError, match=match):
            pipe.check_arguments(kw.pop("prompt"), **kw)


def test_callback_must_return_a_dict_of_matching_latents(pipe):
    with pytest.raises(ValueError, match="shape"):
        pipe("x", callback_on_step_end=lambda p, i, s, x: {"latents": torch.zeros(1)})
    with pytest.raises(TypeError, match="dict"):
        pipe("x", callback_on_step_end=lambda p, i, s, x: x)


# ---- CLI --------------------------------------------------------------------------------------
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_img2img_and_inpaint(tiny_pipeline_dir, pipe, picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "in.png")
    res = run("generate", "a red circle", "-o", tmp_path / "i2i.png", "--model", tiny_pipeline_dir, "--steps", 4,
              "--image", tmp_path / "in.png", "--strength", 0.5, "--seed", 3)
    assert res.exit_code == 0, res.output
    expected = pipe("a red circle", image=picture, strength=0.5, num_inference_steps=4, seed=3).images[0]
    assert Image.open(tmp_path / "i2i.png").tobytes() == expected.tobytes()

    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = run("generate", "a red circle", "-o", tmp_path / "inpaint.png", "--model", tiny_pipeline_dir,
              "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--strength", 1)
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "inpaint.png"))
    assert np.array_equal(out[:, 16:], picture[:, 16:]) and not np.array_equal(out[:, :16], picture[:, :16])


def test_cli_n_per_prompt(tiny_pipeline_dir, pipe, tmp_path):
    res = run("generate", "a red circle", "-o", tmp_path / "one.png", "--model", tiny_pipeline_dir, "--steps", 2,
              "--n-per-prompt", 2, "--seed", 4)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["one_0.png", "one_1.png"]
    expected = pipe("a red circle", num_images_per_prompt=2, num_inference_steps=2, seed=4).images
    assert Image.open(tmp_path / "one_1.png").tobytes() == expected[1].tobytes()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    res = run("generate", "--prompts", prompts, "--out", tmp_path / "out", "--model", tiny_pipeline_dir,
              "--steps", 2, "--n-per-prompt", 3)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == [f"000{i}.png" for i in range(6)] + ["grid.png"]


def test_cli_bad_image_options(tiny_pipeline_dir, picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small_mask.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    base = ("generate", "a red circle", "-o", tmp_path / "x.png", "--model", tiny_pipeline_dir)
    assert_clean_error(run(*base, "--image", tmp_path / "in.png", "--strength", 1.5), "--strength")
    assert_clean_error(run(*base, "--image", tmp_path / "in.png", "--strength", 0), "--strength")
    assert_clean_error(run(*base, "--strength", 0.5), "need --image")
    assert_clean_error(run(*base, "--image", tmp_path / "missing.png"), "--image", "not found")
    assert_clean_error(run(*base, "--image", tmp_path / "junk.png"), "--image", "cannot read")
    assert_clean_error(run(*base, "--image", tmp_path / "in.png", "--mask", tmp_path / "small_mask.png"),
                       "mask is 16x16")
    assert_clean_error(run(*base, "--image", tmp_path / "in.png", "--size", "64x64"), "image is 32x32")
    assert_clean_error(run(*base, "--n-per-prompt", 0), "--n-per-prompt")
    assert not (tmp_path / "x.png").exists()


def test_bundled_model_strength_is_how_far_from_the_image():
    bundled = TextToImagePipeline.from_pretrained()
    h, w = bundled.config.height, bundled.config.width
    y, x = np.mgrid[0:h, 0:w]
    picture = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    target = torch.from_numpy(picture).permute(2, 0, 1).float()[None] / 127.5 - 1
    dist = [float((pt(bundled, "a red circle", image=picture, strength=s, num_inference_steps=8) - target).abs().mean())
            for s in (0.125, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2] and dist[0] < 0.5 * dist[2], dist


# ---- enhancer rewrite check -------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_enhancer():
    from ernielab.enhancer.model import PromptEnhancer

    return PromptEnhancer.from_pretrained()


def test_rewrites_that_fail_the_check_fall_back_to_the_prompt(pipe, shipped_enhancer):
    from ernielab.image.pipeline import EnhancerFallback

    prompts = ["a red thing", "two shapes"]
    rewrites = shipped_enhancer.enhance_many(prompts, seed=7)
    reject_first = lambda prompt, rewrite: ["said no"] if prompt == prompts[0] else []  # noqa: E731
    out = pipe(prompts, num_inference_steps=2, seed=7, enhancer=shipped_enhancer, enhancer_check=reject_first,
               num_images_per_prompt=2, output_type="pt")
    assert out.revised_prompts == [prompts[0]] * 2 + [rewrites[1]] * 2
    assert out.enhancer_fallbacks == [EnhancerFallback(rewrites[0], ["said no"])] * 2 + [None] * 2
    plain = pipe(out.revised_prompts, num_inference_steps=2, seed=7, output_type="pt")
    assert torch.equal(out.images, plain.images)  # image k from the prompt it reports, with seed + k
    unchecked = pipe(prompts, num_inference_steps=2, seed=7, enhancer=shipped_enhancer, enhancer_check=None)
    assert unchecked.revised_prompts == rewrites and unchecked.enhancer_fallbacks == [None, None]
    assert pipe(prompts, num_inference_steps=2).enhancer_fallbacks == []


def test_default_check_is_the_enhancers_own(pipe, shipped_enhancer):
    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.image.pipeline import resolve_enhancer_check
    from ernielab.image.release import ReleasePromptEnhancer
    from ernielab.worlds.prompt_facts import contradictions

    checked = PromptEnhancer(shipped_enhancer.model, shipped_enhancer.tokenizer,
                             shipped_enhancer.config.replace(rewrite_check="shapes_facts"))
    assert resolve_enhancer_check(checked, "auto") is contradictions
    unchecked = PromptEnhancer(shipped_enhancer.model, shipped_enhancer.tokenizer,
                               shipped_enhancer.config.replace(rewrite_check="none"))
    assert resolve_enhancer_check(unchecked, "auto") is None
    release = ReleasePromptEnhancer(shipped_enhancer.model, shipped_enhancer.tokenizer)
    assert resolve_enhancer_check(release, "auto") is None  # a release's pe/ is unchanged: no default check
    assert resolve_enhancer_check(release, contradictions) is contradictions
    with pytest.raises(ValueError, match="enhancer_check"):
        pipe("a red circle", enhancer=NoWork(), enhancer_check="strict")


def test_bundled_enhancer_never_draws_a_contradicting_rewrite(pipe, shipped_enhancer):
    """With the default check every image is drawn from text that keeps the prompt's facts, whatever the
    enhancer wrote; prompts in wordings it never saw (the issue's examples) are where it matters."""
    from ernielab.worlds.prompt_facts import contradictions

    prompts = ["one red triangle", "1 cyan square", "i see a pair of blue circles", "a red thing"]
    out = pipe(prompts, num_inference_steps=2, seed=0, enhancer=shipped_enhancer)
    rewrites = shipped_enhancer.enhance_many(prompts, seed=0)
    for prompt, used, rewrite, fallback in zip(prompts, out.revised_prompts, rewrites, out.enhancer_fallbacks):
        assert contradictions(prompt, used) == []
        assert (used, fallback is None) == ((rewrite, True) if not contradictions(prompt, rewrite) else (prompt, False))
        if fallback is not None:
            assert fallback.rewrite == rewrite and fallback.reasons == contradictions(prompt, rewrite)
