"""The ERNIE-Image release in diffusers' layout: ernielab loads it, draws the same images as diffusers'
ErnieImagePipeline, saves it back, and round-trips the transformer through a single file."""
import json
import shutil

import numpy as np
import pytest
import torch

from ernielab.image.pipeline import TextToImagePipeline

PROMPTS = ["a red circle", "two big blue squares above the green triangle", ""]
LONG = " ".join(["a big red circle left of the small green square and"] * 12)  # ~130 tokens, no cut


@pytest.fixture(scope="module")
def ours(tiny_release_dir):
    return TextToImagePipeline.from_pretrained(tiny_release_dir)


@pytest.fixture(scope="module")
def reference(tiny_release_dir):
    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(tiny_release_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(n, seed=0, shape=(16, 16, 16)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def ours_images(pipe, prompts, latents, **kw):
    out = pipe(prompts, latents=latents, height=64, width=64, output_type="pt", **kw)
    return (out.images / 2 + 0.5).permute(0, 2, 3, 1).numpy()


def reference_images(ref, prompts, latents, **kw):
    return ref(prompts, latents=latents.clone(), height=64, width=64, output_type="np", use_pe=False, **kw).images


def test_loads_every_component(ours, tiny_release_dir):
    cfg = json.loads((tiny_release_dir / "scheduler" / "scheduler_config.json").read_text())
    assert ours.config.shift == cfg["shift"] == 3.0
    assert ours.text_encoder.dim == 32 and ours.text_encoder.config.max_length is None
    assert ours.text_encoder.config.hidden_layer == -2
    assert ours.latent_space.channels == 16 and ours.latent_space.downsample == 4  # 2 VAE blocks (2x) x 2x2 patchify
    bn = ours.release.vae.bn
    torch.testing.assert_close(ours.latent_space.std.flatten(), torch.sqrt(bn.running_var + 1e-5))
    assert ours.prompt_enhancer is not None


def test_text_features_match_diffusers(ours, reference):
    for prompt in [*PROMPTS, LONG]:
        expected = reference.encode_prompt(prompt, torch.device("cpu"))[0]
        got = ours.text_encoder([prompt])[0][0]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert ours.text_encoder([LONG])[0].shape[1] > 64  # the whole prompt, no 64-token cut


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_images_match_diffusers(ours, reference, guidance):
    """A padded batch of prompts of different lengths (and an empty one), with and without CFG."""
    latents = noise(len(PROMPTS))
    kw = dict(num_inference_steps=4, guidance_scale=guidance)
    got, expected = ours_images(ours, PROMPTS, latents, **kw), reference_images(reference, PROMPTS, latents, **kw)
    diff = float(np.abs(got - expected).max())
    print(f"max abs image diff (guidance {guidance}): {diff:.2e}")
    assert diff <= 1e-5
    got_lat = ours(PROMPTS, latents=latents, height=64, width=64, output_type="latent", **kw).images
    exp_lat = reference(PROMPTS, latents=latents.clone(), height=64, width=64, output_type="latent", use_pe=False,
                        **kw).images
    assert float((got_lat - exp_lat).abs().max()) <= 1e-5


def test_long_prompt_matches_diffusers(ours, reference):
    latents = noise(2, seed=1)
    prompts = [LONG, "a circle"]
    kw = dict(num_inference_steps=3, guidance_scale=4.0, negative_prompt="small")
    diff = float(np.abs(ours_images(ours, prompts, latents, **kw) - reference_images(reference, prompts, latents, **kw)).max())
    print(f"max abs image diff (long prompt): {diff:.2e}")
    assert diff <= 1e-5


def test_pipe_to_moves_every_component(ours):
    ours.to("cpu")
    assert ours.text_encoder.model.device.type == "cpu"
    assert ours.prompt_enhancer.model.device.type == "cpu"


def test_enhancer_formats_as_diffusers(ours, reference):
    """Token ids the same as diffusers builds: JSON user message, chat template, no generation prompt, BOS."""
    pe = ours.prompt_enhancer
    captured = {}
    real_generate = reference.pe.generate

    def spy(**kwargs):
        captured["ids"] = kwargs["input_ids"].clone()
        return real_generate(**kwargs)

    reference.pe.generate = spy
    try:
        expected = reference._enhance_prompt_with_pe("a red circle", torch.device("cpu"), width=96, height=64,
                                                     temperature=1.0, top_p=1.0)  # greedy
    finally:
        del reference.pe.generate
    ids = pe.input_ids("a red circle", width=96, height=64)
    assert ids.tolist() == captured["ids"].tolist()
    assert ids[0, 0].item() == pe.tokenizer.bos_token_id
    # the enhancer family's PromptEnhancer, with the release's formatting, builds the same ids
    from ernielab.enhancer.model import EnhancerConfig, PromptEnhancer

    family = PromptEnhancer(pe.model, pe.tokenizer, EnhancerConfig.release())
    assert family.build_inputs("a red circle", 96, 64)["input_ids"].tolist() == captured["ids"].tolist()
    assert pe.messages("a red circle", 96, 64) == [
        {"role": "user", "content": '{"prompt": "a red circle", "width": 96, "height": 64}'}]
    greedy = type(pe)(pe.model, pe.tokenizer, temperature=1.0, top_p=1.0)
    assert greedy.enhance("a red circle", width=96, height=64) == expected


def test_enhancer_sampling_and_pipeline_match_diffusers(ours, reference):
    """Default sampling (0.6 / 0.95) with the same seed gives diffusers' rewrite; the pipeline draws from it."""
    torch.manual_seed(7)
    latents = noise(1, seed=3)
    expected = reference(["a red circle"], latents=latents.clone(), height=64, width=64, num_inference_steps=2,
                         output_type="np")
    pe = ours.prompt_enhancer
    assert pe.enhance_many(["a red circle"], width=64, height=64, seed=7) == expected.revised_prompts
    out = ours("a red circle", latents=latents, height=64, width=64, num_inference_steps=2, output_type="pt",
               enhancer=pe, seed=7)
    assert out.revised_prompts == expected.revised_prompts
    got = (out.images / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert float(np.abs(got - expected.images).max()) <= 1e-5


def test_save_back_loads_in_diffusers(ours, reference, tmp_path):
    from diffusers import ErnieImagePipeline

    ours.save_pretrained(tmp_path / "saved")
    again = ErnieImagePipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    latents = noise(len(PROMPTS), seed=2)
    kw = dict(num_inference_steps=3, guidance_scale=4.0)
    expected = reference_images(reference, PROMPTS, latents, **kw)
    assert float(np.abs(reference_images(again, PROMPTS, latents, **kw) - expected).max()) <= 1e-6
    ours_again = TextToImagePipeline.from_pretrained(tmp_path / "saved")  # and back into ernielab
    assert float(np.abs(ours_images(ours_again, PROMPTS, latents, **kw) - expected).max()) <= 1e-5
    assert ours_again.prompt_enhancer is not None


def test_single_file_round_trip(ours, tmp_path):
    from diffusers import ErnieImageTransformer2DModel
    from safetensors.torch import load_file

    from ernielab.image.release import COMFY_PREFIX, load_single_file, save_single_file

    file = tmp_path / "ernie_image.safetensors"
    save_single_file(ours.transformer, file)
    keys = list(load_file(str(file)))
    assert keys and all(k.startswith(COMFY_PREFIX) for k in keys)
    again = load_single_file(file)
    x, t, text = torch.randn(2, 16, 4, 4), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32)
    lens = torch.tensor([5, 2])
    with torch.no_grad():
        expected = ours.transformer(x, t, text, lens)
        torch.testing.assert_close(again(x, t, text, lens), expected, rtol=0, atol=0)
    # no prefix, no metadata, config given; and the keys load strictly into diffusers' class
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({k[len(COMFY_PREFIX):]: v for k, v in load_file(str(file)).items()}, str(plain))
    cfg = ours.transformer.config.to_diffusers()
    torch.testing.assert_close(load_single_file(plain, config=cfg)(x, t, text, lens), expected, rtol=0, atol=0)
    ref = ErnieImageTransformer2DModel(**cfg)
    ref.load_state_dict({k[len(COMFY_PREFIX):]: v for k, v in load_file(str(file)).items()})
    with torch.no_grad():
        torch.testing.assert_close(ref(x, t, text, lens, return_dict=False)[0], expected, rtol=1e-5, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------
def copy_release(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_component(tiny_release_dir, tmp_path):
    folder = copy_release(tiny_release_dir, tmp_path / "r")
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match="'vae'.*missing"):
        TextToImagePipeline.from_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["vae"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no 'vae' component"):
        TextToImagePipeline.from_pretrained(folder)


def test_wrong_component_class(tiny_release_dir, tmp_path):
    folder = copy_release(tiny_release_dir, tmp_path / "r")
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'vae' is a AutoencoderKL.*AutoencoderKLFlux2"):
        TextToImagePipeline.from_pretrained(folder)
    folder = copy_release(tiny_release_dir, tmp_path / "r2")
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg["_class_name"] = "FluxTransformer2DModel"
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FluxTransformer2DModel.*ErnieImageTransformer2DModel"):
        TextToImagePipeline.from_pretrained(folder)


def test_dynamic_shift_scheduler_refused(tiny_release_dir, tmp_path):
    folder = copy_release(tiny_release_dir, tmp_path / "r")
    file = folder / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        TextToImagePipeline.from_pretrained(folder)


def test_uncached_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="baidu/not-cached-here.*HF_HUB_OFFLINE"):
        TextToImagePipeline.from_pretrained("baidu/not-cached-here")


def test_describe_release_folder(tiny_release_dir):
    from ernielab.image.pipeline import describe

    info = describe(tiny_release_dir)
    assert info["transformer"]["_class_name"] == "ErnieImageTransformer2DModel"
    assert info["pipeline"]["vae"] == ["diffusers", "AutoencoderKLFlux2"]


def test_bf16_close_to_diffusers(tiny_release_dir):
    """bf16 is not bit-matched (the transformer's ops round differently), but timesteps are rounded to the
    transformer's dtype and Euler updates computed in float32 as in diffusers: within about one bf16 step."""
    from diffusers import ErnieImagePipeline

    ours = TextToImagePipeline.from_pretrained(tiny_release_dir, dtype=torch.bfloat16)
    ref = ErnieImagePipeline.from_pretrained(tiny_release_dir, dtype=torch.bfloat16)
    ref.set_progress_bar_config(disable=True)
    latents = noise(len(PROMPTS)).to(torch.bfloat16)
    kw = dict(height=64, width=64, output_type="latent", num_inference_steps=4, guidance_scale=4.0)
    got = ours(PROMPTS, latents=latents, **kw).images
    expected = ref(PROMPTS, latents=latents.clone(), use_pe=False, **kw).images.float()
    diff = (got - expected).abs()
    print(f"bf16 latents: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}, max |latent| {expected.abs().max():.3g}")
    assert diff.max() <= 0.0625 and diff.mean() <= 5e-3


def test_wrong_text_encoder_type(tiny_release_dir, tmp_path):
    folder = copy_release(tiny_release_dir, tmp_path / "r")
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'bert' model.*Mistral3Model"):
        TextToImagePipeline.from_pretrained(folder)


def test_cached_hub_id_offline(tiny_release_dir, monkeypatch, tmp_path):
    """A hub id found in the local cache loads offline (snapshot_download's cache layout, built by hand)."""
    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-ernie-image"
    shutil.copytree(tiny_release_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    pipe = TextToImagePipeline.from_pretrained("someone/tiny-ernie-image")
    assert pipe.release is not None and pipe.config.shift == 3.0


def test_single_file_misfit_is_one_error(ours, tmp_path):
    from safetensors.torch import load_file, save_file

    from ernielab.image.release import load_single_file, save_single_file

    file = tmp_path / "t.safetensors"
    save_single_file(ours.transformer, file, prefix="")
    state = load_file(str(file))
    state.pop("final_linear.bias")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="missing 1 keys.*final_linear.bias|missing 1 keys.*proj_out.bias"):
        load_single_file(tmp_path / "cut.safetensors", config=ours.transformer.config.to_diffusers())
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_single_file(tmp_path / "nope.safetensors")
