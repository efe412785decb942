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


def build_tiny_release(path, seed: int = 0, with_pe: bool = True):
    """A tiny ERNIE-Image release folder in diffusers' layout, built offline from the real diffusers / transformers
    classes with random tiny configs and a word-level tokenizer with a chat template (save_pretrained of each)."""
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (Ministral3Config, Ministral3ForCausalLM, Mistral3Config, Mistral3Model,
                              PreTrainedTokenizerFast)

    words = ["<unk>", "<s>", "</s>", "<pad>", *'[]/{}":,.', "INST", "prompt", "width", "height", "a",
             "red", "green", "blue", "circle", "square", "triangle", "left", "of", "above", "the", "two", "three",
             "big", "small", "and", "with", *map(str, range(130))]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}

    def tokenizer(max_len):
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        tk.decoder = decoders.WordPiece()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", model_max_length=max_len)
        tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
        return tok

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=len(vocab), max_position_embeddings=512,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                 "original_max_position_embeddings": 512, "max_position_embeddings": 512,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                 "llama_4_scaling_beta": 0.1})
    torch.manual_seed(seed)
    text_encoder = Mistral3Model(Mistral3Config(
        text_config={"model_type": "ministral3", **text},
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=28, patch_size=14)))
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)
    with torch.no_grad():  # non-trivial latent statistics
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = ErnieImageTransformer2DModel(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=48,
                                               in_channels=16, out_channels=16, patch_size=1, text_in_dim=32,
                                               rope_axes_dim=(4, 6, 6))
    with torch.no_grad():  # non-zero everywhere (the zero-inits would hide bugs)
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    parts = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(512),
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    if with_pe:
        parts.update(pe=Ministral3ForCausalLM(Ministral3Config(**text)).eval(), pe_tokenizer=tokenizer(12))
    ErnieImagePipeline(**parts).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_release_dir(tmp_path_factory):
    """A tiny ERNIE-Image release folder (diffusers layout, with a prompt enhancer), built offline."""
    return build_tiny_release(tmp_path_factory.mktemp("release"))
