"""image/quant.py: torchao weight quantization of ERNIE-Image's transformer on the CPU."""
import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from ernielab.image import lora  # noqa: E402
from ernielab.image.config import ErnieImageConfig  # noqa: E402
from ernielab.image.quant import MODES, quantize, quantized_layers  # noqa: E402
from ernielab.image.transformer import ErnieImageTransformer  # noqa: E402


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=16, text_in_dim=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g) * 1000,
            torch.randn(2, 5, 32, generator=g), torch.tensor([5, 3]))


def test_int8_output_close_to_fp32_and_linears_quantized():
    model = tiny_model()
    args = inputs()
    with torch.no_grad():
        ref = model(*args)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= 16]
    info = quantize(model, "int8")
    assert info["mode"] == "int8" and info["layers"] == len(linears) > 10
    assert info["bytes_after"] < 0.35 * info["bytes_before"]  # int8 weights + per-row scales vs fp32
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(linears)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in layers)
    assert set(layers.values()) == {"Int8Tensor"}
    with torch.no_grad():
        out = model(*args)
    err = (out - ref).abs()
    rel = err.max().item() / ref.abs().max().item()
    print(f"int8 vs fp32: max abs err {err.max().item():.3g}, mean abs err {err.mean().item():.3g}, "
          f"max |ref| {ref.abs().max().item():.3g}")
    assert torch.isfinite(out).all()
    assert rel < 0.03 and err.mean().item() < 0.01 * ref.abs().mean().item() + 1e-3


def test_quantize_takes_a_pipeline_object():
    class Holder:
        transformer = tiny_model()

    info = quantize(Holder(), "int8")
    assert info["layers"] == len(quantized_layers(Holder.transformer))


def test_unknown_mode_and_requantize_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="int8"):
        quantize(model, "int4")
    assert quantized_layers(model) == {}  # nothing touched
    quantize(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int8")


def test_fp8_on_cpu_runs_or_is_refused_clearly():
    model = tiny_model()
    args = inputs()
    with torch.no_grad():
        ref = model(*args)
    try:
        info = quantize(model, "fp8")
    except ValueError as e:
        assert "fp8" in str(e) and "int8" in str(e)
        return
    assert info["scheme"] == "fp8 weight-only"
    with torch.no_grad():
        out = model(*args)
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_lora_trains_on_an_int8_base_and_adapters_stay_full_precision():
    model = tiny_model()
    quantize(model, "int8")
    lora.add_lora(model, 4, targets="all")
    assert all(".lora_" not in n for n in quantized_layers(model))
    out = model(*inputs())
    out.square().mean().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n for n in grads)


def test_modes():
    assert MODES == ("int8", "fp8")


# ---- `ernielab generate --lora FILE[:SCALE] --quantize int8` -----------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from ernielab.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _clean_error(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def lora_files(tiny_pipeline_dir, tmp_path_factory):
    """Two random LoRA files for the tiny pipeline's transformer (B non-zero, so they change the images)."""
    from ernielab.image.transformer import ErnieImageTransformer

    out = tmp_path_factory.mktemp("loras")
    paths = []
    for i, targets in enumerate(("attention", "mlp")):
        model = ErnieImageTransformer.from_pretrained(tiny_pipeline_dir / "transformer")
        lora.add_lora(model, 2, targets=targets)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.normal_(0, 1.0)
        paths.append(lora.save_lora(model, out / f"l{i}.safetensors"))
    return paths


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.float32)


def test_generate_with_loras_and_int8(tiny_pipeline_dir, lora_files, tmp_path):
    common = ("a red circle", "--model", tiny_pipeline_dir, "--steps", 2, "--size", "16x16")
    a, b = lora_files
    outs = {}
    for key, extra in {"base": (), "zero": ("--lora", f"{a}:0"), "one": ("--lora", a),
                       "two": ("--lora", f"{a}:0.7", "--lora", f"{b}:1.5"), "int8": ("--quantize", "int8"),
                       "lora_int8": ("--lora", f"{a}:0.7", "--lora", f"{b}:1.5", "--quantize", "int8")}.items():
        res = _cli("generate", *common, "-o", tmp_path / f"{key}.png", *extra)
        assert res.exit_code == 0, res.output
        outs[key] = _pixels(tmp_path / f"{key}.png")
    diff = {k: float(abs(v - outs["base"]).mean()) for k, v in outs.items()}
    print("mean |pixel - base| (0..255):", {k: round(v, 2) for k, v in diff.items()})
    assert diff["zero"] == 0  # weight 0: the base model exactly
    assert diff["one"] > 1 and diff["two"] > 1 and abs(outs["two"] - outs["one"]).mean() > 0.5
    assert diff["int8"] < 1  # int8 weights: the base image within a little rounding
    assert abs(outs["lora_int8"] - outs["two"]).mean() < 2  # LoRAs fused, then quantized


def test_generate_lora_matches_the_python_api(tiny_pipeline_dir, lora_files, tmp_path):
    from ernielab.image.pipeline import TextToImagePipeline

    a, b = lora_files
    res = _cli("generate", "a red circle", "--model", tiny_pipeline_dir, "--steps", 2, "--size", "16x16",
               "-o", tmp_path / "cli.png", "--lora", f"{a}:0.7", "--lora", f"{b}:1.5")
    assert res.exit_code == 0, res.output
    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    lora.load_lora(pipe, a, adapter_name="a")
    lora.load_lora(pipe, b, adapter_name="b")
    lora.set_adapters(pipe, ["a", "b"], [0.7, 1.5])
    pipe("a red circle", num_inference_steps=2, height=16, width=16, seed=0).images[0].save(tmp_path / "api.png")
    assert abs(_pixels(tmp_path / "cli.png") - _pixels(tmp_path / "api.png")).max() == 0


def test_generate_bad_lora_or_quantize_is_one_error_line(tiny_pipeline_dir, lora_files, tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}, str(foreign))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    out = tmp_path / "x.png"
    common = ("a red circle", "--model", tiny_pipeline_dir, "--steps", 2, "--size", "16x16", "-o", out)
    _clean_error(_cli("generate", *common, "--lora", tmp_path / "missing.safetensors"), "--lora", "missing")
    _clean_error(_cli("generate", *common, "--lora", f"{lora_files[0]}:0.5", "--lora", foreign), "--lora",
                 "foreign.safetensors", "down_blocks")
    _clean_error(_cli("generate", *common, "--lora", garbage), "--lora")
    _clean_error(_cli("generate", *common, "--quantize", "int4"), "--quantize")
    assert not out.exists()
