"""Self-speculative caption decoding with the MTP heads against plain greedy decoding (docs/unified.md).

Captions held-out val images (greedy, KV cache) two ways, interleaved in one process: `generate.caption_codes`
(one forward per token) and `speculative.speculative_caption_codes` (the main head and the MTP heads draft,
one forward verifies). Reports per batch size and number of draft heads: whether every caption equals greedy's,
the acceptance rate (per draft depth too), forwards per caption batch, and tokens/s of both (best and median
of the rounds, wall and CPU time of this thread); the speed-up is greedy's time over speculative's for the same
tokens.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unified_speculative.py --model runs/unified_balance/sum/model \\
        --n 64 --batches 1,8 --rounds 5 --out outputs/unified_speculative.json
    .venv/bin/python benchmarks/unified_speculative.py --smoke   # a tiny random model: seconds

The report goes to --out (default outputs/unified_speculative.json; ..._smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from unified_speed import smoke_models  # benchmarks/ is on the path when a script here runs

from ernielab.unified.evaluation import heldout
from ernielab.unified.generate import caption_codes
from ernielab.unified.io import load_model
from ernielab.unified.speculative import SpeculativeStats, speculative_caption_codes


def decode_all(codes: torch.Tensor, batch: int, decode) -> tuple[list[list[int]], float, float, list]:
    """Caption all codes in batches with `decode(codes) -> (captions, info)`; -> captions, wall s, CPU s, infos."""
    captions, infos = [], []
    t0, c0 = time.perf_counter(), time.thread_time()
    for start in range(0, len(codes), batch):
        ids, info = decode(codes[start: start + batch])
        captions += ids
        infos.append(info)
    return captions, time.perf_counter() - t0, time.thread_time() - c0, infos


def merged(stats: list[SpeculativeStats], captions: int) -> dict:
    """The decodes' counts summed; per caption a decode commits rounds + accepted + 1 tokens in rounds + 1
    forwards (greedy: one token per forward)."""
    heads = stats[0].draft_heads
    total = SpeculativeStats(draft_heads=heads, accepted_at=[0] * heads)
    for s in stats:
        total.forwards += s.forwards
        total.drafted += s.drafted
        total.accepted += s.accepted
        total.tokens += s.tokens
        total.accepted_at = [a + b for a, b in zip(total.accepted_at, s.accepted_at)]
    rounds = total.drafted // heads if heads else 0  # verifying rounds summed over captions
    return {**total.to_dict(), "accepted_at_rate": [a / rounds if rounds else 0.0 for a in total.accepted_at],
            "tokens_per_forward_per_caption": total.tokens / (rounds + captions) if heads else 1.0}


def compare(model, codes: torch.Tensor, batch: int, heads: int, rounds: int) -> dict:
    """Interleaved rounds of greedy and speculative decoding of all codes at one batch size."""
    methods = {"greedy": lambda c: caption_codes(model, c),
               "speculative": lambda c: speculative_caption_codes(model, c, draft_heads=heads)}
    first = {name: decode_all(codes, batch, fn) for name, fn in methods.items()}  # warm-up, outputs, counts
    greedy_ids, spec_ids = first["greedy"][0], first["speculative"][0]
    stats = merged(first["speculative"][3], len(codes))
    times = {name: {"wall": [], "cpu": []} for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            _, wall, cpu, _ = decode_all(codes, batch, fn)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    tokens = stats["tokens"]
    out = {"batch": batch, "draft_heads": heads, "captions": len(codes),
           "identical_to_greedy": sum(a == b for a, b in zip(greedy_ids, spec_ids)) / len(codes),
           "greedy_forwards": sum(info for info in first["greedy"][3]), **stats}
    for name, t in times.items():
        for clock in ("wall", "cpu"):
            out[f"{name}_tokens_per_{clock}_s_best"] = tokens / min(t[clock])
            out[f"{name}_tokens_per_{clock}_s_median"] = tokens / statistics.median(t[clock])
    for stat in ("best", "median"):
        for clock in ("wall", "cpu"):
            key = f"tokens_per_{clock}_s_{stat}"
            out[f"speedup_{clock}_{stat}"] = out[f"speculative_{key}"] / out[f"greedy_{key}"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a trained model folder (RUN/model)")
    ap.add_argument("--n", type=int, default=64, help="held-out val images to caption")
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8])
    ap.add_argument("--draft-heads", type=lambda v: [int(b) for b in v.split(",")], default=None,
                    help="numbers of MTP heads to draft with (default: 1 .. all of the model's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/unified_speculative.json"), help="JSON report")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 4 images, batch 2, one round (seconds)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:  # the smoke settings become the defaults: options given explicitly still win
            moe, _ = smoke_models(Path(tmp))
            ap.set_defaults(model=moe, n=4, batches=[2], draft_heads=[2], rounds=1, out=Path("outputs/unified_speculative_smoke.json"))
            args = ap.parse_args(argv)
        if args.model is None:
            ap.error("--model is required (or --smoke)")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, vq, _ = load_model(args.model)
    heads_list = args.draft_heads or list(range(1, len(model.mtp) + 1))
    images, _ = heldout(args.n, vq.config.image_size, seed=0)
    with torch.no_grad():
        codes = vq.encode(images)
    results = []
    cases = [(b, k) for b in args.batches for k in heads_list]
    for batch, heads in tqdm(cases, desc="speculative"):
        results.append(compare(model, codes, batch, heads, args.rounds))
    report = {"model": str(args.model), "threads": args.threads, "rounds": args.rounds, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for r in results:
        print(f"batch {r['batch']} heads {r['draft_heads']}: identical {r['identical_to_greedy']:.3f}, acceptance "
              f"{r['acceptance_rate']:.3f}, forwards {r['forwards']} vs {r['greedy_forwards']}, speed-up (CPU, best) "
              f"{r['speedup_cpu_best']:.2f}x, greedy {r['greedy_tokens_per_cpu_s_best']:.0f} tok/s")


if __name__ == "__main__":
    main()
