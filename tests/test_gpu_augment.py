"""utils/gpu_augment.py: the batch augmenter has build_train_transform's semantics, the device cache
holds the cached pixels, epochs are deterministic, and the flag logic."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from utils import data, gpu_augment
from utils.errors import TrainingInputError

LOAD, CROP = (40, 36), (32, 28)


def uint8_images(count, size=LOAD, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8))


def plain_path(image, params, b, transform):
    """build_train_transform's ops on one image, with sample b's random choices taken from params."""
    img = Image.fromarray(image.numpy())
    for op in transform.transforms:
        if isinstance(op, T.RandomCrop):
            img = TF.crop(img, int(params["top"][b]), int(params["left"][b]), *CROP)
        elif isinstance(op, T.RandomHorizontalFlip):
            img = TF.hflip(img) if params["flip"][b] else img
        else:
            img = op(img)
    return img


def test_crop_flip_normalise_equal_the_plain_path_exactly():
    images = uint8_images(6)
    for flip_p in (1.0, 0.0, 0.5):
        augmenter = gpu_augment.BatchAugmenter(CROP, flip_p=flip_p)
        params = augmenter.draw(6, LOAD, torch.Generator().manual_seed(1))
        if flip_p != 0.5:
            assert bool(params["flip"].all()) == (flip_p == 1.0)
        got = augmenter.apply(images, params)
        transform = data.build_train_transform(CROP)
        expected = torch.stack([plain_path(images[b], params, b, transform) for b in range(6)])
        assert got.shape == (6, 3, *CROP)
        assert torch.equal(got, expected)


def test_colour_jitter_matches_pil_within_one_level():
    images = uint8_images(5, seed=2)
    augmenter = gpu_augment.BatchAugmenter(CROP, color_jitter=True)
    params = augmenter.draw(5, LOAD, torch.Generator().manual_seed(3))
    factors = params["jitter_factors"]
    assert ((factors >= 0.9) & (factors <= 1.1)).all()
    assert sorted(params["jitter_order"][0].tolist()) == [0, 1, 2, 3]
    got = augmenter.apply(images, params)
    pil_ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    for b in range(5):
        img = Image.fromarray(images[b].numpy())
        for op_id in params["jitter_order"][b].tolist():
            if op_id in pil_ops:
                img = pil_ops[op_id](img, float(factors[b, op_id]))
        img = TF.crop(img, int(params["top"][b]), int(params["left"][b]), *CROP)
        img = TF.hflip(img) if params["flip"][b] else img
        expected = TF.normalize(TF.to_tensor(img), augmenter.mean.flatten().tolist(), augmenter.std.flatten().tolist())
        level = 1 / 255 / augmenter.std.flatten().min().item()
        assert (got[b] - expected).abs().max() <= level + 1e-5
    no_jitter = dict(params)
    del no_jitter["jitter_order"], no_jitter["jitter_factors"]
    assert not torch.equal(got, gpu_augment.BatchAugmenter(CROP).apply(images, no_jitter))  # jitter did something


def test_crops_stay_inside_and_cover_every_offset_flip_half_the_time():
    augmenter = gpu_augment.BatchAugmenter(CROP)
    params = augmenter.draw(20000, LOAD, torch.Generator().manual_seed(0))
    assert params["top"].min() == 0 and params["top"].max() == LOAD[0] - CROP[0]
    assert params["left"].min() == 0 and params["left"].max() == LOAD[1] - CROP[1]
    counts = torch.bincount(params["top"]).float()
    assert counts.min() > 0.8 * counts.mean()  # uniform over the 9 offsets, as torch.randint
    assert abs(params["flip"].float().mean().item() - 0.5) < 0.02


def test_erasing_boxes_follow_torchvision_ranges_and_statistics():
    count, p = 4000, 0.5
    augmenter = gpu_augment.BatchAugmenter(CROP, erasing_p=p)
    erase = augmenter.draw(count, LOAD, torch.Generator().manual_seed(0))["erase"]
    applied = erase["apply"]
    assert abs(applied.float().mean().item() - p) < 0.03
    h, w = erase["height"][applied].double(), erase["width"][applied].double()
    top, left = erase["top"][applied], erase["left"][applied]
    assert (h < CROP[0]).all() and (w < CROP[1]).all() and (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (top + h <= CROP[0]).all() and (left >= 0).all() and (left + w <= CROP[1]).all()
    area = h * w / (CROP[0] * CROP[1])
    assert area.min() > 0.02 * 0.5 and area.max() < 0.4 * 1.6  # the scale range, give or take rounding
    assert ((h / w) > 0.3 * 0.5).all() and ((h / w) < 3.4 * 2).all()
    torch.manual_seed(0)
    reference = T.RandomErasing(p=1, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3), value=0)
    boxes = [reference.get_params(torch.zeros(3, *CROP), reference.scale, reference.ratio, [0])
             for _ in range(count)]
    ref_area = np.array([bh * bw for _, _, bh, bw, _ in boxes if bh < CROP[0]]) / (CROP[0] * CROP[1])
    assert abs(area.mean().item() - ref_area.mean()) < 0.01
    assert abs(np.median(area.numpy()) - np.median(ref_area)) < 0.015
    # the mask erases exactly the box, in every channel, to 0 after normalisation
    images = uint8_images(8)
    small = augmenter.draw(8, LOAD, torch.Generator().manual_seed(5))
    out = augmenter.apply(images, small)
    zeros = (out == 0).all(dim=1)
    box = small["erase"]
    for b in range(8):
        expected = torch.zeros(CROP, dtype=torch.bool)
        if box["apply"][b]:
            t, l_, bh, bw = (int(box[k][b]) for k in ("top", "left", "height", "width"))
            expected[t:t + bh, l_:l_ + bw] = True
        assert torch.equal(zeros[b], expected)


@pytest.fixture
def cached_train_set(tmp_path):
    paths = []
    for i in range(10):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(uint8_images(1, (50, 44), seed=i)[0].numpy()).save(path)
        paths.append(str(path))
    cache = data.ResizedImageCache(paths, LOAD, str(tmp_path / "cache"))
    items = [(p, i % 5) for i, p in enumerate(paths)]
    subset = items[::-1][:8]  # a view in another order than the cache's
    return data.LabeledImageDataset(subset, LOAD, data.build_train_transform(CROP),
                                    cache=data.SubsetCache.of(cache, subset))


def test_device_cache_holds_the_cached_pixels_and_labels(cached_train_set):
    cache = gpu_augment.DeviceImageCache(cached_train_set, "cpu")
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (8, *LOAD, 3)
    for i in range(8):
        assert np.array_equal(cache.images[i].numpy(), np.asarray(cached_train_set.cache.image(i)))
    assert cache.labels.tolist() == cached_train_set.labels
    assert gpu_augment.DeviceImageCache.nbytes(cached_train_set) == cache.images.numel()


def test_epoch_batches_follow_the_sampler_and_are_deterministic(cached_train_set):
    cache = gpu_augment.DeviceImageCache(cached_train_set, "cpu")
    augmenter = gpu_augment.BatchAugmenter(CROP, erasing_p=0.5, color_jitter=True)

    def epoch(number):
        sampler = data.ShuffleSampler(len(cached_train_set), 3, seed=4)
        batches = gpu_augment.EpochBatches(cache, sampler, 3, augmenter, seed=4, epoch=number)
        sampler.set_epoch(number)
        return list(batches), list(sampler)

    first, order = epoch(2)
    again, _ = epoch(2)
    other, _ = epoch(3)
    assert len(first) == 2  # 8 images, batch 3: the incomplete rest is dropped, as epoch_loader
    assert [lbl for _, labels in first for lbl in labels.tolist()] == [cached_train_set.labels[i] for i in order]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])


def test_gpu_augment_flag_defaults_and_errors(monkeypatch):
    assert gpu_augment.use_gpu_augment(None, "cuda:0", cached=True)
    assert not gpu_augment.use_gpu_augment(None, "cuda", cached=False)
    assert not gpu_augment.use_gpu_augment(None, "cpu", cached=True)
    assert gpu_augment.use_gpu_augment(True, "cpu", cached=True)  # the same code runs on a CPU
    assert not gpu_augment.use_gpu_augment(False, "cuda", cached=True)
    with pytest.raises(TrainingInputError, match="--cache_resized"):
        gpu_augment.use_gpu_augment(True, "cuda", cached=False)
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    assert gpu_augment.fits_in_device_memory(30 * gib, "cuda")  # 30 + 20 (25% margin) <= 60
    assert not gpu_augment.fits_in_device_memory(45 * gib, "cuda")
    assert gpu_augment.fits_in_device_memory(10 ** 15, "cpu")


def test_cache_that_does_not_fit_falls_back_with_a_log_line_or_fails_when_asked(cached_train_set, monkeypatch):
    monkeypatch.setattr(gpu_augment, "fits_in_device_memory", lambda nbytes, device: False)
    lines = []

    class Log:
        info = lines.append

    assert gpu_augment.for_training(None, cached_train_set, "cuda", Log) is None
    assert "does not fit" in lines[0]
    with pytest.raises(TrainingInputError, match="--no-gpu_augment"):
        gpu_augment.for_training(True, cached_train_set, "cuda", Log)
