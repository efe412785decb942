import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def text_encoder():
    from ernielab.image.text_encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, text_encoder):
    """A randomly initialised tiny pixel-space pipeline saved to disk (fast to load and sample)."""
    from ernielab.image.config import ErnieImageConfig
    from ernielab.image.latents import LatentSpaceConfig, build_latent_space
    from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline
    from ernielab.image.transformer import ErnieImageTransformer

    torch.manual_seed(0)
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=48, text_in_dim=text_encoder.dim))
    for p in model.parameters():  # zero-init output would make every image identical; randomise
        torch.nn.init.normal_(p, std=0.05)
    latent = LatentSpaceConfig(kind="pixel", patch_size=4)
    cfg = PipelineConfig(text_encoder=text_encoder.config, latent=latent, steps=4, guidance_scale=2.0, shift=1.0)
    path = tmp_path_factory.mktemp("pipe")
    TextToImagePipeline(model, text_encoder, build_latent_space(latent), cfg).save_pretrained(path)
    return path
