"""SAR loss, configs, training through the engine (learning, exact resume, the best-validation model, refusing
mismatched checkpoints, checkpoints from before new config fields)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ernielab.core.engine import Engine
from ernielab.sparse.config import PRESETS, SparseClassifierConfig
from ernielab.sparse.lra import ListOpsSpec, SparseDataConfig, load_listops, read_tsv, write_tsv
from ernielab.sparse.model import SparseClassifier
from ernielab.sparse.sar import classification_loss, symmetric_kl
from ernielab.sparse.train import BatchPlan, SparseTask, SparseTrainConfig, evaluate, load_trained, train


def test_symmetric_kl():
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    assert symmetric_kl(a, a).abs() < 1e-6
    assert symmetric_kl(a, b) > 0
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))


def test_sar_term_vanishes_only_when_topologies_coincide():
    torch.manual_seed(0)
    labels = torch.tensor([1, 2, 3])
    same = SparseClassifier(SparseClassifierConfig.tiny("hst", max_len=16, block_size=8, num_global=1)).eval()
    _, parts = classification_loss(same, torch.randint(1, 16, (3, 16)), labels, sar_alpha=1.0)
    assert parts["sar_kl"] < 1e-8
    model = SparseClassifier(SparseClassifierConfig.tiny("hst", max_len=64, block_size=4)).eval()
    tokens = torch.randint(1, 16, (3, 64))
    loss, parts = classification_loss(model, tokens, labels, sar_alpha=1.0)
    assert parts["sar_kl"] > 1e-6
    torch.testing.assert_close(loss.item(), parts["ce"] + parts["sar_kl"], rtol=1e-5, atol=1e-6)
    loss.backward()
    with_sar = model.head.fc2.weight.grad.clone()
    model.zero_grad()
    classification_loss(model, tokens, labels, sar_alpha=0.0)[0].backward()
    assert not torch.allclose(with_sar, model.head.fc2.weight.grad)  # the KL term reaches the weights


def test_sar_dense_ce_averages_both_topologies_cross_entropy():
    torch.manual_seed(0)
    model = SparseClassifier(SparseClassifierConfig.tiny("hst", max_len=64, block_size=4)).eval()
    tokens, labels = torch.randint(1, 16, (3, 64)), torch.tensor([1, 2, 3])
    loss, parts = classification_loss(model, tokens, labels, sar_alpha=0.5, dense_ce=True)
    dense = torch.nn.functional.cross_entropy(model(tokens, topology="dense"), labels).item()
    assert abs(parts["dense_ce"] - dense) < 1e-5 and abs(parts["dense_ce"] - parts["ce"]) > 1e-4
    torch.testing.assert_close(loss.item(), 0.5 * (parts["ce"] + dense) + 0.5 * parts["sar_kl"], rtol=1e-5, atol=1e-6)
    assert "dense_ce" not in classification_loss(model, tokens, labels, sar_alpha=0.5)[1]
    with pytest.raises(ValueError, match="sar_dense_ce"):
        SparseClassifierConfig.tiny("hst", sar_dense_ce=True)


def test_configs_roundtrip_and_validate(tmp_path):
    for name, make in PRESETS.items():
        for mode in ("dense", "bigbird", "hst"):
            cfg = make(mode)
            cfg.save(tmp_path / "c.json")
            assert SparseClassifierConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="SAR"):
        SparseClassifierConfig.tiny("bigbird", sar_alpha=0.5)
    with pytest.raises(ValueError, match="attention: must be one of"):
        SparseClassifierConfig.tiny("linear")
    with pytest.raises(ValueError, match="dropout: must be < 1"):
        SparseClassifierConfig.tiny(dropout=1.0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        SparseClassifier(SparseClassifierConfig.tiny())(torch.ones(1, 65, dtype=torch.long))
    # in a training config the error names the section and the field
    with pytest.raises(ValueError, match=r"model: attention: must be one of"):
        SparseTrainConfig.from_dict({"model": {"attention": "linear"}})
    with pytest.raises(ValueError, match=r"model.dim: expected int"):
        SparseTrainConfig.from_dict({"model": {"dim": "64"}})
    with pytest.raises(ValueError, match=r"data.task: must be one of"):
        SparseTrainConfig.from_dict({"data": {"task": "imdb"}})
    with pytest.raises(ValueError, match="pathfinder generator spec does not fit task 'listops'"):
        SparseTrainConfig.from_dict({"data": {"task": "listops", "pathfinder": {}}})


def test_param_groups_are_the_models_own():
    model = SparseClassifier(SparseClassifierConfig.tiny("hst"))
    decay, rest = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in rest["params"]}
    assert {"pos_emb", "prefix"} <= kept and all(n in ("pos_emb", "prefix") or model.get_parameter(n).ndim == 1
                                                 for n in kept)
    assert "token_emb.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_batch_plan_covers_each_epoch_once():
    plan = BatchPlan([5, 1, 9, 3, 7, 2, 8, 4, 6, 0], batch_size=3, seed=0, bucket=2)
    epoch = [i for step in range(3) for i in plan(step)]
    assert len(set(epoch)) == 9 and plan(0) == BatchPlan(plan.lengths, 3, 0, 2)(0)


def run_config(data_dir, out, model=None, **kw) -> SparseTrainConfig:
    model = model or SparseClassifierConfig.tiny("hst", max_len=32, sar_alpha=0.5, dropout=0.1)
    base = dict(model=model, data=SparseDataConfig(task="listops", path=str(data_dir)), output_dir=str(out), steps=6,
                batch_size=8, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3, log_every=1, keep_checkpoints=2)
    return SparseTrainConfig(**{**base, **kw})


class Crash(Exception):
    pass


class CrashingTask(SparseTask):
    """Dies during optimizer step `at` (0-based), after the checkpoint of the steps before it."""

    def __init__(self, config, at: int):
        super().__init__(config, progress=False)
        self.at = at

    def after_step(self, model, step):
        if step == self.at:
            raise Crash
        return {}


def crash(cfg, at: int) -> None:
    with pytest.raises(Crash):
        Engine(CrashingTask(cfg, at)).fit()


def without_times(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "samples_per_s")} for r in records]


def final_state(run):
    ckpt = load_checkpoint(latest_checkpoint(run))
    return ckpt["step"], ckpt["modules"]["model"], ckpt["states"]["optimizer"]


def assert_same_state(a, b):
    (step_a, weights_a, opt_a), (step_b, weights_b, opt_b) = a, b
    assert step_a == step_b and weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][k])) for k, v in state.items())


def test_training_resumes_exactly_through_the_engine(listops_dir, tmp_path):
    """6 steps straight == 3 steps, a crash, and a resume: weights, optimizer state, metrics and best model."""
    straight = tmp_path / "straight"
    train(run_config(listops_dir, straight), progress=False)
    metrics = without_times(straight / "metrics.jsonl")
    assert [r["step"] for r in metrics if "eval" in r] == [3, 6]
    halves = tmp_path / "halves"
    crash(run_config(listops_dir, halves), at=3)  # dies in step 4, after the checkpoint of step 3
    assert latest_checkpoint(halves).name == "step-0000003"
    assert train(run_config(listops_dir, halves), progress=False)["step"] == 6
    assert_same_state(final_state(straight), final_state(halves))
    assert without_times(halves / "metrics.jsonl") == metrics  # records after step 3 redone, not duplicated
    best = [load_file(str(run / "best" / "model.safetensors")) for run in (straight, halves)]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    # killed between step 3 and step 6 (the last checkpoint lost): the same weights again
    shutil.rmtree(latest_checkpoint(straight))
    train(run_config(listops_dir, straight), progress=False)
    assert_same_state(final_state(straight), final_state(halves))


def test_mismatched_checkpoints_are_refused_and_fresh_starts_over(listops_dir, tmp_path):
    run = tmp_path / "run"
    train(run_config(listops_dir, run, steps=3), progress=False)
    first = final_state(run)
    other_model = SparseClassifierConfig.tiny("hst", max_len=32, sar_alpha=0.5, dropout=0.1, dim=64)
    with pytest.raises(ValueError, match=r"other settings \(model.dim\)"):
        train(run_config(listops_dir, run, model=other_model, steps=6), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train(run_config(listops_dir, run, steps=6, lr=1e-2), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(seed\)"):
        train(run_config(listops_dir, run, steps=6, seed=1), progress=False)
    assert final_state(run)[0] == 3  # nothing was written by the refused runs
    # --fresh (resume="") clears the run, best model included, and trains the same weights again
    (run / "best" / "best.json").write_text(json.dumps({"step": 99, "val_accuracy": 2.0}))
    train(run_config(listops_dir, run, steps=3, resume=""), progress=False)
    assert_same_state(final_state(run), first)
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 3


def test_best_validation_model_is_kept(listops_dir, tmp_path):
    cfg = run_config(listops_dir, tmp_path / "run", model=SparseClassifierConfig.tiny("hst", max_len=32), steps=12,
                     eval_every=2, save_every=4, log_every=20)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="best-validation model"):
        load_trained(run, best=True)
    crash(cfg, at=6)  # evaluated at 2, 4, 6; checkpoint at 4; dies in step 7
    result = train(cfg, progress=False)  # resumes from step 4: the best so far survives
    vals = [(r["step"], r["eval"]["accuracy"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "eval" in r]
    assert [s for s, _ in vals] == [2, 4, 6, 8, 10, 12]
    top = max(a for _, a in vals)
    model, _, step = load_trained(run, best=True)
    assert step == next(s for s, a in vals if a == top)  # the earliest of equal scores
    assert result["best_val"] == {"step": step, "accuracy": top}
    assert evaluate(model, load_listops(listops_dir, "val", 32))["accuracy"] == top
    assert sorted(p.name for p in (run / "best").iterdir()) == ["best.json", "config.json", "model.safetensors"]


def test_training_fits_a_small_set(listops_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    write_tsv(small / "basic_train.tsv", [(src, tgt) for _, src, tgt in read_tsv(listops_dir / "basic_train.tsv")[:16]])
    model_cfg = SparseClassifierConfig.tiny("hst", max_len=32, dim=64, num_heads=4)
    cfg = SparseTrainConfig(model=model_cfg, data=SparseDataConfig(task="listops", path=str(small)),
                            output_dir=str(tmp_path / "fit"), steps=150, batch_size=16, lr=3e-3, warmup_steps=10,
                            save_every=150)
    result = train(cfg, progress=False)
    assert result["exported"] == str(tmp_path / "fit" / "model") and "test" not in result
    model, loaded_cfg, step = load_trained(tmp_path / "fit")
    assert loaded_cfg == model_cfg and step == 150
    assert evaluate(model, load_listops(small, "train", 32))["accuracy"] >= 0.9


def test_sincos_2d_positions_encode_row_and_column():
    from ernielab.sparse.model import sincos_2d

    codes = sincos_2d(64, width=8, dim=16)  # an 8x8 image
    row, col = codes[:, :8], codes[:, 8:]
    assert torch.equal(row[3], row[7]) and not torch.equal(row[3], row[8])  # pixels 3 and 7 share row 0
    assert torch.equal(col[3], col[11]) and not torch.equal(col[3], col[4])  # pixels 3 and 11 share column 3
    assert torch.cdist(codes[9:10], codes[[10, 17, 63]]).argmin() != 2  # a neighbour is closer than a far pixel
    for mode in ("dense", "bigbird", "hst"):
        cfg = SparseClassifierConfig.tiny(mode, pos_encoding="sincos-2d", image_width=8)
        model = SparseClassifier(cfg)
        assert "pos_emb" not in model.state_dict() and all("pos" not in n for n, _ in model.named_parameters())
        assert model(torch.randint(1, 16, (2, 64))).shape == (2, 10)
    with pytest.raises(ValueError, match="image_width"):
        SparseClassifierConfig.tiny(pos_encoding="sincos-2d")
    with pytest.raises(ValueError, match="pos_encoding: must be one of"):
        SparseClassifierConfig.tiny(pos_encoding="rope")


def test_checkpoints_from_before_new_config_fields_resume(listops_dir, tmp_path):
    """The engine's policy: a field the saved run did not have is ignored (it takes its default, which
    reproduces the old behaviour); a field it had must match."""
    model_cfg = SparseClassifierConfig.tiny("dense", max_len=32)
    run = tmp_path / "old"
    train(run_config(listops_dir, run, model=model_cfg, steps=2, save_every=2), progress=False)
    state = latest_checkpoint(run) / "state.json"
    saved = json.loads(state.read_text())
    for field in ("pos_encoding", "image_width"):  # as written before these fields existed
        del saved["config"]["model"][field]
    del saved["config"]["eval_max_batches"]
    state.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other settings \(model.dim\)"):  # a field it had must still match
        train(run_config(listops_dir, run, model=model_cfg.replace(dim=64), steps=3), progress=False)
    assert train(run_config(listops_dir, run, model=model_cfg, steps=3, save_every=2), progress=False)["step"] == 3
    assert load_trained(run)[1] == model_cfg
    with pytest.raises(ValueError, match=r"other settings \(model.image_width, model.pos_encoding\)"):
        train(run_config(listops_dir, run, model=model_cfg.replace(pos_encoding="sincos-2d", image_width=4), steps=4),
              progress=False)  # the new checkpoint has every field


def test_time_limited_run_exports_nothing_and_resumes(listops_dir, tmp_path):
    run = tmp_path / "run"
    result = train(run_config(listops_dir, run, steps=6, max_minutes=1e-9), progress=False)
    assert result["step"] == 1 and "time limit" in result["stopped"] and result["exported"] is None
    assert not (run / "model").exists() and not (run / "results.json").exists()
    assert latest_checkpoint(run).name == "step-0000001"
    result = train(run_config(listops_dir, run, steps=6), progress=False)  # the same run, no limit: finishes
    assert result["step"] == 6 and (run / "model" / "model.safetensors").is_file()


def test_bad_data_and_foreign_checkpoints_are_refused_before_writing(listops_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no listops training split"):
        train(run_config(tmp_path / "nowhere", run), progress=False)
    with pytest.raises(ValueError, match="data has 10 classes; the model has num_classes=2"):
        train(run_config(listops_dir, run, model=SparseClassifierConfig.tiny("hst", max_len=32, num_classes=2)))
    with pytest.raises(ValueError, match="fewer than batch_size 128"):
        train(run_config(listops_dir, run, batch_size=128), progress=False)
    assert not run.exists()
    # generated data made with another spec than the config's
    data = tmp_path / "gen"
    spec = ListOpsSpec(max_depth=3, max_args=3, min_length=4, max_length=30, num_train=16, num_val=4, num_test=4)
    cfg = run_config(data, run, steps=1, data=SparseDataConfig(task="listops", path=str(data), listops=spec))
    train(cfg, progress=False)
    assert (data / "listops_spec.json").is_file() and (run / "results.json").is_file()
    with pytest.raises(ValueError, match=r"generated with other settings \(num_train\)"):
        train(cfg.replace(data=cfg.data.replace(listops=spec.replace(num_train=20)), output_dir=str(tmp_path / "r2")))
    # a checkpoint that is not a sparse classifier's, and one whose weights do not fit its config
    save_checkpoint(tmp_path / "foreign", 1, {"model": {"w": torch.zeros(2)}}, {}, {"lr": 1.0})
    with pytest.raises(ValueError, match="not a sparse-classifier checkpoint"):
        load_trained(tmp_path / "foreign")
    state = latest_checkpoint(run) / "state.json"
    saved = json.loads(state.read_text())
    saved["config"]["model"]["dim"] = 64
    state.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="does not fit"):
        load_trained(run)
