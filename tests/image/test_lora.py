"""LoRA for ERNIE-Image (src/ernielab/image/lora.py, docs/lora.md): training through the engine, diffusers' and
ComfyUI's formats, ai-toolkit / OneTrainer / peft layouts, several adapters, fuse / unfuse, bad files refused."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.image import lora
from ernielab.image.config import ErnieImageConfig
from ernielab.image.train import TrainConfig, Trainer, export_checkpoint
from ernielab.image.transformer import ErnieImageTransformer

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "image" / "lora_tiny.json"


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=16, text_in_dim=32).replace(**kw))
    with torch.no_grad():
        for p in model.parameters():  # the zero-inits (adaLN, output) would hide every block
            p.normal_(0, 0.1)
    return model.eval()


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 4, 4, generator=g)
    text = torch.randn(2, 5, cfg.text_in_dim, generator=g)
    return x, torch.tensor([300.0, 800.0]), text, torch.tensor([5, 3])


def randomize(model, adapter="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora._lora_layers(model).values():
            if adapter in layer.lora_A:
                for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                    part.weight.copy_(torch.randn(part.weight.shape, generator=g) * 0.2)


def random_adapter(tmp_path, name="a.safetensors", rank=4, alpha=8.0, targets="all", seed=1, fmt="diffusers"):
    """A LoRA file for tiny_model() with random A and B (B != 0), and its effective per-module updates."""
    model = tiny_model()
    lora.add_lora(model, rank, alpha, targets=targets)
    randomize(model, seed=seed)
    return lora.save_lora(model, tmp_path / name, format=fmt), lora.effective_deltas(model)


def assert_same_deltas(got, expected, atol=1e-6):
    assert sorted(got) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=atol)


# ---- (1) training through the engine -------------------------------------------------------------
def lora_config(out, base, **kw) -> TrainConfig:
    cfg = TrainConfig.load(CONFIG)
    return cfg.replace(output_dir=str(out), init_from=str(base), batch_size=2, save_every=1, log_every=1,
                       **{"steps": 2, **kw})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A randomised base transformer of lora_tiny.json's shape (non-zero gates, so the blocks' adapters learn)."""
    cfg = TrainConfig.load(CONFIG)
    torch.manual_seed(0)
    model = ErnieImageTransformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path


def test_train_lora_through_the_engine(tmp_path, base_dir):
    straight = Trainer(lora_config(tmp_path / "straight", base_dir)).train()
    Trainer(lora_config(tmp_path / "split", base_dir, steps=1)).train()
    Trainer(lora_config(tmp_path / "split", base_dir)).train()  # resumes from step 1
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "split") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact

    base = load_file(str(base_dir / "model.safetensors"))
    adapter = {k: v for k, v in a.items() if ".lora_" in k}
    assert adapter and all(k.endswith(".default.weight") for k in adapter)
    for k, v in a.items():  # the base is frozen: bit-identical to the weights it started from
        if ".lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert all(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it trained
    n_lora = len([k for k in adapter if ".lora_A." in k])
    assert n_lora == 2 * 7  # "all": q, k, v, out, gate, up, down in each of 2 blocks

    # it exports the adapter (diffusers' and ComfyUI's format), not the model
    out = Path(straight["exported"])
    assert out == tmp_path / "straight" / "lora" and not (tmp_path / "straight" / "pipeline").exists()
    files = sorted(p.name for p in out.iterdir())
    assert files == [lora.COMFYUI_WEIGHT_NAME, lora.WEIGHT_NAME]
    exported, metadata = lora.read_lora_file(out / lora.WEIGHT_NAME)
    assert len(exported) == 2 * n_lora and all(k.startswith("transformer.layers.") for k in exported)
    assert "transformer.layers.0.self_attention.to_out.0.lora_A.weight" in exported
    assert "transformer.layers.1.mlp.linear_fc2.lora_B.weight" in exported
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 4.0

    # the exported adapter on the base gives what the trained model gives
    cfg = lora_config(tmp_path / "straight", base_dir)
    trained = ErnieImageTransformer(cfg.model)
    lora.add_lora(trained, cfg.lora)
    trained.load_state_dict(a)
    loaded = ErnieImageTransformer.from_pretrained(base_dir)
    lora.load_lora(loaded, out / lora.WEIGHT_NAME)
    comfy = ErnieImageTransformer.from_pretrained(base_dir)
    lora.load_lora(comfy, out / lora.COMFYUI_WEIGHT_NAME)
    x = torch.randn(2, 48, 8, 8)
    args = (x, torch.tensor([100.0, 900.0]), torch.randn(2, 6, 384))
    with torch.no_grad():
        expected = trained.eval()(*args)
        torch.testing.assert_close(loaded.eval()(*args), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(comfy.eval()(*args), expected, rtol=0, atol=1e-6)

    # `ernielab image export` of a LoRA run: a plain pipeline with the adapter fused in
    export_checkpoint(tmp_path / "straight", tmp_path / "fused", use_ema=False)
    fused = ErnieImageTransformer.from_pretrained(tmp_path / "fused" / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(fused(*args), expected, rtol=0, atol=1e-5)


def test_lora_section_checked(tmp_path):
    with pytest.raises(ValueError, match="lora.targets"):
        TrainConfig.from_dict({"lora": {"rank": 4, "targets": "heads"}})
    with pytest.raises(ValueError, match="lora.rank"):
        TrainConfig.from_dict({"lora": {"rank": -1}})
    assert not TrainConfig().lora.enabled  # off by default: full fine-tuning as before


def test_targets():
    model = tiny_model()
    assert lora.target_modules(model, "attention") == [f"layers.{i}.attn.{p}" for i in range(2)
                                                       for p in ("to_k", "to_out", "to_q", "to_v")]
    assert lora.target_modules(model, "mlp") == [f"layers.{i}.mlp.{p}" for i in range(2)
                                                 for p in ("down_proj", "gate_proj", "up_proj")]
    # patterns: a suffix, a regex, or diffusers' names
    assert lora.target_modules(model, ["to_q"]) == ["layers.0.attn.to_q", "layers.1.attn.to_q"]
    assert lora.target_modules(model, [r"layers\.1\.mlp\..*"]) == [f"layers.1.mlp.{p}" for p in
                                                                   ("down_proj", "gate_proj", "up_proj")]
    assert lora.target_modules(model, ["self_attention.to_out.0"]) == ["layers.0.attn.to_out", "layers.1.attn.to_out"]
    with pytest.raises(ValueError, match="'to_nothing' matches no Linear layer"):
        lora.target_modules(model, ["to_nothing"])
    names = lora.add_lora(model, 2, targets="attention")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * len(names)


# ---- (2) diffusers loads our file and draws the same images as ernielab --------------------------
def test_diffusers_load_lora_weights_matches_ernielab(tiny_release_dir, tmp_path):
    from diffusers import ErnieImagePipeline

    from ernielab.image.pipeline import TextToImagePipeline

    ours = TextToImagePipeline.from_pretrained(tiny_release_dir)
    base = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    lora.add_lora(ours, 4, alpha=8, targets="all")
    randomize(ours.transformer, seed=3)
    file = lora.save_lora(ours, tmp_path / "lora")
    assert file.name == lora.WEIGHT_NAME
    lora.unload_lora(ours)
    assert all(torch.equal(v, base[k]) for k, v in ours.transformer.state_dict().items())

    ours = TextToImagePipeline.from_pretrained(tiny_release_dir)  # as a user would: a fresh pipeline + the file
    lora.load_lora(ours, file)
    ref = ErnieImagePipeline.from_pretrained(tiny_release_dir)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(file))
    assert ref.transformer.peft_config["default_0"].lora_alpha == 8  # diffusers read our metadata (alpha != rank)
    prompts = ["a red circle", "two big blue squares above the green triangle"]
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0)
    got = (ours(prompts, latents=latents, output_type="pt", **kw).images / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    expected = ref(prompts, latents=latents.clone(), output_type="np", use_pe=False, **kw).images
    plain = ErnieImagePipeline.from_pretrained(tiny_release_dir)
    plain.set_progress_bar_config(disable=True)
    without = plain(prompts, latents=latents.clone(), output_type="np", use_pe=False, **kw).images
    diff = float(np.abs(got - expected).max())
    print(f"max abs image diff, ernielab vs diffusers with the LoRA: {diff:.2e}; "
          f"LoRA effect {float(np.abs(expected - without).max()):.2e}")
    assert float(np.abs(expected - without).max()) > 1e-3  # the LoRA does change the images
    assert diff <= 1e-5
    # diffusers' fuse / unfuse agree with ours
    ref.fuse_lora()
    lora.fuse_lora(ours)
    got_fused = (ours(prompts, latents=latents, output_type="pt", **kw).images / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert float(np.abs(got_fused - ref(prompts, latents=latents.clone(), output_type="np", use_pe=False,
                                       **kw).images).max()) <= 1e-5


# ---- (3) ComfyUI round trip ----------------------------------------------------------------------
def test_comfyui_round_trip(tmp_path):
    file, deltas = random_adapter(tmp_path, "c.safetensors", rank=4, alpha=2.0, fmt="comfyui")
    state = load_file(str(file))
    assert "diffusion_model.layers.0.self_attention.to_q.lora_down.weight" in state
    assert "diffusion_model.layers.1.mlp.linear_fc2.lora_up.weight" in state
    assert float(state["diffusion_model.layers.0.self_attention.to_q.alpha"]) == 2.0
    model = tiny_model()
    lora.load_lora(model, file, adapter_name="comfy")
    assert_same_deltas(lora.effective_deltas(model), deltas)
    again = lora.save_lora(model, tmp_path / "again.safetensors", adapter_name="comfy", format="comfyui")
    assert load_file(str(again)).keys() == state.keys()
    assert all(torch.equal(load_file(str(again))[k], state[k]) for k in state)
    # ComfyUI -> diffusers -> ernielab: the same effective weights
    d = lora.save_lora(model, tmp_path / "d.safetensors", adapter_name="comfy")
    other = tiny_model()
    lora.load_lora(other, d)
    assert_same_deltas(lora.effective_deltas(other), deltas)


# ---- (4) other trainers' layouts ----------------------------------------------------------------
def kohya_name(diffusers_path):
    return "lora_transformer_" + diffusers_path.replace(".", "_")


@pytest.mark.parametrize("layout", ["ai-toolkit-transformer", "ai-toolkit-diffusion_model", "onetrainer", "peft",
                                    "ernielab-names"])
def test_other_layouts_load_to_the_same_weights(tmp_path, layout):
    file, deltas = random_adapter(tmp_path, rank=4, alpha=8.0, targets="all")
    state, _ = lora.read_lora_file(file)
    pairs = {}  # diffusers path -> (A, B)
    for k, v in state.items():
        path, role = k.removeprefix("transformer.").rsplit(".lora_", 1)
        pairs.setdefault(path, {})[role[0]] = v
    written = {}
    for path, ab in pairs.items():
        a, b = ab["A"], ab["B"]
        if layout.startswith("ai-toolkit"):  # no alpha in the file (alpha = rank): the scale is in B
            prefix = "transformer" if layout.endswith("transformer") else "diffusion_model"
            written[f"{prefix}.{path}.lora_A.weight"] = a
            written[f"{prefix}.{path}.lora_B.weight"] = b * 8.0 / 4
        elif layout == "ernielab-names":
            written[f"transformer.{lora._from_diffusers_name(path)}.lora_A.weight"] = a
            written[f"transformer.{lora._from_diffusers_name(path)}.lora_B.weight"] = b * 8.0 / 4
        elif layout == "peft":
            written[f"base_model.model.{path}.lora_A.weight"] = a
            written[f"base_model.model.{path}.lora_B.weight"] = b * 8.0 / 4
        else:  # OneTrainer: kohya names, lora_down / lora_up / alpha
            written[f"{kohya_name(path)}.lora_down.weight"] = a.half()
            written[f"{kohya_name(path)}.lora_up.weight"] = b.half()
            written[f"{kohya_name(path)}.alpha"] = torch.tensor(8.0)
    save_file(written, str(tmp_path / "other.safetensors"))
    model = tiny_model()
    lora.load_lora(model, tmp_path / "other.safetensors")
    atol = 1e-2 if layout == "onetrainer" else 1e-6  # OneTrainer's file holds float16
    assert_same_deltas(lora.effective_deltas(model), deltas, atol=atol)


# ---- (5) several adapters, weights, fuse / unfuse -----------------------------------------------
def test_several_adapters_fuse_unfuse(tmp_path):
    f1, d1 = random_adapter(tmp_path, "one.safetensors", rank=4, alpha=8.0, targets="all", seed=1)
    f2, d2 = random_adapter(tmp_path, "two.safetensors", rank=2, alpha=2.0, targets="attention", seed=2)
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    args = inputs(model)
    with torch.no_grad():
        plain_out = model(*args)
    assert lora.load_lora(model, f1, "style", scale=0.7) == "style"
    assert lora.load_lora(model, f2, scale=-0.3) == "adapter_0"
    assert lora.list_adapters(model) == ["style", "adapter_0"]
    assert lora.active_adapters(model) == ["style", "adapter_0"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # loaded adapters: frozen
    expected = {k: 0.7 * d1[k] - 0.3 * d2.get(k, 0) for k in d1}
    assert_same_deltas(lora.effective_deltas(model), expected)

    # the mix equals a plain model whose weights are W + the weighted updates
    manual = tiny_model()
    with torch.no_grad():
        for k, delta in expected.items():
            manual.get_submodule(k).weight.add_(delta)
        mixed = model(*args)
        torch.testing.assert_close(mixed, manual(*args), rtol=0, atol=1e-5)
    lora.fuse_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), mixed, rtol=0, atol=1e-5)
    fused_w = model.get_submodule("layers.0.attn.to_q").base_layer.weight
    assert not torch.allclose(fused_w, base["layers.0.attn.to_q.weight"])
    lora.unfuse_lora(model)
    for name, layer in lora._lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base[f"{name}.weight"], rtol=0, atol=1e-6)

    # re-weighting, one adapter alone, then unloading back to the plain model
    lora.set_adapters(model, ["adapter_0"], [1.0])
    assert_same_deltas(lora.effective_deltas(model), {k: v for k, v in d2.items()})
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        lora.set_adapters(model, "nope")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'style'"):
        lora.load_lora(model, f1, "style")
    lora.fuse_lora(model, ["style"])  # by name: "style" is inactive, and only it is fused
    assert lora.active_adapters(model) == ["adapter_0"]
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule("layers.0.mlp.up_proj").base_layer.weight,
                                   base["layers.0.mlp.up_proj.weight"] + 0.7 * d1["layers.0.mlp.up_proj"],
                                   rtol=0, atol=1e-6)
    lora.unload_lora(model)
    assert model.state_dict().keys() == base.keys() and not hasattr(model, "peft_config")
    for k in base:  # fused and unfused once: the base within float rounding
        torch.testing.assert_close(model.state_dict()[k], base[k], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), plain_out, rtol=0, atol=1e-5)


def test_pipeline_argument(tiny_pipeline_dir, tmp_path):
    """The functions take a pipeline as well as a transformer."""
    from ernielab.image.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    lora.add_lora(pipe, 2, targets="mlp")
    randomize(pipe.transformer)
    file = lora.save_lora(pipe, tmp_path / "p.safetensors")
    again = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    lora.load_lora(again, file)
    assert_same_deltas(lora.effective_deltas(again), lora.effective_deltas(pipe))
    kw = dict(num_inference_steps=2, seed=0, output_type="pt")
    torch.testing.assert_close(again("a red circle", **kw).images, pipe("a red circle", **kw).images, rtol=0, atol=1e-5)


# ---- (6) bad files -------------------------------------------------------------------------------
def test_bad_files_refused(tmp_path):
    file, _ = random_adapter(tmp_path)
    good = load_file(str(file))
    model = tiny_model()
    bigger = tiny_model(ffn_hidden_size=96)  # another model's LoRA: the shapes do not fit
    with pytest.raises(ValueError, match=r"key 'transformer\.layers\.\d\.\S+lora_\w+\.weight': shapes .* do not fit"):
        lora.load_lora(bigger, file)
    cases = {
        "sd_unet": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                     "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                    "'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight' names no layer"),
        "flux": ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                  "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
                 "'transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight' names no layer"),
        "not_lora": ({"layers.0.attn.to_q.weight": torch.zeros(32, 32)},
                     "'layers.0.attn.to_q.weight' is not a LoRA weight"),
        "no_up": ({k: v for k, v in good.items() if not k.endswith("lora_B.weight")}, "has no up weight"),
        "rank_mismatch": ({**good, "transformer.layers.0.self_attention.to_q.lora_B.weight": torch.zeros(32, 3)},
                          "'transformer.layers.0.*do not fit"),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            lora.load_lora(model, tmp_path / f"{name}.safetensors")
    assert lora.list_adapters(model) == []  # nothing half-loaded
    with pytest.raises(FileNotFoundError):
        lora.load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="format"):
        lora.add_lora(model, 2)
        lora.save_lora(model, tmp_path / "x.safetensors", format="kohya")
    with pytest.raises(ValueError, match="matches no Linear layer"):
        lora.add_lora(tiny_model(), 2, targets=["nothing_here"])


def test_cli_trains_a_lora(tmp_path):
    """`ernielab image train configs/image/lora_tiny.json --set steps=2 --output-dir D` ships the adapter only."""
    from typer.testing import CliRunner

    from ernielab.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["image", "train", str(CONFIG), "--set", "steps=2", "--set", "batch_size=2",
                              "--output-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "run" / "lora").iterdir()) == [lora.COMFYUI_WEIGHT_NAME, lora.WEIGHT_NAME]
    assert not (tmp_path / "run" / "pipeline").exists()
    res = runner.invoke(app, ["image", "train", str(CONFIG), "--set", "lora.targets=heads", "--output-dir",
                              str(tmp_path / "bad")])
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "lora.targets" in lines[0], res.output
    assert not (tmp_path / "bad").exists()


# ---- LoRA on a distilled few-step student ----------------------------------------------------------
def test_lora_on_a_distilled_student(tmp_path, tiny_pipeline_dir):
    """A Turbo student is an ordinary pipeline folder: a LoRA trains on it (init_from) and loads back onto it,
    changing its few-step images; at weight 0 the student draws exactly what it drew before."""
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.turbo.distill import DistillConfig, DistillTrainer

    distill = DistillConfig.from_dict(dict(
        teachers=[{"path": str(tiny_pipeline_dir), "guidance_scale": 2.0}], output_dir=str(tmp_path / "turbo"),
        data={"kind": "shapes", "size": 64}, student_steps=[4, 2], steps=2, batch_size=2, lr=1e-3, warmup_steps=1,
        fake_updates=1, save_every=2, ema_decay=0))
    student_dir = Path(DistillTrainer(distill).train()["exported"])
    student = TextToImagePipeline.from_pretrained(student_dir)
    assert (student.config.steps, student.config.guidance_scale) == (4, 1.0)

    cfg = TrainConfig(model=student.transformer.config, text_encoder=student.config.text_encoder,
                      latent=student.config.latent, data=TrainConfig().data.replace(size=64, image_size=16),
                      init_from=str(student_dir), lora=lora.LoraSettings(rank=2, targets="all"),
                      output_dir=str(tmp_path / "lora"), steps=3, batch_size=2, lr=1e-2, warmup_steps=0,
                      cfg_dropout=0.0, ema_decay=0)
    adapter = Path(Trainer(cfg).train()["exported"]) / lora.WEIGHT_NAME

    prompts = ["a red circle", "two blue squares"]
    before = student(prompts, seed=0, output_type="pt").images
    lora.load_lora(student, adapter, adapter_name="style")
    after = student(prompts, seed=0, output_type="pt").images  # the student's own 4 steps, no CFG
    assert (after - before).abs().max() > 1e-4
    lora.set_adapters(student, ["style"], [0.0])
    torch.testing.assert_close(student(prompts, seed=0, output_type="pt").images, before, rtol=0, atol=1e-6)
