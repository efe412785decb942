"""ERNIE-Image on one GPU: the released transformer's config with random bf16 weights, in one command.

Sections (each one's result, error or "skipped" lands in the JSON; the file is rewritten after every section, so a
killed run keeps what it measured):

- `forward`: ours (ErnieImageTransformer) vs diffusers' ErnieImageTransformer2DModel holding the same weights, at
  each --sizes (pixels; latent grid = size / 16: FLUX.2 VAE 8x and 2x2 patchify), eager and torch.compile
  (regional: each block compiled, the blocks share the code; `--compile full` compiles the whole model), timed
  interleaved (ours, theirs, ours, ...) with CUDA events; medians, their max difference, and MFU = analytic
  matmul FLOPs / time / --peak-tflops (790 TFLOP/s dense bf16 for the H200).
- `lora_train`: one LoRA training step (peft, rank --lora-rank on attention + MLP, AdamW on the adapter) on a bf16
  base and on an int8 (torchao weight-only) base: step time and peak memory.
- `full_train`: one full fine-tuning step (AdamW on every weight, bf16 states): step time and peak memory.
- `pipeline`: the whole TextToImagePipeline (a tiny text encoder, widened to text_in_dim by a fixed random
  projection; the FLUX.2 VAE's config with random weights) at each size: images/s and peak memory, resident bf16,
  with model CPU offload, int8 and fp8 (fp8 only where `image.quant` allows it).

Peak memory is `torch.cuda.max_memory_allocated` during the section, minus what was allocated when the section
began (the diffusers model that all sections copy their weights from stays resident): `peak_gib` is what the
section itself needed; `peak_total_gib` is the absolute number. On the CPU there is no such counter (null).

    python benchmarks/gpu_image.py                        # one H200: ~6-8 minutes, outputs/gpu_image.json
    python benchmarks/gpu_image.py --smoke                # CPU, seconds: tiny config, outputs/gpu_image_smoke.json

--budget-s (default 360) skips the sections that would start after that many seconds, so the whole command ends
within about 8 minutes on one H200 even if a section runs longer than planned.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ernielab.image import lora
from ernielab.image.config import ErnieImageConfig
from ernielab.image.quant import quantize
from ernielab.image.transformer import ErnieImageTransformer

DOWNSAMPLE = 16  # pixels per latent token: FLUX.2 VAE (8x) and the release's 2x2 patchify
SECTIONS = ("forward", "lora_train", "full_train", "pipeline")


# ---- timing and memory -------------------------------------------------------------------------------------------
class Clock:
    """Seconds one call takes: CUDA events on a GPU (the GPU's own time, no host sync inside), perf_counter on
    the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class Memory:
    """Peak allocated GPU memory over a block, less what was allocated when it began (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        return False

    def restart_peak(self) -> None:
        """Measure the peak from here on (after a setup whose transient memory should not count)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict:
        if not self.cuda:
            return {"peak_gib": None, "peak_total_gib": None}
        return {"peak_gib": round((self.peak - self.base) / 2**30, 3), "peak_total_gib": round(self.peak / 2**30, 3)}


ERRORS: list[str] = []  # failures inside sections (each also recorded where it happened)


def failure(where: str, e: Exception) -> dict:
    traceback.print_exc()
    ERRORS.append(where)
    return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- models and inputs ---------------------------------------------------------------------------------------------
def forward_flops(cfg: ErnieImageConfig, n_img: int, text_len: int, batch: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): per block q, k, v, out (4 d^2), GeGLU (3 d f) for every
    token, and QK^T, PV (4 S^2 d); plus patch embedding, text projection, adaLN and the output projection."""
    d, f, s = cfg.hidden_size, cfg.ffn_hidden_size, n_img + text_len
    block = 2 * s * (4 * d * d + 3 * d * f) + 4 * s * s * d
    p2 = cfg.patch_size**2
    rest = 2 * n_img * (cfg.in_channels * p2 * d + d * cfg.out_channels * p2) + 2 * text_len * cfg.text_in_dim * d
    rest += 2 * (d * 6 * d + d * 2 * d)
    return float(batch * (cfg.num_layers * block + rest))


def reference_model(cfg: ErnieImageConfig, device, dtype):
    """diffusers' ErnieImageTransformer2DModel, random weights (its zero-initialised layers randomised too)."""
    from diffusers import ErnieImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        ref = ErnieImageTransformer2DModel(**cfg.to_diffusers())
    ref = ref.to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return ref


def ours_from(ref, dtype) -> ErnieImageTransformer:
    """A fresh ernielab transformer holding a copy of the reference's weights (on the reference's device)."""
    return ErnieImageTransformer.from_diffusers(ref, dtype=dtype).eval().requires_grad_(False)


def inputs(cfg: ErnieImageConfig, size: int, batch: int, text_len: int, device, dtype, seed: int = 0):
    g = size // DOWNSAMPLE
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, g, g, generator=gen).to(device, dtype)
    t = (torch.rand(batch, generator=gen) * 1000).to(device)
    text = torch.randn(batch, text_len, cfg.text_in_dim, generator=gen).to(device, dtype)
    lens = torch.full((batch,), text_len, device=device, dtype=torch.long)
    return x, t, text, lens


def compile_model(model, mode: str, backend: str):
    """torch.compile: "regional" compiles each block in place (identical blocks share the compiled code, so it
    compiles once per input shape); "full" the whole model. -> the callable to use."""
    if mode == "regional":
        for layer in model.layers:
            layer.compile(backend=backend, dynamic=False)
        return model
    return torch.compile(model, backend=backend, dynamic=False)


# ---- sections ------------------------------------------------------------------------------------------------------
def bench_forward(args, cfg, ref, device, dtype) -> dict:
    clock = Clock(device)
    ours = ours_from(ref, dtype)
    out = {}
    for mode in ("eager", "compile"):
        if mode == "compile":
            t0 = time.perf_counter()
            ours_fn = compile_model(ours, args.compile, args.compile_backend)
            ref_fn = compile_model(ref, args.compile, args.compile_backend)
        else:
            ours_fn, ref_fn = ours, ref
        for size in args.sizes:
            x, t, text, lens = inputs(cfg, size, args.batch, args.text_len, device, dtype)

            def run_ours():
                return ours_fn(x, t, text, lens)

            def run_ref():
                return ref_fn(x, t, text, lens, return_dict=False)[0]

            with torch.inference_mode():
                c0 = time.perf_counter()
                a, b = run_ours().float(), run_ref().float()  # the first call compiles (compile mode)
                first_call_s = time.perf_counter() - c0
                for _ in range(args.warmup):
                    run_ours(), run_ref()
                ours_t, ref_t = [], []
                for _ in range(args.repeats):
                    ours_t.append(clock(run_ours))
                    ref_t.append(clock(run_ref))
            flops = forward_flops(cfg, (size // DOWNSAMPLE) ** 2, args.text_len, args.batch)
            o, r = statistics.median(ours_t), statistics.median(ref_t)
            out[f"{mode}_{size}"] = {
                "size": size, "tokens": (size // DOWNSAMPLE) ** 2 + args.text_len, "batch": args.batch,
                "ours_ms": round(1000 * o, 3), "diffusers_ms": round(1000 * r, 3),
                "speedup_vs_diffusers": round(r / o, 4),
                "ours_mfu": sig(flops / o / (args.peak_tflops * 1e12)),
                "diffusers_mfu": sig(flops / r / (args.peak_tflops * 1e12)),
                "tflops_per_forward": sig(flops / 1e12),
                "max_abs_diff": (a - b).abs().max().item(),
                "max_abs_ref": b.abs().max().item(),
                "first_call_s": round(first_call_s, 3),
            }
            print(f"forward {mode} {size}px: ours {1000 * o:.2f} ms, diffusers {1000 * r:.2f} ms", flush=True)
        if mode == "compile":
            out["compile"] = {"mode": args.compile, "backend": args.compile_backend,
                              "wall_s_incl_compiles": round(time.perf_counter() - t0, 2)}
    del ours
    torch._dynamo.reset()
    if args.compile == "regional":  # undo the in-place block compilation of the shared reference
        for layer in ref.layers:
            layer._compiled_call_impl = None
    return out


def train_step_stats(args, cfg, model, params, device, dtype, grad_ckpt: bool) -> dict:
    clock = Clock(device)
    model.train()
    model.gradient_checkpointing = grad_ckpt
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)
    x, t, text, lens = inputs(cfg, args.train_size, args.batch, args.text_len, device, dtype, seed=1)
    target = torch.randn_like(x, dtype=torch.float32)

    def step():
        loss = F.mse_loss(model(x, t, text, lens).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = [clock(step) for _ in range(args.warmup + args.train_steps)][args.warmup:]
    s = statistics.median(times)
    flops = 3 * forward_flops(cfg, (args.train_size // DOWNSAMPLE) ** 2, args.text_len, args.batch)
    return {"size": args.train_size, "batch": args.batch, "step_ms": round(1000 * s, 3),
            "trainable_params": sum(p.numel() for p in params), "gradient_checkpointing": grad_ckpt,
            "mfu_3x_forward_flops": sig(flops / s / (args.peak_tflops * 1e12))}


def bench_lora_train(args, cfg, ref, device, dtype) -> dict:
    out = {}
    for base in ("bf16", "int8"):
        label = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16") if base == "bf16" else base
        model = params = None
        try:
            with Memory(device) as mem:
                model = ours_from(ref, dtype)
                if base == "int8":
                    quantize(model, "int8")
                lora.add_lora(model, args.lora_rank, targets="all")
                params = [p for p in model.parameters() if p.requires_grad]
                stats = train_step_stats(args, cfg, model, params, device, dtype, args.grad_ckpt)
            out[label] = {**stats, "rank": args.lora_rank, "targets": "attention+mlp", **mem.report()}
            print(f"lora train ({label} base): {stats['step_ms']:.1f} ms/step", flush=True)
        except Exception as e:  # e.g. an OOM, or int8 backward unsupported: the other base still counts
            out[label] = failure(f"lora_train/{label}", e)
        finally:
            model = params = None
            free(device)
    return out


def bench_full_train(args, cfg, ref, device, dtype) -> dict:
    with Memory(device) as mem:
        model = ours_from(ref, dtype).requires_grad_(True)
        params = list(model.parameters())
        stats = train_step_stats(args, cfg, model, params, device, dtype, args.grad_ckpt)
    del model, params
    free(device)
    print(f"full fine-tune: {stats['step_ms']:.1f} ms/step", flush=True)
    return {**stats, "optimizer": "AdamW, states in the weights' dtype", **mem.report()}


class WideTextEncoder(torch.nn.Module):
    """The bundled tiny text encoder with a fixed random projection to the transformer's text_in_dim, so the
    released transformer config is used unchanged."""

    def __init__(self, width: int):
        super().__init__()
        from ernielab.image.text_encoder import TextEncoder

        self.inner = TextEncoder()
        self.config = self.inner.config
        torch.manual_seed(0)
        self.widen = torch.nn.Linear(self.inner.dim, width, bias=False).requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.widen.out_features

    def forward(self, prompts, device=None, dtype=torch.float32):
        text, lens = self.inner(prompts, device=device, dtype=dtype)
        return self.widen.to(device=text.device, dtype=dtype)(text), lens


def build_vae(smoke: bool):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    if smoke:  # 4 latent channels, 2x2 patchify: 16 channels at 1/4 of the pixels
        vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4)
    else:  # the release's FLUX.2 VAE config: 32 latent channels, 2x2 patchify: 128 channels at 1/16
        vae = AutoencoderKLFlux2()
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def bench_pipeline(args, cfg, ref, device, dtype) -> dict:
    from ernielab.image.latents import DiffusersAutoencoder, LatentSpaceConfig
    from ernielab.image.pipeline import PipelineConfig, TextToImagePipeline

    encoder = WideTextEncoder(cfg.text_in_dim)
    latent = DiffusersAutoencoder(LatentSpaceConfig(kind="diffusers", patch_size=2), build_vae(args.smoke))
    pcfg = PipelineConfig(text_encoder=encoder.config, latent=latent.config, steps=args.pipe_steps,
                          guidance_scale=4.0, shift=3.0)
    prompts = ["a red circle above a blue square"] * args.pipe_batch
    out = {}
    for mode in ("bf16", "offload", "int8", "fp8"):
        entry = {}
        try:
            with Memory(device) as mem:
                model = ours_from(ref, dtype)
                if mode in ("int8", "fp8"):
                    entry["quant"] = quantize(model, mode)
                pipe = TextToImagePipeline(model, encoder, latent.to(dtype=dtype), pcfg)
                if mode == "offload" and device.type == "cuda":
                    pipe.enable_model_cpu_offload(device)
                else:
                    pipe.to(device)
                mem.restart_peak()  # sampling's peak, not the copy made while setting up
                for size in args.sizes:
                    call = dict(height=size, width=size, num_inference_steps=args.pipe_steps,
                                batch_size=args.pipe_batch, seed=0)
                    pipe(prompts, **call)  # warm-up (and the text encoder's cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    pipe(prompts, **call)  # images come back on the CPU: the time is the whole call's
                    s = time.perf_counter() - t0
                    entry[str(size)] = {"images_per_s": round(args.pipe_batch / s, 4), "s_per_call": round(s, 3),
                                        "steps": args.pipe_steps, "cfg": True, "batch": args.pipe_batch}
                    print(f"pipeline {mode} {size}px: {args.pipe_batch / s:.3f} images/s", flush=True)
            entry.update(mem.report())
            if mode == "offload" and device.type != "cuda":
                entry["note"] = "no offload on the CPU: the same as bf16"
        except ValueError as e:  # fp8 where it cannot run
            entry = {"refused": " ".join(str(e).split())}
        except Exception as e:  # e.g. an OOM: the other modes still count
            entry = failure(f"pipeline/{mode}", e)
        finally:
            pipe = model = None
            free(device)
        out[mode] = entry
    out["note"] = ("text encoder: the bundled MiniLM widened to text_in_dim by a random projection; VAE: "
                   f"{'a tiny' if args.smoke else 'the FLUX.2'} AutoencoderKLFlux2 config, random weights")
    return out


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, seconds: tiny config, small sizes, one repeat")
    ap.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--config", default="release", choices=["release", "tiny"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile", default="regional", choices=["regional", "full"])
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H200: 790)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the training steps")
    ap.add_argument("--pipe-steps", type=int, default=4)
    ap.add_argument("--pipe-batch", type=int, default=1)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no section after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="default: outputs/gpu_image.json (--smoke: "
                    "outputs/gpu_image_smoke.json)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
        ap.set_defaults(device="cpu", config="tiny", sizes=[32, 64], text_len=8, warmup=1, repeats=2,
                        compile_backend="eager", lora_rank=4, train_size=32, train_steps=1, pipe_steps=2,
                        out=Path("outputs/gpu_image_smoke.json"))
        args = ap.parse_args(argv)
    out_path = args.out or Path("outputs/gpu_image.json")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = ErnieImageConfig.release() if args.config == "release" else ErnieImageConfig.tiny(16, 32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "timer": "cuda events" if device.type == "cuda" else "perf_counter",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke,
              "config": {"preset": args.config, **cfg.to_diffusers()}, "peak_tflops": args.peak_tflops,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "sections")}, "sections": {}}
    try:
        import diffusers
        import peft

        report.update(diffusers=diffusers.__version__, peft=peft.__version__)
        import torchao

        report["torchao"] = torchao.__version__
    except ImportError as e:
        report["missing"] = str(e)

    def write():
        report["wall_s"] = round(time.perf_counter() - start, 2)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    ref = reference_model(cfg, device, dtype)
    report["params"] = sum(p.numel() for p in ref.parameters())
    benches = {"forward": bench_forward, "lora_train": bench_lora_train, "full_train": bench_full_train,
               "pipeline": bench_pipeline}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if time.perf_counter() - start > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            continue
        t0 = time.perf_counter()
        try:
            result = benches[name](args, cfg, ref, device, dtype)
        except Exception as e:  # an OOM or a failure in one section leaves the others' results
            result = failure(name, e)
            free(device)
        result["section_wall_s"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = result
        write()
    report["errors"] = ERRORS
    write()
    print(f"wrote {out_path} ({report['wall_s']} s)")
    if ERRORS and args.smoke:
        sys.exit(1)  # the smoke run checks the code path: a failing section is a failure there
    return report


if __name__ == "__main__":
    main()
