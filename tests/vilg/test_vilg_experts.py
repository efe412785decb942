import json

import pytest
import torch

from ernielab.image.config import ErnieImageConfig
from ernielab.image.registry import load_transformer
from ernielab.image.samplers import sigma_schedule
from ernielab.image.transformer import ErnieImageTransformer
from ernielab.vilg.experts import MixtureOfDenoisingExperts, expert_index, expert_of_timestep, uniform_boundaries


def random_model(seed=0, **changes) -> ErnieImageTransformer:
    torch.manual_seed(seed)
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=12, text_in_dim=16).replace(**changes))
    for p in model.parameters():  # zero-init output would hide differences between experts
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def inputs(timesteps):
    g = torch.Generator().manual_seed(1)
    B = len(timesteps)
    x = torch.randn(B, 12, 4, 4, generator=g)
    text = torch.randn(B, 5, 16, generator=g)
    lens = torch.randint(1, 6, (B,), generator=g)
    return x, torch.tensor(timesteps, dtype=torch.float32), text, lens


def test_uniform_routing_is_floor_sigma_n():
    sigma = torch.cat([torch.rand(20_000, dtype=torch.float64), torch.linspace(0, 1, 1001, dtype=torch.float64)])
    for n in (1, 2, 4, 10):
        want = torch.clamp(torch.floor(sigma * n), max=n - 1).long()
        assert torch.equal(expert_index(sigma, uniform_boundaries(n)), want)
    # the paper's rule for 10 experts over 1000 steps: t // 100
    t = torch.arange(0, 1000)
    assert torch.equal(expert_of_timestep(t.float(), uniform_boundaries(10)), t // 100)
    assert expert_of_timestep(torch.tensor([1000.0]), uniform_boundaries(10)).item() == 9


def test_custom_boundaries_and_bad_ones():
    b = (0.0, 0.2, 0.7, 1.0)
    got = expert_index(torch.tensor([0.0, 0.1999, 0.2, 0.6999, 0.7, 1.0], dtype=torch.float64), b)
    assert got.tolist() == [0, 0, 1, 1, 2, 2]
    for bad in [(0.0, 0.5), (0.1, 1.0), (0.0, 0.6, 0.4, 1.0), (0.0, 0.5, 0.5, 1.0)]:
        with pytest.raises(ValueError, match="boundaries"):
            expert_index(torch.tensor([0.3]), bad)


def test_each_sample_runs_its_owning_expert_only():
    mode = MixtureOfDenoisingExperts([random_model(i) for i in range(4)])
    seen = {i: [] for i in range(4)}
    for i, e in enumerate(mode.experts):
        e.register_forward_hook(lambda m, args, out, i=i: seen[i].append(args[1].clone()))
    ts = [10.0, 900.0, 260.0, 499.0, 500.0, 999.0, 30.0]
    x, t, text, lens = inputs(ts)
    out = mode(x, t, text, lens)
    assert [len(v) for v in seen.values()] == [1, 1, 1, 1]  # each expert ran once, on its own samples only
    assert sorted(seen[0][0].tolist()) == [10.0, 30.0] and seen[1][0].tolist() == [260.0, 499.0]
    assert seen[2][0].tolist() == [500.0] and sorted(seen[3][0].tolist()) == [900.0, 999.0]
    for j, tj in enumerate(ts):  # and the output row is that expert's output
        k = min(3, int(tj / 1000 * 4))
        ref = mode.experts[k](x[j : j + 1], t[j : j + 1], text[j : j + 1], lens[j : j + 1])
        torch.testing.assert_close(out[j : j + 1], ref, rtol=1e-5, atol=1e-5)
    # a batch at one noise level (sampling) runs exactly one expert
    for v in seen.values():
        v.clear()
    mode(x, torch.full((7,), 700.0), text, lens)
    assert [len(v) for v in seen.values()] == [0, 0, 1, 0]


def test_identical_experts_equal_the_single_model():
    single = random_model(3)
    mode = MixtureOfDenoisingExperts.from_single(single, 4)
    x, t, text, lens = inputs([5.0, 333.0, 600.0, 999.0, 120.0, 880.0])
    bias = torch.randn(6, 1, 16 + 5, 16 + 5) * 0.1  # per-sample attention bias follows its sample
    torch.testing.assert_close(mode(x, t, text, lens, bias), single(x, t, text, lens, bias), rtol=1e-5, atol=1e-5)
    assert mode.num_parameters() == 4 * single.num_parameters()
    assert mode.num_active_parameters() == single.num_parameters()


def test_heterogeneous_experts_round_trip(tmp_path):
    layout = random_model(1, num_layers=1)  # high noise: small layout expert
    detail = random_model(2, num_layers=3)  # low noise: larger detail expert
    mode = MixtureOfDenoisingExperts([detail, layout], boundaries=(0.0, 0.6, 1.0))
    x, t, text, lens = inputs([100.0, 599.0, 600.0, 950.0])
    out = mode(x, t, text, lens)
    torch.testing.assert_close(out[:2], detail(x[:2], t[:2], text[:2], lens[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:], layout(x[2:], t[2:], text[2:], lens[2:]), rtol=1e-5, atol=1e-5)
    mode.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_transformer(tmp_path / "m")  # the registry finds the MoDE loader
    assert isinstance(loaded, MixtureOfDenoisingExperts) and loaded.boundaries == (0.0, 0.6, 1.0)
    assert [e.config.num_layers for e in loaded.experts] == [3, 1]
    torch.testing.assert_close(loaded(x, t, text, lens), out, rtol=0, atol=0)


def test_bad_checkpoints_are_reported(tmp_path):
    mode = MixtureOfDenoisingExperts.from_single(random_model(), 2)
    mode.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["experts"][1]["config"]["num_layers"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit"):
        MixtureOfDenoisingExperts.from_pretrained(tmp_path / "m")
    cfg["experts"][1]["class"] = "os:system"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="refusing"):
        MixtureOfDenoisingExperts.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="expert 1 vs. expert 0: in_channels"):
        MixtureOfDenoisingExperts([random_model(), random_model(in_channels=8, out_channels=8)])
    with pytest.raises(FileNotFoundError, match="mixture"):
        MixtureOfDenoisingExperts.from_pretrained(tmp_path)


def test_pipeline_cfg_and_eval_unchanged(tmp_path, text_encoder, tiny_pipeline_dir):
    from ernielab.image.evaluate import evaluate
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.worlds.registry import DataConfig

    plain = TextToImagePipeline.from_pretrained(tiny_pipeline_dir, text_encoder=text_encoder)
    experts = [plain.transformer] + [random_model(i, in_channels=48, out_channels=48, text_in_dim=384)
                                     for i in range(1, 4)]
    mode = MixtureOfDenoisingExperts(experts)
    TextToImagePipeline(mode, text_encoder, plain.latent_space, plain.config).save_pretrained(tmp_path / "p")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "p", text_encoder=text_encoder)
    assert isinstance(pipe.transformer, MixtureOfDenoisingExperts)
    calls = [0] * 4
    for i, e in enumerate(pipe.transformer.experts):
        e.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    prompts = ["a red circle", "two blue squares"]
    images = pipe(prompts, num_inference_steps=8, guidance_scale=3.0, seed=3, output_type="pt").images
    # one CFG-batched forward per step, run by the one expert owning that step's sigma
    sigmas = sigma_schedule(8, pipe.config.shift)[:-1]
    assert calls == torch.bincount(expert_index(sigmas, mode.boundaries), minlength=4).tolist()
    assert sum(calls) == 8
    again = TextToImagePipeline(mode, text_encoder, plain.latent_space, plain.config)(
        prompts, num_inference_steps=8, guidance_scale=3.0, seed=3, output_type="pt").images
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    report = evaluate(pipe, DataConfig(kind="shapes", size=100), n_fid=0, n_align=2, steps=2, progress=False)
    assert set(report["alignment"]) == {"single", "count", "relation"}
