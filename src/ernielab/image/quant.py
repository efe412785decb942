"""Weight quantization of ERNIE-Image's transformer with torchao.

`quantize(pipe_or_transformer, mode)` swaps the weights of the transformer's Linear layers for torchao's quantized
tensors in place (the modules stay `nn.Linear`; their `.weight` becomes a torchao tensor subclass):

| mode | torchao config | where |
|---|---|---|
| `"int8"` | `Int8WeightOnlyConfig` (per-channel symmetric int8 weights, activations as they are) | CPU and CUDA |
| `"fp8"` | CUDA with compute capability >= 8.9 (Ada, Hopper): `Float8DynamicActivationFloat8WeightConfig` (fp8 e4m3 weights and per-row dynamic fp8 activations, fp8 matmuls); elsewhere `Float8WeightOnlyConfig`, and only if a probe layer runs with it there | see left |

Adapter layers (peft's `lora_A` / `lora_B`) are never quantized: a LoRA stays in full precision on a quantized base
(peft wraps a torchao-quantized Linear as its `TorchaoLoraLinear`), which is how a LoRA trains on an int8 base.
To sample with a LoRA on a quantized model, fuse the LoRA first (`lora.unload_lora(pipe, fuse=True)`) and quantize
after, as `ernielab generate --lora ... --quantize int8` does.

torchao is imported only here, inside the functions: `pip install torchao` (checked with torchao 0.18.0 on torch
2.13, CPU).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ernielab.image.lora import transformer_of

MODES = ("int8", "fp8")
MIN_FEATURES = 16  # Linear layers narrower than this (in or out) stay as they are: nothing to gain, odd kernels


@contextlib.contextmanager
def _quiet_torchao_import():
    """torchao logs a line for each of its optional CUDA kernel libraries it cannot load (all of them on a CPU
    build); those are not errors for us."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torchao():
    try:
        with _quiet_torchao_import():
            import torchao.quantization as q
    except ImportError as e:  # an optional dependency: a user error, one line at the CLI
        raise ValueError(f"quantization needs torchao: pip install 'ernielab[quant]' ({e})") from None
    return q


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether `quantize` quantizes this module: a plain Linear (not a LoRA branch, not already quantized) whose
    sides are both at least MIN_FEATURES wide."""
    if not isinstance(module, nn.Linear) or ".lora_" in f".{name}":
        return False
    if type(module.weight) not in (torch.Tensor, nn.Parameter):
        return False  # already a torchao tensor
    return min(module.in_features, module.out_features) >= MIN_FEATURES


def _fp8_config(device: torch.device, dtype: torch.dtype):
    q = _torchao()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()), "fp8 dynamic activation"
        raise ValueError(f"fp8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --quantize int8")
    config = q.Float8WeightOnlyConfig()
    if not _runs(config, device, dtype):
        raise ValueError(f"fp8 quantization does not run on {device.type} with this torch/torchao build; "
                         f"use int8 (or fp8 on a GPU of compute capability >= 8.9)")
    return config, "fp8 weight-only"


def _runs(config, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether torchao quantizes and runs a small Linear with `config` on this device (a probe, not a guess)."""
    q = _torchao()
    try:
        probe = nn.Linear(64, 64).to(device=device, dtype=dtype)
        q.quantize_(probe, config)
        with torch.no_grad():
            out = probe(torch.randn(4, 64, device=device, dtype=dtype))
        return bool(torch.isfinite(out).all())
    except Exception:  # any failure means: not usable here
        return False


def quantize(obj, mode: str) -> dict:
    """Quantize the weights of the transformer's Linear layers in place (see the module doc). `obj` is a pipeline
    (anything with a `.transformer`) or the transformer. -> {"mode", "scheme", "layers": quantized layer count,
    "bytes_before", "bytes_after": Linear weight bytes}. An unknown mode, or fp8 where it cannot run, is a
    ValueError."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {list(MODES)}, got {mode!r}")
    model = transformer_of(obj)
    q = _torchao()
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        raise ValueError("the transformer has no parameters to quantize") from None
    if device.type == "meta":
        raise ValueError("the transformer is on the meta device: load its weights before quantizing")
    if mode == "int8":
        config, scheme = q.Int8WeightOnlyConfig(), "int8 weight-only"
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"int8 quantization runs on cpu or cuda, the transformer is on {device.type}")
    else:
        config, scheme = _fp8_config(device, dtype)
    names = [n for n, m in model.named_modules() if quantizable(n, m)]
    if not names:
        raise ValueError("no Linear layer of the transformer can be quantized (all already quantized?)")
    before = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names)
    chosen = set(names)
    with _quiet_torchao_import():
        q.quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen)
    after = sum(weight_bytes(model.get_submodule(n).weight) for n in names)
    return {"mode": mode, "scheme": scheme, "dtype": str(dtype).removeprefix("torch."), "layers": len(names),
            "bytes_before": before, "bytes_after": after}


def weight_bytes(weight: torch.Tensor) -> int:
    """Bytes a (possibly torchao-quantized) weight holds: its inner tensors (data and scales) added up."""
    if type(weight) is torch.Tensor or type(weight) is nn.Parameter:
        return weight.numel() * weight.element_size()
    flatten = getattr(weight, "__tensor_flatten__", None)
    if flatten is None:
        return weight.numel() * weight.element_size()
    names, _ = flatten()
    return sum(weight_bytes(getattr(weight, n)) for n in names if isinstance(getattr(weight, n), torch.Tensor))


def quantized_layers(obj) -> dict[str, str]:
    """{module path: torchao tensor class} for the transformer's Linear layers whose weight is quantized."""
    model = transformer_of(obj)
    return {n: type(m.weight).__name__ for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) not in (torch.Tensor, nn.Parameter)}
