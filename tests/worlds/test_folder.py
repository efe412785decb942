import json

import numpy as np
import pytest
import torch
from PIL import Image

from ernielab.worlds.folder import ImageCaptionFolder

torch.set_num_threads(1)


def _save(path, width, height, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def _jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_relative_and_absolute_paths(tmp_path):
    _save(tmp_path / "img" / "a.png", 40, 20, (255, 0, 0))
    absolute = _save(tmp_path / "elsewhere" / "b.png", 16, 16, (0, 0, 255))
    source = _jsonl(tmp_path / "data.jsonl", [
        {"image": "img/a.png", "caption": "red"},
        "",
        {"image": str(absolute), "caption": "blue", "extra": 1},
    ])
    data = ImageCaptionFolder(source, image_size=8)
    assert len(data) == 2 and data.captions == ["red", "blue"]
    item = data[0]
    assert set(item) == {"image", "caption"} and item["caption"] == "red"
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"][:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(data[1]["image"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 30x10: a left third black, middle white, right third black -> the centre crop is all white.
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 10:20] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("  a white square \n")
    Image.new("RGBA", (12, 12), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    (tmp_path / "clear.txt").write_text("transparent")
    data = ImageCaptionFolder(tmp_path, image_size=10)
    assert data.captions == ["transparent", "a white square"]  # sorted by path; stripped
    assert torch.allclose(data[1]["image"], torch.ones(3, 10, 10), atol=0.02)
    assert torch.allclose(data[0]["image"], torch.ones(3, 10, 10))


def test_folder_is_recursive_and_needs_captions(tmp_path):
    _save(tmp_path / "a" / "x.jpg", 8, 8)
    (tmp_path / "a" / "x.txt").write_text("x")
    _save(tmp_path / "b" / "y.png", 8, 8)
    with pytest.raises(ValueError, match=r"y\.png"):
        ImageCaptionFolder(tmp_path, image_size=4)
    (tmp_path / "b" / "y.txt").write_text("y")
    assert len(ImageCaptionFolder(tmp_path, image_size=4)) == 2


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "caption": ', "not valid JSON"),
    ('{"image": "a.png"}', "missing key"),
    ('["a.png", "cap"]', "JSON object"),
    ('{"image": "a.png", "caption": 3}', "strings"),
    ('{"image": "nope.png", "caption": "c"}', "image file not found"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    _save(tmp_path / "a.png", 8, 8)
    source = _jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "ok"}, line])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        ImageCaptionFolder(source)
    assert f"{source}:2" in str(error.value)


def test_unreadable_image_is_reported(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    source = _jsonl(tmp_path / "d.jsonl", [{"image": "broken.png", "caption": "c"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1.*broken\.png"):
        ImageCaptionFolder(source)
    # Unchecked at build time, it still fails clearly when loaded.
    data = ImageCaptionFolder(source, check_images=False)
    with pytest.raises(ValueError, match=r"d\.jsonl:1.*cannot read image"):
        data[0]


def test_truncated_image_fails_at_load_with_location(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    data = ImageCaptionFolder(_jsonl(tmp_path / "d.jsonl", [{"image": "t.png", "caption": "c"}]))
    with pytest.raises(ValueError, match=r"t\.png"):
        data[0]


def test_empty_or_missing_sources(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ImageCaptionFolder(_jsonl(tmp_path / "empty.jsonl", [""]))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageCaptionFolder(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageCaptionFolder(tmp_path / "missing.jsonl")
