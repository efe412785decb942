"""Self-speculative caption decoding with the MTP heads: greedy decoding's captions token for token, and
bookkeeping that matches a teacher-forced replay of the acceptance rule."""
import json

import pytest
import torch

from ernielab.unified.config import UnifiedConfig, VQConfig
from ernielab.unified.generate import caption_codes
from ernielab.unified.model import UnifiedTransformer, unified_loss
from ernielab.unified.sequences import SequenceBuilder, collate, image_to_text_sequence, model_inputs
from ernielab.unified.speculative import speculative_caption_codes
from ernielab.unified.tokenizer import BOS, EOS, TextTokenizer, build_text_vocab
from ernielab.worlds.shapes import caption, sample_item_scene

PAIRS = 16  # image i is the constant code i, captioned with training caption i


@pytest.fixture(scope="module")
def half_trained():
    """A tiny MoE fitted for 40 steps to 16 (image, caption) pairs: its MTP drafts are right about a third of the
    time and its captions differ in length (one runs to the length limit), so every branch of the bookkeeping
    runs."""
    torch.manual_seed(0)
    cfg = UnifiedConfig.tiny(text_vocab=build_text_vocab())
    model = UnifiedTransformer(cfg)
    tok = TextTokenizer(cfg.text_vocab)
    captions = [tok.encode(caption(*sample_item_scene(0, "train", i, 16))) for i in range(PAIRS)]
    codes = torch.arange(PAIRS)[:, None, None].expand(PAIRS, 4, 4)
    batch = collate([image_to_text_sequence(codes[i], captions[i]) for i in range(PAIRS)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = unified_loss(model, batch, None, mtp_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), codes


def random_model(seed: int = 0) -> UnifiedTransformer:
    torch.manual_seed(seed)
    return UnifiedTransformer(UnifiedConfig.tiny(text_vocab=build_text_vocab())).eval()


def replay(model: UnifiedTransformer, codes: torch.Tensor, tokens: list[int], heads: int) -> dict:
    """The acceptance rule replayed on greedy's tokens (EOS included) with one teacher-forced pass: at each round's
    committed token, head d drafts token d further, accepted while it equals greedy's, until the caption ends."""
    g = model.config.image_grid
    seq = SequenceBuilder(g).add_image(codes, rows_in=g, train=False).add_text([BOS] + tokens, train=False)
    with torch.no_grad():
        h = model(**model_inputs(collate([seq])))[0, -len(tokens) - 1:]  # after BOS and after each token
        drafts = [model.mtp_logits(h, d).argmax(-1).tolist() for d in range(1, heads + 1)]
    forwards, drafted, accepted, accepted_at, p = 1, 0, 0, [0] * heads, 0
    while p < len(tokens) - 1:  # tokens[p] is committed from the main head; more follow
        forwards += 1
        drafted += heads
        n = 0
        while n < heads and p + 1 + n < len(tokens) and drafts[n][p] == tokens[p + 1 + n]:
            accepted_at[n] += 1
            n += 1
        accepted += n
        p += 1 + n
    return {"forwards": forwards, "drafted": drafted, "accepted": accepted, "accepted_at": accepted_at}


def with_end(caption_ids: list[int], limit: int) -> list[int]:
    """Greedy's tokens as decoded: the caption, then EOS unless the length limit cut it."""
    return caption_ids + [EOS] if len(caption_ids) < limit else caption_ids


@pytest.mark.parametrize("heads", [0, 1, 2])
def test_equals_greedy_on_a_random_model(heads):
    """Drafts of an untrained model are nearly always rejected: the masked-rejection path against greedy."""
    model = random_model()
    codes = torch.randint(0, 16, (6, 4, 4), generator=torch.Generator().manual_seed(1))
    greedy, _ = caption_codes(model, codes)
    spec, stats = speculative_caption_codes(model, codes, draft_heads=heads)
    assert spec == greedy
    assert stats.accepted <= stats.drafted and stats.drafted % max(1, heads) == 0
    if heads == 0:
        assert stats.drafted == 0 and stats.forwards == caption_codes(model, codes)[1]  # greedy's own steps


def check_against_greedy_and_replay(model, codes):
    """One speculative decode of a batch: greedy's captions, and each count as the replay gives it."""
    limit = model.config.max_text_len - 1
    greedy, greedy_steps = caption_codes(model, codes)
    spec, stats = speculative_caption_codes(model, codes)
    assert spec == greedy  # token for token
    expected = [replay(model, c, with_end(ids, limit), heads=2) for c, ids in zip(codes, greedy)]
    assert stats.drafted == sum(e["drafted"] for e in expected)
    assert stats.accepted == sum(e["accepted"] for e in expected)
    assert stats.accepted_at == [sum(e["accepted_at"][d] for e in expected) for d in range(2)]
    assert stats.forwards == max(e["forwards"] for e in expected)  # the batch runs until its slowest caption
    assert stats.tokens == sum(len(with_end(ids, limit)) for ids in greedy)
    assert stats.forwards <= greedy_steps
    return stats, greedy_steps


def test_batch_of_one_equals_greedy_and_bookkeeping_replays(half_trained):
    model, codes = half_trained
    runs = [check_against_greedy_and_replay(model, codes[i: i + 1]) for i in range(8)]
    assert 0 < sum(s.accepted for s, _ in runs) < sum(s.drafted for s, _ in runs)  # accepted and rejected drafts
    assert sum(s.forwards for s, _ in runs) < sum(steps for _, steps in runs)  # fewer forwards in all


def test_batch_of_eight_equals_greedy_and_bookkeeping_replays(half_trained):
    model, codes = half_trained
    stats, greedy_steps = check_against_greedy_and_replay(model, codes[:8])
    assert 0 < stats.accepted < stats.drafted and stats.forwards < greedy_steps


def test_captions_of_different_lengths_and_the_length_limit(half_trained):
    model, codes = half_trained
    greedy, _ = caption_codes(model, codes, max_len=6)
    spec, stats = speculative_caption_codes(model, codes, max_len=6)
    assert spec == greedy and max(len(c) for c in spec) == 5
    assert speculative_caption_codes(model, codes[:2], max_len=1)[0] == caption_codes(model, codes[:2], max_len=1)[0]


def test_refuses_more_draft_heads_than_the_model_has():
    with pytest.raises(ValueError, match="draft_heads"):
        speculative_caption_codes(random_model(), torch.zeros(1, 4, 4, dtype=torch.long), draft_heads=3)


def test_caption_cli_drafts_with_the_mtp_heads(half_trained, tmp_path):
    """`ernielab unified caption --draft-heads 2` prints greedy's captions, then the acceptance; bad counts are
    refused with one error line."""
    from PIL import Image
    from typer.testing import CliRunner

    from ernielab.unified.cli import app
    from ernielab.unified.io import save_model
    from ernielab.unified.vq import VQTokenizer

    model, _ = half_trained
    torch.manual_seed(0)
    folder = save_model(tmp_path / "model", model, VQTokenizer(VQConfig.tiny()).eval(), {"test": True})
    pictures = []
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255), (0, 255, 0))):
        pictures.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), colour).save(pictures[-1])
    runner = CliRunner()
    plain = runner.invoke(app, ["caption", str(folder), *map(str, pictures)])
    drafted = runner.invoke(app, ["caption", str(folder), *map(str, pictures), "--draft-heads", "2"])
    assert plain.exit_code == drafted.exit_code == 0, drafted.output
    lines = drafted.output.strip().splitlines()
    assert lines[:3] == plain.output.strip().splitlines()
    stats = json.loads(lines[3])["speculative"]
    assert stats["draft_heads"] == 2 and 0 <= stats["accepted"] <= stats["drafted"]
    refused = runner.invoke(app, ["caption", str(folder), str(pictures[0]), "--draft-heads", "3"])
    assert refused.exit_code == 2 and refused.output.count("error:") == 1 and "draft_heads" in refused.output
