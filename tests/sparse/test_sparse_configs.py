"""configs/sparse/*.json: every file loads, and the configs of documented results hold exactly the settings
stored with those results (benchmarks/results/sparse/*.json), so `ernielab sparse train CONFIG --set seed=N`
repeats a documented run."""
import json
from pathlib import Path

import pytest

from ernielab.core.cli import load_config
from ernielab.sparse.config import SparseClassifierConfig
from ernielab.sparse.train import SparseTrainConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "sparse"
RESULTS = REPO / "benchmarks" / "results" / "sparse"
MODELS = {"dense": "dense", "bigbird": "bigbird", "hst": "hst", "hst_sar": "hst-sar"}

# config -> (results file, model key, data folder)
DOCUMENTED = {}
for short, key in MODELS.items():
    DOCUMENTED["listops" if key == "hst-sar" else f"listops_{short}"] = ("sparse_lra_listops.json", key)
    DOCUMENTED[f"listops_len128_{short}"] = ("sparse_lra_listops_len128.json", key)
    DOCUMENTED[f"listops_len128_block8_{short}"] = ("sparse_lra_listops_len128_block8.json", key)
    DOCUMENTED[f"listops_len128_5k_{short}"] = ("sparse_lra_listops_len128_5k.json", key)
    DOCUMENTED[f"pathfinder16_matched_{short}"] = ("sparse_lra_pathfinder.json", key)
for variant in ("alpha0.1", "alpha0.3", "densece"):
    DOCUMENTED[f"listops_len128_block8_hst_sar_{variant}"] = (f"sparse_lra_listops_len128_block8_{variant}.json",
                                                             "hst-sar")
DOCUMENTED["listops_len128_5k_dense_dropout0.1"] = ("sparse_lra_listops_len128_5k_dense_dropout0.1.json", "dense")
DOCUMENTED["listops_len128_5k_hst_sar_dropout0.1"] = ("sparse_lra_listops_len128_5k_sar_dropout0.1.json", "hst-sar")


def test_every_config_loads():
    files = sorted(CONFIGS.glob("*.json"))
    assert len(files) == len(DOCUMENTED) + 2  # + listops_lra, text_lra
    for path in files:
        cfg = load_config(SparseTrainConfig, path)
        assert cfg.steps >= 1 and cfg.data.path and cfg.output_dir
        written = json.loads(path.read_text())
        assert written == {k: v for k, v in cfg.to_dict().items() if k in written}
        # what a run learns is spelled out, not left to defaults that may change: the model and data sections
        # in full, and every training setting but the run-control ones (resume, branch_from) and sharding
        # (fsdp: how processes split the work, not what they learn)
        assert written["model"] == cfg.model.to_dict() and written["data"] == cfg.data.to_dict()
        assert set(cfg.to_dict()) - set(written) <= {"resume", "branch_from", "fsdp"}, path.name


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_config_repeats_the_documented_run(name):
    results_file, model = DOCUMENTED[name]
    saved = json.loads((RESULTS / results_file).read_text())
    run = saved["results_by_seed"]["0"][model] if "results_by_seed" in saved else saved["results"][model]
    cfg = SparseTrainConfig.load(CONFIGS / f"{name}.json")
    # older results predate some model fields; their defaults reproduce the old behaviour
    assert cfg.model == SparseClassifierConfig.from_dict(run["model_config"])
    # (results written since the engine port also store the sections and the run-control fields)
    old = {k: v for k, v in run["train_config"].items()
           if k not in ("seed", "output_dir", "model", "data", "resume", "branch_from", "max_minutes")}
    assert {k: getattr(cfg, k) for k in old} == old and "lr" in old
    assert cfg.seed == 0
    assert "{seed}" in cfg.output_dir or name == "listops"  # `--set seed=N` trains seed N into its own folder
    assert (cfg.grad_accum, cfg.min_lr_ratio, cfg.ema_decay, cfg.mixed_precision) == (1, 0.0, 0.0, "no")
    assert cfg.data.task == saved["task"] and cfg.data.seed == 0
    assert cfg.data.spec.to_dict() == saved["data_spec"]
