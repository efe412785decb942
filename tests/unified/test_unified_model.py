"""Unified model: sequence layout, group decoding, KV cache, modality-agnostic routing, elastic sub-models."""
import pytest
import torch

from ernielab.unified.config import ElasticConfig, UnifiedConfig, VQConfig
from ernielab.unified.evaluation import caption_accuracy, heldout
from ernielab.unified.generate import caption_codes, generate_image_codes
from ernielab.unified.io import load_model, save_model
from ernielab.unified.model import IGNORE, IMAGE, TEXT, SubModel, UnifiedTransformer, parameter_counts, unified_loss
from ernielab.unified.sequences import (
    collate,
    image_to_text_sequence,
    model_inputs,
    text_sequence,
    text_to_image_sequence,
)
from ernielab.unified.submodel import (
    cut_submodel,
    describe_submodel,
    evenly_spaced_layers,
    extract_submodel,
    half_active_cut,
    sample_submodel,
)
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer, build_text_vocab
from ernielab.unified.vq import VQTokenizer


@pytest.fixture(scope="module")
def vocab():
    return build_text_vocab()


def make_model(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=vocab, num_layers=3, **kw))
    for name, p in model.named_parameters():  # untrained heads are near zero: make outputs informative
        if "head" in name or "embed" in name or "image_pos" in name:
            torch.nn.init.normal_(p, std=1.0)
    for _, moe in model.moe_layers():
        moe.router.gate_mass.copy_(torch.rand(moe.num_experts))
    return model.eval()


def test_text_tokenizer_round_trip(vocab):
    tok = TextTokenizer(vocab)
    ids = tok.encode("a photo of three small yellow triangles to the left of a purple circle")
    assert ids[0] == BOS and ids[-1] == EOS and len(tok) == len(vocab) < 100
    assert tok.decode(ids[1:]) == "a photo of three small yellow triangles to the left of a purple circle"
    assert "[UNK]" in tok.decode(tok.encode("a zebra")[1:])
    with pytest.raises(ValueError, match="max_text_len"):
        tok.encode("a red circle " * 10, max_len=8)


def test_vq_round_trip_shapes():
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny())
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    recon, parts = vq.train()(images)
    assert recon.shape == images.shape and parts["codes"].shape == (3, 4, 4) and parts["loss"].ndim == 0
    vq.eval()
    codes = vq.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 16
    assert vq.decode(codes).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="expects images"):
        vq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="code ids"):
        vq.decode(torch.full((1, 4, 4), 99))


def test_sequence_layout_and_targets():
    codes = torch.arange(16).view(4, 4)
    t2i = collate([text_to_image_sequence([BOS, 7, 8, EOS], codes)])
    g = 4
    assert t2i["tokens"].shape[1] == 4 + g * g  # text + start row + rows 0..2
    assert (t2i["text_target"] == IGNORE).all()  # the caption is a condition here
    assert t2i["image_target"][0, 4:].tolist() == codes.flatten().tolist()
    assert t2i["group"][0].tolist() == [0, 1, 2, 3] + [4] * g + [5] * g + [6] * g + [7] * g
    i2t = collate([image_to_text_sequence(codes, [BOS, 7, EOS])])
    assert (i2t["image_target"] == IGNORE).all() and i2t["text_target"][0, -3:].tolist() == [7, EOS, IGNORE]
    padded = collate([text_sequence([BOS, 5, EOS], 4), text_sequence([BOS, EOS], 4)])
    assert padded["valid"].sum(1).tolist() == [3, 2] and padded["text_target"][1].tolist() == [EOS, IGNORE, IGNORE]


def test_image_rows_only_see_earlier_rows(vocab):
    model = make_model(vocab)
    codes = torch.randint(0, 16, (4, 4))
    changed = codes.clone()
    changed[2] = (changed[2] + 1) % 16
    logits = []
    for c in (codes, changed):
        batch = collate([text_to_image_sequence([BOS, 9, EOS], c)])
        h = model(**model_inputs(batch))
        logits.append(model.image_logits(h[0, 3:]).view(4, 4, -1))  # block b predicts row b
    torch.testing.assert_close(logits[0][:3], logits[1][:3])  # rows 0..2 do not see row 2's codes
    assert not torch.allclose(logits[0][3], logits[1][3])  # row 3 does


def test_group_decoding_emits_a_row_per_step_and_matches_full_forward(vocab):
    model = make_model(vocab)
    tok = TextTokenizer(vocab)
    prompts = [tok.encode("a red circle"), tok.encode("two blue squares above a green triangle")]
    chunks = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: chunks.append(kwargs["tokens"].shape),
                                       with_kwargs=True)
    codes, steps = generate_image_codes(model, prompts, temperature=0.0)
    hook.remove()
    g = model.config.image_grid
    assert codes.shape == (2, g, g) and steps == g == len(chunks)
    assert all(shape == (2, g) for shape in chunks[1:])  # after the prompt, every step feeds one whole row
    # the cached row-by-row greedy decode equals teacher forcing with its own output in one pass
    batch = collate([text_to_image_sequence(p, c) for p, c in zip(prompts, codes)])
    h = model(**model_inputs(batch))
    sel = batch["image_target"] != IGNORE
    assert torch.equal(model.image_logits(h[sel]).argmax(-1), codes.flatten())


def test_guided_generation_and_captioning_with_cache(vocab):
    model = make_model(vocab)
    tok = TextTokenizer(vocab)
    gen = torch.Generator().manual_seed(0)
    codes, _ = generate_image_codes(model, [tok.encode("a red circle")], guidance=3.0, top_k=5, generator=gen)
    assert codes.shape == (1, 4, 4)
    ids, steps = caption_codes(model, codes, max_len=6)
    assert len(ids) == 1 and 1 <= steps <= 5 and len(ids[0]) <= 5
    full = collate([image_to_text_sequence(codes[0], [BOS] + ids[0])])
    h = model(**model_inputs(full))
    greedy = model.text_logits(h[0, -len(ids[0]) - 1:-1]).argmax(-1) if ids[0] else torch.empty(0)
    assert greedy.tolist() == ids[0]


def test_caption_accuracy_per_item_outcomes(vocab):
    model = make_model(vocab)
    vq = VQTokenizer(VQConfig.tiny())
    images, _ = heldout(6, vq.config.image_size)
    report = caption_accuracy(model, vq, TextTokenizer(vocab), images, batch_size=4, per_item=True)
    assert len(report["correct"]) == report["n"] == 6 and report["accuracy"] == sum(report["correct"]) / 6
    assert "correct" not in caption_accuracy(model, vq, TextTokenizer(vocab), images[:2])


def test_routing_never_sees_the_modality(vocab):
    model = make_model(vocab)
    torch.manual_seed(1)
    x = torch.randn(1, 10, model.config.dim)
    model.embed = lambda tokens, modality, cell: x  # identical inputs whatever the modality says
    common = dict(tokens=torch.zeros(1, 10, dtype=torch.long), cell=torch.zeros(1, 10, dtype=torch.long),
                  group=torch.arange(10)[None], valid=torch.ones(1, 10, dtype=torch.bool))
    outs, routes = [], []
    for modality in (TEXT, IMAGE):
        outs.append(model(modality=torch.full((1, 10), modality), **common))
        routes.append(model.routing())
    torch.testing.assert_close(outs[0], outs[1])
    assert all(torch.equal(routes[0][i], routes[1][i]) for i in routes[0])


def test_extracted_submodel_matches_elastic_run(vocab, tmp_path):
    model = make_model(vocab)
    codes = torch.randint(0, 16, (2, 4, 4))
    batch = collate([image_to_text_sequence(codes[0], [BOS, 6, 7, EOS]),
                     text_to_image_sequence([BOS, 9, EOS], codes[1])])
    inputs = model_inputs(batch)
    sub = describe_submodel(model, depth=2, num_experts=4, top_k=1)
    assert sub.layers == (0, 2) and all(int(m.sum()) == 4 for m in sub.expert_masks.values())
    small = extract_submodel(model, sub)
    assert small.config.num_layers == 2 and small.config.num_experts == 4 and small.config.top_k == 1
    torch.testing.assert_close(small(**inputs), model(**inputs, sub=sub), atol=1e-5, rtol=1e-5)
    full, part = parameter_counts(model), parameter_counts(small)
    assert part["total"] < full["total"] and part["active"] < full["active"]
    # the saved standalone checkpoint reproduces it too
    from ernielab.unified.config import VQConfig

    save_model(tmp_path / "small", small, VQTokenizer(VQConfig.tiny()), {"note": "test"})
    loaded, vq, meta = load_model(tmp_path / "small")
    torch.testing.assert_close(loaded(**inputs), small(**inputs))
    assert meta == {"note": "test"} and vq.config.grid == 4


def test_submodel_validation(vocab):
    model = make_model(vocab)
    assert evenly_spaced_layers(4, 3) == (0, 2, 3) and evenly_spaced_layers(3, 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="top_k"):
        describe_submodel(model, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="layers"):
        model(**model_inputs(collate([text_sequence([BOS, EOS], 4)])), sub=SubModel(layers=(5,)))
    dense = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=vocab).dense_twin())
    with pytest.raises(ValueError, match="dense"):
        describe_submodel(dense, top_k=1)


def test_elastic_sampling_proportions(vocab):
    cfg = UnifiedConfig.tiny(text_vocab=vocab, num_layers=4)
    gen = torch.Generator().manual_seed(0)
    subs = [sample_submodel(cfg, gen) for _ in range(2000)]
    full_depth = sum(s.layers is None for s in subs) / len(subs)
    all_experts = sum(s.expert_masks is None for s in subs) / len(subs)
    default_k = sum(s.top_k is None for s in subs) / len(subs)
    assert abs(full_depth - 0.75) < 0.04 and abs(all_experts - 0.8) < 0.04 and abs(default_k - 0.8) < 0.04
    for s in subs:
        if s.layers is not None:
            assert 2 <= len(s.layers) <= 3 and list(s.layers) == sorted(set(s.layers))
        if s.expert_masks is not None:
            assert all(cfg.top_k <= int(m.sum()) < cfg.num_experts for m in s.expert_masks.values())
        if s.top_k is not None:
            assert 1 <= s.top_k < cfg.top_k


def test_coupled_elastic_sampling_keeps_marginals_and_shrinks_together(vocab):
    cfg = UnifiedConfig.tiny(text_vocab=vocab, num_layers=4)
    gen = torch.Generator().manual_seed(0)
    subs = [sample_submodel(cfg, gen, coupled=True) for _ in range(2000)]
    assert not cfg.elastic.coupled  # the keyword changes this draw's settings only
    shrunk = [(s.layers is not None, s.expert_masks is not None, s.top_k is not None) for s in subs]
    rate = [sum(flags[i] for flags in shrunk) / len(subs) for i in range(3)]
    assert abs(rate[0] - 0.25) < 0.04 and abs(rate[1] - 0.2) < 0.04 and abs(rate[2] - 0.2) < 0.04
    # one draw decides all three: experts or k never shrink without depth, and always together
    assert all(e == k and (d or not e) for d, e, k in shrunk)
    assert abs(sum(all(flags) for flags in shrunk) / len(subs) - 0.2) < 0.04


def test_nested_elastic_draws_are_the_cuts_extraction_makes(vocab):
    cfg = UnifiedConfig.tiny(text_vocab=vocab, num_layers=4, elastic=ElasticConfig(nested=True))
    model = UnifiedTransformer(cfg)
    gen = torch.Generator().manual_seed(0)
    subs = [sample_submodel(cfg, gen) for _ in range(400)]
    assert abs(sum(s.layers is None for s in subs) / len(subs) - 0.75) < 0.07
    drawn = [s for s in subs if s.layers is not None and s.expert_masks is not None]
    assert drawn
    for s in drawn:
        kept = int(s.expert_masks[s.layers[0]].sum())
        cut = describe_submodel(model, depth=len(s.layers), num_experts=kept)
        assert s.layers == cut.layers and s.layers in {(0, 2, 3), (0, 3)}
        for i in s.layers:  # experts 0..kept-1, whatever the training load
            assert torch.equal(s.expert_masks[i], cut.expert_masks[i]) and bool(s.expert_masks[i][:kept].all())
    assert extract_submodel(model, cut).config.elastic.nested
    other = {i: torch.arange(cfg.num_experts) % 2 == 1 for i in range(cfg.num_layers)}
    assert not extract_submodel(model, SubModel(expert_masks=other)).config.elastic.nested


def test_anchor_draws_replace_shrunken_steps_only(vocab):
    cfg = UnifiedConfig.tiny(text_vocab=vocab, num_layers=4, num_experts=8, top_k=4,
                             elastic=ElasticConfig(nested=True, coupled=True))
    cut = cut_submodel(cfg, *half_active_cut(cfg))
    assert half_active_cut(cfg) == (3, 4, 1) and cut.layers == (0, 2, 3) and cut.top_k == 1
    assert all(m.tolist() == [True] * 4 + [False] * 4 for m in cut.expert_masks.values())
    same = lambda a, b: a.layers == b.layers and a.top_k == b.top_k and (
        (a.expert_masks is None) == (b.expert_masks is None)
        and all(torch.equal(a.expert_masks[i], b.expert_masks[i]) for i in a.expert_masks or {}))
    always = never = anchored = 0
    for seed in range(600):  # a fresh generator per draw, as training uses one per step
        plain = sample_submodel(cfg, torch.Generator().manual_seed(seed))
        forced = sample_submodel(cfg, torch.Generator().manual_seed(seed), anchor=1.0)
        half = sample_submodel(cfg, torch.Generator().manual_seed(seed), cfg.elastic.replace(anchor=0.5))
        # the full model keeps exactly its steps; anchor = 1 turns every other step into the cut
        assert plain.is_full() == forced.is_full() == half.is_full()
        if plain.is_full():
            continue
        assert same(forced, cut) and (same(half, cut) or same(half, plain))
        never += same(plain, cut)
        anchored += same(half, cut)
        always += 1
    assert abs(always / 600 - 0.25) < 0.05
    assert never / always < 0.1 and abs(anchored / always - 0.5) < 0.12
    with pytest.raises(ValueError, match="does not fit"):
        cut_submodel(cfg, 3, 2, 4)  # fewer experts than k
    with pytest.raises(ValueError, match="does not fit"):
        cut_submodel(cfg, 5, 4, 1)


def test_loss_has_all_parts_and_decreases(vocab):
    model = make_model(vocab).train()
    codes = torch.randint(0, 16, (4, 4))
    batch = collate([text_to_image_sequence([BOS, 9, 10, EOS], codes),
                     image_to_text_sequence(codes, [BOS, 9, 10, 11, EOS])])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        sub = SubModel(top_k=1) if step % 3 == 2 else None
        loss, parts = unified_loss(model, batch, sub)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(parts) == {"text", "mtp1", "mtp2", "image"}
    assert losses[-1] < 0.5 * losses[0]


def test_selection_on_val_picks_lowest_loss_choices(vocab):
    from ernielab.unified.evaluation import heldout
    from ernielab.unified.selection import heldout_loss, select_submodel, selection_set

    model = make_model(vocab)  # 3 layers, 8 experts, top-2
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny()).eval()
    tok = TextTokenizer(vocab)
    # the selection set is val items far past those evaluation reads: the same items only at offset 0
    _, captions = heldout(3, 16)
    evaluated = collate([text_sequence(tok.encode(c), 4) for c in captions])["tokens"]
    assert torch.equal(selection_set(vq, tok, 3, offset=0)["text"]["tokens"], evaluated)
    batches = selection_set(vq, tok, 6)
    assert not torch.equal(batches["text"]["tokens"][:3, :evaluated.shape[1]], evaluated)

    sub, report = select_submodel(model, vq, depth=2, num_experts=5, top_k=1, n=6)
    # dropping one layer is exhaustive: the chosen pair has the lowest loss of the three
    losses = {layers: heldout_loss(model, batches, SubModel(layers=layers, top_k=1))
              for layers in [(0, 1), (0, 2), (1, 2)]}
    assert sub.layers == min(losses, key=losses.get)
    assert sub.top_k == 1 and set(sub.expert_masks) == set(sub.layers)
    assert all(int(m.sum()) == 5 for m in sub.expert_masks.values())
    assert report["loss"] == pytest.approx(heldout_loss(model, batches, sub))
    small = extract_submodel(model, sub)
    inputs = model_inputs(batches["i2t"])
    torch.testing.assert_close(small(**inputs), model(**inputs, sub=sub), atol=1e-5, rtol=1e-5)


def test_expert_selection_drops_the_least_needed_expert(vocab):
    from ernielab.unified.selection import heldout_loss, select_experts, selection_set

    model = make_model(vocab)
    vq = VQTokenizer(VQConfig.tiny()).eval()
    batches = selection_set(vq, TextTokenizer(vocab), 6)
    masks, trace = select_experts(model, batches, (0,), num_experts=7)
    scores = []
    for e in range(8):
        mask = torch.ones(8, dtype=torch.bool)
        mask[e] = False
        scores.append(heldout_loss(model, batches, SubModel(layers=(0,), expert_masks={0: mask})))
    assert int((~masks[0]).nonzero()) == min(range(8), key=scores.__getitem__) == trace[0]["dropped_expert"]


def test_inplace_distillation_teaches_the_submodel_the_full_models_predictions(vocab):
    from ernielab.unified.model import full_model_logits
    model = make_model(vocab).train()
    codes = torch.randint(0, 16, (4, 4))
    batch = collate([text_to_image_sequence([BOS, 9, 10, EOS], codes),
                     image_to_text_sequence(codes, [BOS, 9, 10, 11, EOS])])
    loads = [moe.router.pending_load.clone() for _, moe in model.moe_layers()]
    teacher = full_model_logits(model, batch)
    assert model.training and set(teacher) == {"text", "image"}
    # the teacher pass leaves no expert load for the routing-bias update
    assert all(torch.equal(a, moe.router.pending_load) for a, (_, moe) in zip(loads, model.moe_layers()))
    # the full model taught by itself: zero KL; a sub-model differs, and distillation pulls it closer
    _, parts = unified_loss(model, batch, None, teacher=teacher, distill_weight=1.0)
    assert parts["text_kd"] < 1e-6 and parts["image_kd"] < 1e-6
    sub = SubModel(layers=(0, 2), top_k=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    kds = []
    for _ in range(15):  # a large weight: the KL dominates the labels' cross-entropy
        loss, parts = unified_loss(model, batch, sub, mtp_weight=0.0, teacher=teacher, distill_weight=20.0)
        kds.append(parts["text_kd"] + parts["image_kd"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kds[0] > 1e-3 and kds[-1] < 0.5 * kds[0]
    _, plain = unified_loss(model, batch, sub, teacher=teacher, distill_weight=0.0)
    assert "text_kd" not in plain


def test_next_scale_configs_compare_at_equal_budget():
    """The shipped rows-vs-scales pair differs only in the image order and its tokenizer (same codebook, steps)."""
    from pathlib import Path

    from ernielab.core.cli import load_config
    from ernielab.unified.io import vq_mismatch
    from ernielab.unified.train import UnifiedTrainConfig, VQTrainConfig

    configs = Path(__file__).resolve().parents[2] / "configs" / "unified"
    rows, scales = (load_config(UnifiedTrainConfig, configs / f"next_scale_{n}.json") for n in ("rows", "scales"))
    vq_rows, vq_scales = (load_config(VQTrainConfig, configs / f"{n}.json") for n in ("vq", "vq_scales"))
    assert scales.model.image_order == "scales" and rows.model.image_order == "rows"
    assert rows.replace(output_dir="", vq_dir="") == scales.replace(
        output_dir="", vq_dir="", model=scales.model.replace(image_order="rows", image_scales=()))
    assert vq_mismatch(vq_scales.model, scales.model) is None and vq_mismatch(vq_rows.model, rows.model) is None
    assert vq_scales.steps == vq_rows.steps and vq_scales.model.codebook_size == vq_rows.model.codebook_size
    assert scales.vq_dir == vq_scales.output_dir
