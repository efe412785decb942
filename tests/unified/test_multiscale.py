"""Next-scale image generation: the multi-scale residual VQ, the scale-wise sequence layout (mask, positions),
training, decoding one scale per step, resume, and the rows path left exactly as it was."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernielab.core.config import ConfigError
from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.generate import caption_codes, generate_image_codes
from ernielab.unified.io import load_model, save_model
from ernielab.unified.model import (
    IGNORE,
    IMAGE_START,
    UnifiedTransformer,
    attention_mask,
    unified_loss,
)
from ernielab.unified.sequences import (
    collate,
    image_to_text_sequence,
    model_inputs,
    parent_cells,
    text_to_image_sequence,
)
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer, build_text_vocab
from ernielab.unified.train import UnifiedTask, UnifiedTrainConfig, VQTrainConfig, render_split, train_unified, train_vq
from ernielab.unified.vq import NO_CODE, VQTokenizer, scales_of

ROWS_REFERENCE = Path(__file__).parent / "data" / "rows_reference.safetensors"


def rows_reference_outputs() -> dict[str, torch.Tensor]:
    """Outputs of the row-by-row path on a tiny dense model and VQ (dense: the MoE layer is not what this
    guards). tests/unified/data/rows_reference.safetensors holds them as computed before next-scale
    generation was added (`python tests/unified/test_multiscale.py --write-rows-reference`)."""
    torch.manual_seed(0)
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=build_text_vocab(), dense_hidden=48, num_layers=2))
    for name, p in model.named_parameters():  # untrained heads are near zero: make outputs informative
        if "head" in name or "embed" in name or "image_pos" in name:
            torch.nn.init.normal_(p, std=1.0)
    codes = torch.randint(0, 16, (2, 4, 4))
    batch = collate([text_to_image_sequence([BOS, 9, 10, EOS], codes[0]),
                     image_to_text_sequence(codes[1], [BOS, 9, 10, 11, EOS])])
    out = {"hidden": model.eval()(**model_inputs(batch)).detach()}
    greedy, _ = generate_image_codes(model, [[BOS, 9, EOS], [BOS, 12, 13, EOS]], temperature=0.0)
    sampled, _ = generate_image_codes(model, [[BOS, 9, EOS]], guidance=2.0, top_k=4,
                                      generator=torch.Generator().manual_seed(3))
    captions, _ = caption_codes(model, codes, max_len=6)
    out.update(greedy=greedy, sampled=sampled, captions=torch.tensor([c + [-1] * (6 - len(c)) for c in captions]))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss, _ = unified_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    out["losses"] = torch.stack(losses)
    out["head_after_training"] = model.image_head.weight.detach().clone()
    torch.manual_seed(1)
    vq = VQTokenizer(VQConfig.tiny())
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    vq.train()(images)  # initialises the codebook from data
    recon, parts = vq(images)
    out.update(vq_recon=recon.detach(), vq_codes=parts["codes"], vq_encoded=vq.eval().encode(images))
    return {k: v.contiguous() for k, v in out.items()}


def rows_reference_one_thread() -> dict[str, torch.Tensor]:
    """On one thread: some CPU kernels (the VQ's transposed conv) sum in a thread-dependent order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rows_reference_outputs()
    finally:
        torch.set_num_threads(threads)


def test_rows_path_is_unchanged():
    reference = load_file(str(ROWS_REFERENCE))
    outputs = rows_reference_one_thread()
    assert set(outputs) == set(reference)
    for name, value in outputs.items():
        assert torch.equal(value, reference[name]), name


SCALES = (1, 2, 4)  # the tiny VQ's 4x4 grid


@pytest.fixture(scope="module")
def vocab():
    return build_text_vocab()


def scales_model(vocab, seed=0, **kw) -> UnifiedTransformer:
    torch.manual_seed(seed)
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=vocab, image_order="scales", image_scales=SCALES, **kw))
    for name, p in model.named_parameters():  # untrained heads are near zero: make outputs informative
        if "head" in name or "embed" in name or "image_pos" in name:
            torch.nn.init.normal_(p, std=1.0)
    return model.eval()


def random_scale_codes(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.full((n, len(SCALES), 4, 4), NO_CODE)
    for k, side in enumerate(SCALES):
        codes[:, k, :side, :side] = torch.randint(0, 16, (n, side, side), generator=gen)
    return codes


def shapes_images(n: int) -> torch.Tensor:
    images, _ = render_split(n, 16, seed=0)
    return images.float().div(127.5).sub(1)


def test_multiscale_codes_say_which_scales_they_hold():
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny(scales=SCALES)).eval()
    codes = vq.encode(shapes_images(3))
    assert codes.shape == (3, 3, 4, 4) and scales_of(codes) == SCALES
    for k, side in enumerate(SCALES):  # each scale fills its corner, NO_CODE elsewhere
        assert (codes[:, k, :side, :side] >= 0).all() and int((codes[:, k] == NO_CODE).sum()) == 3 * (16 - side * side)
    assert vq.decode(codes).shape == (3, 3, 16, 16)
    bad = codes.clone()
    bad[1, 2, 3, 3] = 99
    with pytest.raises(ValueError, match="code ids"):
        vq.decode(bad)
    with pytest.raises(ValueError, match="holding scales"):
        vq.decode(codes[:, :2])
    with pytest.raises(ConfigError, match="scales must increase"):
        VQConfig.tiny(scales=(1, 2)).validate()  # the last scale must be the full grid


def test_residual_tokenizer_reconstructs_better_with_more_scales():
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny(scales=SCALES))
    images = shapes_images(16)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    for _ in range(40):
        _, parts = vq.train()(images)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    vq.eval()
    codes, z = vq.encode(images), vq.encode_latent(images)
    latent_errors = [float((vq.latent(codes, k) - z).pow(2).mean()) for k in range(1, len(SCALES) + 1)]
    with torch.no_grad():
        pixel_errors = [float((vq.decode(codes, k).clamp(-1, 1) - images).pow(2).mean()) for k in (1, 3)]
    assert all(a > b for a, b in zip(latent_errors, latent_errors[1:])), latent_errors
    assert latent_errors[-1] < 0.5 * latent_errors[0], latent_errors
    assert pixel_errors[1] < pixel_errors[0], pixel_errors
    torch.testing.assert_close(vq.decode(codes), vq(images)[0])  # decode = the forward's reconstruction


def test_scale_mask_is_causal_over_scales_and_bidirectional_within_one():
    codes = random_scale_codes(1)[0]
    batch = collate([text_to_image_sequence([BOS, 9, EOS], codes)])
    # 3 text tokens, then blocks of 1, 4, 16 positions (start slot, scale 0 at 2x2, scale 1 at 4x4)
    block = [None] * 3 + [0] + [1] * 4 + [2] * 16
    assert batch["tokens"].shape[1] == len(block) and batch["modality"][0, 3] == IMAGE_START
    expected = torch.zeros(len(block), len(block), dtype=torch.bool)
    for i, bi in enumerate(block):
        for j, bj in enumerate(block):
            expected[i, j] = (j <= i) if bj is None and bi is None else bj is None or (bi is not None and bj <= bi)
    assert torch.equal(attention_mask(batch["group"], batch["group"], batch["valid"])[0], expected)
    # targets: block k predicts scale k; inputs: each cell holds its parent's code in the coarser scale
    scale_codes = [codes[k, :n, :n].flatten().tolist() for k, n in enumerate(SCALES)]
    assert batch["image_target"][0, 3:].tolist() == sum(scale_codes, [])
    assert batch["tokens"][0, 4:8].tolist() == [scale_codes[0][0]] * 4
    assert batch["tokens"][0, 8:].tolist() == [scale_codes[1][p] for p in parent_cells(4, 2).tolist()]
    assert parent_cells(4, 2).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    i2t = collate([image_to_text_sequence(codes, [BOS, 7, EOS])])  # + the last scale itself, then the caption
    assert i2t["tokens"].shape[1] == 1 + 4 + 16 + 16 + 3 and (i2t["image_target"] == IGNORE).all()
    assert i2t["tokens"][0, 21:37].tolist() == scale_codes[2]


def test_scales_only_see_coarser_scales(vocab):
    model = scales_model(vocab)
    codes = random_scale_codes(1)[0]
    changed = codes.clone()
    changed[1, :2, :2] = (changed[1, :2, :2] + 1) % 16  # scale 1
    logits = []
    for c in (codes, changed):
        h = model(**model_inputs(collate([text_to_image_sequence([BOS, 9, EOS], c)])))
        logits.append(model.image_logits(h[0, 3:]))
    torch.testing.assert_close(logits[0][:5], logits[1][:5])  # blocks predicting scales 0 and 1
    assert not torch.allclose(logits[0][5:], logits[1][5:])  # the block predicting scale 2 sees scale 1


def test_positions_are_group_h_w(vocab):
    model = scales_model(vocab)
    batch = collate([text_to_image_sequence([BOS, 9, EOS], random_scale_codes(1)[0])])
    pos = model.scale_positions(batch["modality"], batch["cell"], batch["group"], batch["valid"])[0]
    assert pos[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]  # text: its group on every axis
    assert pos[3].tolist() == [3, 1.5, 1.5]  # the one start slot: the centre of the 4x4 grid
    assert pos[4:8].tolist() == [[4, h, w] for h in (0.5, 2.5) for w in (0.5, 2.5)]  # 2x2 cells' centres
    assert pos[8:].tolist() == [[5, h, w] for h in range(4) for w in range(4)]
    assert model.rope_axes() == (8, 4, 4) and model.image_pos.num_embeddings == 1 + 4 + 16 + 16
    assert "cell_centres" not in model.state_dict()  # derived from the config, not a weight
    with pytest.raises(ConfigError, match="image_scales must increase"):
        UnifiedConfig.tiny(text_vocab=vocab, image_order="scales", image_scales=(1, 2)).validate()
    with pytest.raises(ConfigError, match="image_order is 'rows'"):
        UnifiedConfig.tiny(text_vocab=vocab, image_scales=SCALES).validate()


def test_training_a_few_steps_lowers_the_loss(vocab):
    model = scales_model(vocab).train()
    codes = random_scale_codes(2)
    batch = collate([text_to_image_sequence([BOS, 9, 10, EOS], codes[0]),
                     image_to_text_sequence(codes[1], [BOS, 9, 10, 11, EOS])])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, parts = unified_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert {"text", "image"} <= set(parts) and losses[-1] < 0.5 * losses[0]


def test_generation_takes_one_step_per_scale_and_matches_teacher_forcing(vocab):
    model = scales_model(vocab)
    tok = TextTokenizer(vocab)
    prompts = [tok.encode("a red circle"), tok.encode("two blue squares above a green triangle")]
    chunks = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: chunks.append(kwargs["tokens"].shape),
                                       with_kwargs=True)
    codes, steps = generate_image_codes(model, prompts, temperature=0.0)
    hook.remove()
    assert steps == len(SCALES) == len(chunks) and chunks[1:] == [(2, 4), (2, 16)]  # a whole scale per step
    assert codes.shape == (2, 3, 4, 4) and scales_of(codes) == SCALES
    batch = collate([text_to_image_sequence(p, c) for p, c in zip(prompts, codes)])
    h = model(**model_inputs(batch))
    sel = batch["image_target"] != IGNORE
    assert torch.equal(model.image_logits(h[sel]).argmax(-1), codes[codes != NO_CODE])
    torch.manual_seed(0)
    vq = VQTokenizer(VQConfig.tiny(scales=SCALES)).eval()
    assert vq.decode(codes).shape == (2, 3, 16, 16)  # a valid image
    sampled, _ = generate_image_codes(model, prompts[:1], guidance=3.0, top_k=5,
                                      generator=torch.Generator().manual_seed(0))
    assert scales_of(sampled) == SCALES and 0 <= int(sampled[sampled != NO_CODE].min())
    ids, _ = caption_codes(model, sampled, max_len=6)  # the cached caption equals the full forward's greedy
    h = model(**model_inputs(collate([image_to_text_sequence(sampled[0], [BOS] + ids[0])])))
    assert model.text_logits(h[0, -len(ids[0]) - 1:-1]).argmax(-1).tolist() == ids[0]


@pytest.fixture(scope="module")
def scales_vq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq_scales")
    result = train_vq(VQTrainConfig(output_dir=str(out), model=VQConfig.tiny(scales=SCALES), steps=3, batch_size=4,
                                    train_size=16, eval_size=4, save_every=2))
    assert result["eval"]["codes_used"] >= 1
    return out


def tiny_run(out, vq_dir, **kw) -> UnifiedTrainConfig:
    model = UnifiedConfig.tiny(image_order="scales", image_scales=SCALES)
    return UnifiedTrainConfig(**{**dict(output_dir=str(out), vq_dir=str(vq_dir), model=model, steps=4, batch_size=2,
                                        train_size=16, save_every=2, log_every=1), **kw})


def test_engine_training_resumes_exactly(scales_vq_dir, tmp_path, train_until_killed):
    train_unified(tiny_run(tmp_path / "straight", scales_vq_dir))

    train_until_killed(tiny_run(tmp_path / "resumed", scales_vq_dir), 3)  # killed after its step-2 checkpoint ...
    assert train_unified(tiny_run(tmp_path / "resumed", scales_vq_dir))["step"] == 4  # ... and started again
    a, vq, _ = load_model(tmp_path / "straight" / "model")
    b, _, _ = load_model(tmp_path / "resumed" / "model")
    assert a.config.image_order == "scales" and vq.config.scales == SCALES
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    codes, steps = generate_image_codes(a, [[BOS, EOS]], temperature=0.0)
    assert steps == 3 and vq.decode(codes).shape == (1, 3, 16, 16)


def test_a_model_and_vq_of_different_layouts_are_refused(scales_vq_dir, tmp_path):
    with pytest.raises(ValueError, match="does not match the model"):
        UnifiedTask(tiny_run(tmp_path, scales_vq_dir, model=UnifiedConfig.tiny()))  # rows model, multi-scale VQ
    model = UnifiedTransformer(UnifiedConfig.tiny(text_vocab=build_text_vocab()))
    save_model(tmp_path / "m", model, VQTokenizer(VQConfig.tiny(scales=SCALES)))
    with pytest.raises(ValueError, match="does not match the model"):
        load_model(tmp_path / "m")
    assert not (tmp_path / "model").exists()


if __name__ == "__main__":
    import sys

    if "--write-rows-reference" in sys.argv:
        ROWS_REFERENCE.parent.mkdir(exist_ok=True)
        save_file(rows_reference_one_thread(), str(ROWS_REFERENCE))


def test_speculative_captions_of_a_scales_model_equal_greedy(vocab):
    """MTP self-speculative decoding reads the model's image layout too: multi-scale codes, greedy's captions."""
    from ernielab.unified.generate import caption_codes
    from ernielab.unified.speculative import speculative_caption_codes

    model = scales_model(vocab, seed=3)
    codes = random_scale_codes(4, seed=2)
    greedy, _ = caption_codes(model, codes)
    spec, stats = speculative_caption_codes(model, codes, draft_heads=2)
    assert spec == greedy and stats.accepted <= stats.drafted
