import numpy as np
import pytest
import torch
from PIL import Image

from ernielab.core.images import contact_sheet, save_grid, to_uint8_batch, to_uint8_image

torch.set_num_threads(1)


def _images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_layout_and_nearest_upscaling_without_captions():
    images = _images(5)
    sheet = contact_sheet(images, cols=3, pad=2)
    cell = 8 * 12  # smallest integer factor reaching 96 px
    assert sheet.size == (3 * cell + 4 * 2, 2 * cell + 3 * 2)
    pixels = np.asarray(sheet)
    for i, image in enumerate(images):
        row, col = divmod(i, 3)
        x, y = 2 + col * (cell + 2), 2 + row * (cell + 2)
        expected = image.repeat(12, axis=0).repeat(12, axis=1)
        assert np.array_equal(pixels[y : y + cell, x : x + cell], expected)
    assert (pixels[-2:, -cell:] == 255).all()  # empty 6th slot stays background


def test_captions_go_under_cells_and_keep_pixels():
    images = _images(2, size=32)
    captions = ["a handwritten digit 7", "a very long caption " * 20]
    plain = contact_sheet(images, cols=2)
    sheet = contact_sheet(images, captions=captions, cols=2)
    assert sheet.width == plain.width and sheet.height > plain.height
    pixels, cell = np.asarray(sheet), 96
    assert np.array_equal(pixels[2 : 2 + cell, 2 : 2 + cell], images[0].repeat(3, 0).repeat(3, 1))
    text_band = pixels[2 + cell : sheet.height - 2, 2 : 2 + cell]
    assert (text_band < 128).any()  # dark text was drawn
    assert sheet.height - plain.height < 60  # long captions are cut to a few lines


def test_input_forms_agree():
    array = _images(1, size=6)[0]
    as_tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    forms = [array, Image.fromarray(array), as_tensor, torch.from_numpy(array).permute(2, 0, 1)]
    for form in forms:
        assert np.array_equal(to_uint8_image(form), array)
    sheets = [np.asarray(contact_sheet([f], cell=12)) for f in forms]
    assert all(np.array_equal(s, sheets[0]) for s in sheets)
    batch = to_uint8_batch(as_tensor[None].repeat(2, 1, 1, 1))
    assert batch.dtype == torch.uint8 and torch.equal(batch[1].permute(1, 2, 0), torch.from_numpy(array))
    gray = to_uint8_image(np.zeros((4, 4), np.uint8))
    assert gray.shape == (4, 4, 3)


def test_explicit_cell_shrinks_and_keeps_aspect():
    wide = np.zeros((10, 40, 3), np.uint8)
    sheet = contact_sheet([wide], cell=20, pad=0)
    assert sheet.size == (20, 20)
    pixels = np.asarray(sheet)
    assert (pixels[:7] == 255).all() and (pixels[8:12] == 0).all()  # letterboxed 20x5 strip in the middle


def test_errors_and_save(tmp_path):
    with pytest.raises(ValueError, match="captions"):
        contact_sheet(_images(2), captions=["only one"])
    with pytest.raises(ValueError, match="uint8"):
        contact_sheet([np.zeros((4, 4, 3), np.float64)])
    with pytest.raises(ValueError, match="sizes must match"):
        to_uint8_batch(_images(1, 4) + _images(1, 5))
    path = save_grid(_images(3), tmp_path / "out" / "grid.png", captions=["a", "b", "c"])
    assert Image.open(path).size == contact_sheet(_images(3), ["a", "b", "c"]).size
