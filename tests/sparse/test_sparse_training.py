"""SAR loss, configs, the training loop (learning, exact resume, refusing mismatched checkpoints)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ernielab.core.checkpoint import latest_checkpoint
from ernielab.sparse.config import PRESETS, SparseClassifierConfig
from ernielab.sparse.lra import ListOpsSpec, generate_listops, load_listops, write_tsv
from ernielab.sparse.model import SparseClassifier
from ernielab.sparse.sar import classification_loss, symmetric_kl
from ernielab.sparse.train import BatchPlan, SparseTrainConfig, evaluate, load_trained, train_classifier


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
    with pytest.raises(ValueError, match="attention must be"):
        SparseClassifierConfig.tiny("linear")
    with pytest.raises(ValueError, match="exceeds max_len"):
        SparseClassifier(SparseClassifierConfig.tiny())(torch.ones(1, 65, dtype=torch.long))


def test_batch_plan_covers_each_epoch_once():
    plan = BatchPlan([5, 1, 9, 3, 7, 2, 8, 4, 6, 0], batch_size=3, seed=0, bucket=2)
    epoch = [i for step in range(3) for i in plan(step)]
    assert len(set(epoch)) == 9 and plan(0) == BatchPlan(plan.lengths, 3, 0, 2)(0)


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops")
    spec = ListOpsSpec(max_depth=3, max_args=3, min_length=4, max_length=30, num_train=64, num_val=16, num_test=0)
    for split, rows in generate_listops(spec, seed=0, progress=False).items():
        if rows:
            write_tsv(root / f"basic_{split}.tsv", rows)
    return root


def without_times(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


def test_training_resumes_exactly(listops_dir, tmp_path):
    train, val = load_listops(listops_dir, "train", 32), load_listops(listops_dir, "val", 32)
    model_cfg = SparseClassifierConfig.tiny("hst", max_len=32, sar_alpha=0.5, dropout=0.1)
    cfg = SparseTrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=3, save_every=3,
                            log_every=1, keep_checkpoints=2)
    run = tmp_path / "run"
    train_classifier(model_cfg, cfg, train, val, run, progress=False)
    final = load_file(latest_checkpoint(run) / "model.safetensors")
    metrics = without_times(run / "metrics.jsonl")
    shutil.rmtree(latest_checkpoint(run))  # as if the run had died between step 3 and step 6
    train_classifier(model_cfg, cfg, train, val, run, progress=False)
    resumed = load_file(latest_checkpoint(run) / "model.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    assert without_times(run / "metrics.jsonl") == metrics  # records after step 3 redone, not duplicated
    split = tmp_path / "split"  # the same run in two calls: stop at step 4, then finish
    assert train_classifier(model_cfg, cfg, train, val, split, progress=False, stop_at=4)["step"] == 4
    train_classifier(model_cfg, cfg, train, val, split, progress=False)
    halves = load_file(latest_checkpoint(split) / "model.safetensors")
    assert all(torch.equal(final[k], halves[k]) for k in final)
    with pytest.raises(ValueError, match="different model config"):
        train_classifier(model_cfg.replace(dim=64), cfg, train, val, run, progress=False)
    with pytest.raises(ValueError, match="different training settings"):
        train_classifier(model_cfg, cfg.replace(lr=1e-2), train, val, run, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_classifier(model_cfg, cfg, train, val, run, resume=False, progress=False)


def test_best_validation_checkpoint_is_kept(listops_dir, tmp_path):
    train, val = load_listops(listops_dir, "train", 32), load_listops(listops_dir, "val", 32)
    model_cfg = SparseClassifierConfig.tiny("hst", max_len=32)
    cfg = SparseTrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=2, save_every=4)
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="best-validation checkpoint"):
        load_trained(run, best=True)
    train_classifier(model_cfg, cfg, train, val, run, progress=False, stop_at=6)
    train_classifier(model_cfg, cfg, train, val, run, progress=False)  # the best so far survives the resume
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "val"]
    top = max(r["accuracy"] for r in vals)
    model, _, step = load_trained(run, best=True)
    assert step == next(r["step"] for r in vals if r["accuracy"] == top)  # the earliest of equal scores
    assert evaluate(model, val)["accuracy"] == top
    assert len(list((run / "best" / "checkpoints").iterdir())) == 1


def test_training_fits_a_small_set(listops_dir, tmp_path):
    train = load_listops(listops_dir, "train", 32)
    train.sequences, train.labels = train.sequences[:16], train.labels[:16]
    model_cfg = SparseClassifierConfig.tiny("hst", max_len=32, dim=64, num_heads=4)
    cfg = SparseTrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, save_every=150)
    train_classifier(model_cfg, cfg, train, None, tmp_path / "fit", progress=False)
    model, loaded_cfg, step = load_trained(tmp_path / "fit")
    assert loaded_cfg == model_cfg and step == 150
    assert evaluate(model, train)["accuracy"] >= 0.9


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
    with pytest.raises(ValueError, match="pos_encoding must be"):
        SparseClassifierConfig.tiny(pos_encoding="rope")


def test_checkpoints_from_before_new_config_fields_resume(listops_dir, tmp_path):
    train = load_listops(listops_dir, "train", 32)
    model_cfg = SparseClassifierConfig.tiny("dense", max_len=32)
    cfg = SparseTrainConfig(steps=3, batch_size=8, warmup_steps=1, save_every=2)
    run = tmp_path / "old"
    train_classifier(model_cfg, cfg, train, None, run, progress=False, stop_at=2)
    state = latest_checkpoint(run) / "state.json"
    saved = json.loads(state.read_text())
    for field in ("pos_encoding", "image_width"):  # as written before these fields existed
        del saved["config"]["model"][field]
    state.write_text(json.dumps(saved))
    assert train_classifier(model_cfg, cfg, train, None, run, progress=False)["step"] == 3
    with pytest.raises(ValueError, match="different model config"):  # a real difference is still refused
        train_classifier(model_cfg.replace(pos_encoding="sincos-2d", image_width=4), cfg.replace(steps=4), train,
                         None, run, progress=False)
