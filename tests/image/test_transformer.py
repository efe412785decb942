"""The ERNIE-Image transformer equals diffusers' ErnieImageTransformer2DModel on random tiny configs."""
import json

import pytest
import torch
from diffusers import ErnieImageTransformer2DModel

from ernielab.image.config import ErnieImageConfig
from ernielab.image.transformer import ErnieImageTransformer

CONFIGS = [
    dict(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=96, in_channels=8, out_channels=8,
         patch_size=1, text_in_dim=24, rope_axes_dim=(4, 6, 6)),
    dict(hidden_size=48, num_attention_heads=2, num_layers=3, ffn_hidden_size=80, in_channels=6, out_channels=4,
         patch_size=2, text_in_dim=48, rope_axes_dim=(8, 8, 8)),  # text_in_dim == hidden: no text projection
    dict(hidden_size=96, num_attention_heads=3, num_layers=1, ffn_hidden_size=64, in_channels=16, out_channels=16,
         patch_size=1, text_in_dim=40, rope_axes_dim=(8, 12, 10), rope_theta=10000),  # partial rotary dims
]


def random_reference(kwargs, seed):
    torch.manual_seed(seed)
    ref = ErnieImageTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-zero everywhere (the default zero-inits would hide bugs)
            p.normal_(0, 0.15)
    return ref


@pytest.mark.parametrize("idx", range(len(CONFIGS)))
@pytest.mark.parametrize("padded", [False, True])
def test_matches_diffusers(idx, padded):
    kwargs = CONFIGS[idx]
    ref = random_reference(kwargs, seed=idx)
    ours = ErnieImageTransformer.from_diffusers(ref).eval()
    g = torch.Generator().manual_seed(100 + idx)
    B, T, p = 3, 7, kwargs["patch_size"]
    x = torch.randn(B, kwargs["in_channels"], 4 * p, 3 * p, generator=g)
    t = torch.tensor([1.0, 437.5, 999.0])
    text = torch.randn(B, T, kwargs["text_in_dim"], generator=g)
    lens = torch.tensor([7, 3, 1]) if padded else torch.full((B,), T)
    with torch.no_grad():
        expected = ref(x, t, text, lens, return_dict=False)[0]
        got = ours(x, t, text, lens)
    assert got.shape == expected.shape == (B, kwargs["out_channels"], 4 * p, 3 * p)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padding_is_invisible():
    """A prompt padded with garbage to a longer batch gives the same output as alone, unpadded."""
    ours = ErnieImageTransformer.from_diffusers(random_reference(CONFIGS[0], seed=5)).eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 8, 4, 4, generator=g), torch.randn(1, 3, 24, generator=g)
    padded = torch.cat([text, 100 * torch.randn(1, 5, 24, generator=g)], dim=1)
    with torch.no_grad():
        alone = ours(x, torch.tensor([300.0]), text)
        in_batch = ours(x, torch.tensor([300.0]), padded, torch.tensor([3]))
    torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_diffusers_folder(tmp_path):
    ref = random_reference(CONFIGS[1], seed=3)
    ref.save_pretrained(tmp_path / "diffusers_model")
    ours = ErnieImageTransformer.from_pretrained(tmp_path / "diffusers_model")  # a diffusers folder, as is
    assert set(ours.to_diffusers_state_dict()) == set(ref.state_dict())
    ref2 = ErnieImageTransformer2DModel(**ours.config.to_diffusers())
    ref2.load_state_dict(ours.to_diffusers_state_dict())  # and back into diffusers, strict
    ours.save_pretrained(tmp_path / "ours")
    again = ErnieImageTransformer.from_pretrained(tmp_path / "ours")
    x, text = torch.randn(2, 6, 4, 4), torch.randn(2, 5, 48)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, text), ref2(x, t, text, torch.tensor([5, 5]), return_dict=False)[0],
                                   rtol=1e-5, atol=1e-5)


def test_release_config_size():
    cfg = ErnieImageConfig.release()
    with torch.device("meta"):
        n = ErnieImageTransformer(cfg).num_parameters()
        n_ref = sum(p.numel() for p in ErnieImageTransformer2DModel(**cfg.to_diffusers()).parameters())
    assert n == n_ref
    assert 7.5e9 < n < 8.5e9  # the "8B" release


def test_config_json_round_trip(tmp_path):
    cfg = ErnieImageConfig.tiny()
    cfg.save(tmp_path / "c.json")
    assert ErnieImageConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        ErnieImageConfig.from_dict({**cfg.to_dict(), "hidden": 3})


def test_bad_inputs_and_checkpoints(tmp_path):
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=8, text_in_dim=24))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 7, 4, 4), torch.tensor([1.0]), torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match="text must be"):
        model(torch.randn(1, 8, 4, 4), torch.tensor([1.0]), torch.randn(1, 2, 23))
    with pytest.raises(FileNotFoundError):
        ErnieImageTransformer.from_pretrained(tmp_path / "nothing")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        ErnieImageTransformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "ffn_hidden_size": 64}))
    with pytest.raises(ValueError, match="shape mismatch"):
        ErnieImageTransformer.from_pretrained(tmp_path / "m")
