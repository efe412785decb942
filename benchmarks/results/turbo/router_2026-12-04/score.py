"""Students only (8 steps, no CFG) + the undistilled base at 8 steps without CFG: FID/KID and alignment with
benchmarks/turbo.py's own functions (same captions, seeds and cache keys), fewer images than the Turbo table.

    OMP_NUM_THREADS=1 .venv/bin/python outputs/turbo_router_eval.py --n-fid 200 --n-align 30 \
        --student NAME=FOLDER ... --out outputs/turbo_router_eval.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import turbo  # noqa: E402

from ernielab.core.images import to_uint8  # noqa: E402
from ernielab.image.evaluate import alignment_prompts, real_split  # noqa: E402
from ernielab.image.fid import inception_features  # noqa: E402
from ernielab.image.pipeline import TextToImagePipeline  # noqa: E402
from ernielab.worlds.registry import DataConfig  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--base", default="runs/default_v1", help="'' = no base row")
ap.add_argument("--student", action="append", default=[])
ap.add_argument("--n-fid", type=int, default=200)
ap.add_argument("--n-align", type=int, default=30)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--batch-size", type=int, default=50)
ap.add_argument("--cache", default="runs/distill/bench_cache")
ap.add_argument("--out", default="outputs/turbo_router_eval.json")
args = ap.parse_args()
t0 = time.time()
base = TextToImagePipeline.from_pretrained(args.base or "runs/default_v1")
table = [{"name": "base_8_nocfg", "pipe": base, "steps": 8, "guidance": 1.0, "shift": base.config.shift,
          "path": args.base}] if args.base else []
for spec in args.student:
    name, _, path = spec.partition("=")
    table.append(turbo.few_step_rows(name, TextToImagePipeline.from_pretrained(path), path)[0])  # 8 steps
real = real_split(DataConfig(kind="shapes", image_size=base.config.height), args.n_fid)
captions = list(real["caption"])
align_sets = alignment_prompts("shapes", args.n_align, args.seed)
from safetensors.torch import load_file, save_file  # noqa: E402

feats_file = Path(f"outputs/turbo_real_feats_{args.n_fid}.safetensors")  # the real set is fixed: computed once
if feats_file.is_file():
    real_feats = load_file(str(feats_file))["features"]
else:
    real_feats = inception_features(to_uint8(real["image"]), desc="inception (real)")
    save_file({"features": real_feats.contiguous()}, str(feats_file))
results = {}
for row in table:
    r = turbo.quality(row, real_feats, captions, align_sets, args)
    results[row["name"]] = {"fid": r["fid_kid"]["fid"], "kid": r["fid_kid"]["kid_mean"],
                            **{k: v["all"] for k, v in r["alignment"].items()}}
    print(json.dumps({row["name"]: results[row["name"]]}), flush=True)
Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": results, "wall_s": time.time() - t0}, indent=2) + "\n")
print(f"wrote {args.out} in {time.time() - t0:.0f}s")
