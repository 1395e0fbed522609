"""utils/data.py: image loading (JPEG draft decoding, exact sizes) and errors that name the file."""
import numpy as np
import pytest
import torch
from PIL import Image

from utils import errors, data


def test_load_image_decodes_jpeg_draft_to_the_exact_size(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 600 x 800
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    with Image.open(path) as img:
        img.draft("RGB", (90, 120))
        assert img.size == (200, 150)  # 1/4 scale: the smallest that is still >= 90 x 120
    img = data.load_image(path, (120, 90))
    assert img.mode == "RGB" and img.size == (90, 120)  # (W, H): squashed, not cropped
    with Image.open(path) as full:
        reference = np.asarray(full.convert("RGB").resize((90, 120), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(img, dtype=np.float32) - reference).mean() < 8
    gray = tmp_path / "gray.png"
    Image.fromarray(pixels[..., 0]).save(gray)
    assert data.load_image(gray, (32, 48)).size == (48, 32) and data.load_image(gray).size == (800, 600)


def broken_images(folder):
    good = folder / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    not_image = folder / "not_an_image.jpg"
    not_image.write_bytes(b"this is text, not a JPEG")
    truncated = folder / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    return good, [not_image, truncated, folder / "missing.jpg"]


def test_loader_errors_name_the_file(tmp_path):
    good, broken = broken_images(tmp_path)
    for path in broken:
        with pytest.raises(errors.ImageLoadError, match=str(path.name)):
            data.load_image(path, (32, 32))
    # inside a DataLoader worker process the error still names the file
    dataset = data.ImageListDataset([good, broken[1]], size=(32, 32))
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    try:
        with pytest.raises(errors.ImageLoadError, match="truncated.jpg"):
            next(batches)
    finally:
        batches._shutdown_workers()  # else the worker lingers until garbage collection


