"""Training augmentation on whole batches, on the GPU: the resized-image cache held on the device
as uint8, and colour jitter, random crop, horizontal flip and random erasing with the semantics of
data.build_train_transform's per-image torchvision transforms. The same code runs on the CPU (tests).
Per-sample parameters come from a CPU torch.Generator seeded per (seed, epoch), so a resumed run
draws the same augmentations."""
import math

import numpy as np
import torch

from clip import CLIP_MEAN, CLIP_STD
from .errors import TrainingInputError
from .data import epoch_loader, epoch_seed
from .io import set_seed

JITTER = 0.1  # brightness / contrast / saturation factors in [0.9, 1.1], as build_train_transform
ERASING_SCALE, ERASING_RATIO, ERASING_ATTEMPTS = (0.02, 0.4), (0.3, 1 / 0.3), 10


def fits_in_device_memory(nbytes, device, margin_fraction=0.25, min_margin=4 * 2 ** 30):
    """Whether nbytes more can live on `device` and still leave max(min_margin, margin_fraction x total)
    free for the model and its activations. The CPU always fits."""
    if not str(device).startswith("cuda"):
        return True
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return nbytes + max(min_margin, margin_fraction * total) <= free


def use_gpu_augment(flag, device, cached):
    """--gpu_augment: on by default with CUDA and --cache_resized; asked for without the cache, an error."""
    if flag is None:
        return bool(cached) and str(device).startswith("cuda")
    if flag and not cached:
        raise TrainingInputError("--gpu_augment augments the --cache_resized images on the device: add "
                                 "--cache_resized or drop --gpu_augment")
    return bool(flag)


class DeviceImageCache:
    """The images of a LabeledImageDataset read through a ResizedImageCache (or a SubsetCache view of
    one), as one uint8 tensor (N, H, W, 3) on `device`, with the labels beside them."""

    def __init__(self, dataset, device):
        view = dataset.cache
        if view is None:
            raise TrainingInputError("the data set has no resized-image cache to put on the device (--cache_resized)")
        base, rows = (view.cache, np.asarray(view.rows)) if hasattr(view, "rows") else (view, None)
        array = np.load(base.file, mmap_mode="r")
        self.images = torch.from_numpy(np.array(array) if rows is None else array[rows]).to(device)  # copies
        self.labels = torch.tensor(dataset.labels, dtype=torch.long, device=device)

    @staticmethod
    def nbytes(dataset):
        height, width = dataset.size
        return len(dataset) * height * width * 3


def _gray(x):
    """PIL's convert("L") of integer-valued RGB (..., 3): (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    exact in float32."""
    weights = x.new_tensor([19595.0, 38470.0, 7471.0])
    return torch.floor(((x * weights).sum(-1, keepdim=True) + 32768) / 65536)


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor) for uint8 images: truncated and clipped to 0..255."""
    return (degenerate + factor * (x - degenerate)).floor().clamp(0, 255)


def _brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def _contrast(x, factor):
    mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)  # ImageEnhance.Contrast's int(mean + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def _saturation(x, factor):
    return _blend(_gray(x).expand_as(x), x, factor)


JITTER_OPS = (_brightness, _contrast, _saturation)  # ColorJitter's order ids 0, 1, 2 (3 = hue, off here)


class BatchAugmenter:
    """build_train_transform on a batch of uint8 images (B, H, W, 3) at train_load_size: [colour jitter
    (brightness, contrast, saturation 0.1 in a random order, on the whole image, as PIL computes it)],
    random crop to input_size, horizontal flip (flip_p), CLIP mean/std, [random erasing to 0 with
    erasing_p, scale (0.02, 0.4), ratio (0.3, 1/0.3), up to 10 attempts]. Returns float (B, 3, h, w)."""

    def __init__(self, input_size, color_jitter=False, erasing_p=0.0, flip_p=0.5, mean=CLIP_MEAN, std=CLIP_STD):
        self.input_size = tuple(int(s) for s in input_size)
        self.color_jitter, self.erasing_p, self.flip_p = bool(color_jitter), float(erasing_p), float(flip_p)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def draw(self, count, load_size, generator):
        """Per-sample parameters (CPU tensors) for `count` images of load_size (H, W)."""
        height, width = load_size
        crop_h, crop_w = self.input_size
        if crop_h > height or crop_w > width:
            raise TrainingInputError(f"crop {self.input_size} is larger than the cached images {tuple(load_size)}")

        def uniform(*shape, low=0.0, high=1.0):
            return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

        params = {"top": (uniform(count) * (height - crop_h + 1)).long(),
                  "left": (uniform(count) * (width - crop_w + 1)).long(),
                  "flip": uniform(count) < self.flip_p}
        if self.color_jitter:
            params["jitter_order"] = torch.stack([torch.randperm(4, generator=generator) for _ in range(count)])
            params["jitter_factors"] = uniform(count, 3, low=1 - JITTER, high=1 + JITTER).float()
        if self.erasing_p > 0:
            params["erase"] = self.draw_erasing(count, generator, uniform)
        return params

    def draw_erasing(self, count, generator, uniform):
        """torchvision RandomErasing.get_params, vectorised: the first of 10 attempts whose box fits."""
        crop_h, crop_w = self.input_size
        area = crop_h * crop_w * uniform(count, ERASING_ATTEMPTS, low=ERASING_SCALE[0], high=ERASING_SCALE[1])
        aspect = torch.exp(uniform(count, ERASING_ATTEMPTS, low=math.log(ERASING_RATIO[0]),
                                   high=math.log(ERASING_RATIO[1])))
        box_h, box_w = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
        fits = (box_h < crop_h) & (box_w < crop_w)
        first = fits.long().argmax(dim=1, keepdim=True)
        box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
        return {"apply": (uniform(count) < self.erasing_p) & fits.any(dim=1),
                "top": (uniform(count) * (crop_h - box_h + 1)).long(),
                "left": (uniform(count) * (crop_w - box_w + 1)).long(), "height": box_h, "width": box_w}

    def apply(self, images, params):
        """Augment uint8 images (B, H, W, 3) with the parameters of draw()."""
        device = images.device
        params = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                  for k, v in params.items()}
        count = images.shape[0]
        if self.color_jitter:
            images = self.jitter(images.float(), params["jitter_order"], params["jitter_factors"])
        crop_h, crop_w = self.input_size
        rows = params["top"][:, None] + torch.arange(crop_h, device=device)
        columns = torch.arange(crop_w, device=device).expand(count, crop_w)
        columns = torch.where(params["flip"][:, None], columns.flip(1), columns) + params["left"][:, None]
        batch = torch.arange(count, device=device)
        crops = images[batch[:, None, None], rows[:, :, None], columns[:, None, :]]  # (B, h, w, 3)
        x = crops.permute(0, 3, 1, 2).float().div(255)  # as ToTensor and Normalize compute it
        x = x.sub(self.mean.to(device)).div(self.std.to(device))
        if "erase" in params:
            x = x.masked_fill(self.erasing_mask(params["erase"], device), 0)
        return x

    @staticmethod
    def jitter(x, order, factors):
        """ColorJitter's ops in each image's own random order, on integer-valued floats (B, H, W, 3)."""
        for position in range(order.shape[1]):
            for op_id, op in enumerate(JITTER_OPS):
                chosen = (order[:, position] == op_id).nonzero().flatten()
                if len(chosen):
                    x[chosen] = op(x[chosen], factors[chosen, op_id].view(-1, 1, 1, 1))
        return x

    def erasing_mask(self, erase, device):
        crop_h, crop_w = self.input_size
        rows = torch.arange(crop_h, device=device)[None, :]
        columns = torch.arange(crop_w, device=device)[None, :]
        inside_rows = (rows >= erase["top"][:, None]) & (rows < (erase["top"] + erase["height"])[:, None])
        inside_cols = (columns >= erase["left"][:, None]) & (columns < (erase["left"] + erase["width"])[:, None])
        mask = inside_rows[:, :, None] & inside_cols[:, None, :] & erase["apply"][:, None, None]
        return mask[:, None]  # (B, 1, h, w): every channel

    def __call__(self, images, generator):
        return self.apply(images, self.draw(images.shape[0], images.shape[1:3], generator))


class EpochBatches:
    """The training batches of one epoch (0-based), augmented on the device: what data.epoch_loader gives
    (the same sampler batches and global seeding), with images from a DeviceImageCache."""

    def __init__(self, cache, sampler, batch_size, augmenter, seed, epoch):
        set_seed(epoch_seed(seed, epoch))
        sampler.set_epoch(epoch)
        self.cache, self.batch_size, self.augmenter = cache, int(batch_size), augmenter
        self.order = torch.tensor(list(sampler), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))

    def __len__(self):
        return len(self.order) // self.batch_size

    def __iter__(self):
        for b in range(len(self)):
            index = self.order[b * self.batch_size:(b + 1) * self.batch_size].to(self.cache.images.device)
            yield self.augmenter(self.cache.images[index], self.generator), self.cache.labels[index]


def for_training(flag, train_set, device, log):
    """The DeviceImageCache of a trainer's --gpu_augment, or None (augmentation in the DataLoader
    workers). The cache goes on the device when it fits; by default a cache that does not fit
    leaves augmentation to the DataLoader workers (logged), asked for explicitly it is an error."""
    if not use_gpu_augment(flag, device, train_set.cache is not None):
        return None
    nbytes = DeviceImageCache.nbytes(train_set)
    if not fits_in_device_memory(nbytes, device):
        if flag:
            raise TrainingInputError(f"--gpu_augment: the {nbytes / 2 ** 30:.1f} GiB image cache does not fit on "
                                     f"{device} with room for training; pass --no-gpu_augment")
        log.info(f"the {nbytes / 2 ** 30:.1f} GiB image cache does not fit on {device}: augmenting in the "
                 f"DataLoader workers (--no-gpu_augment)")
        return None
    log.info(f"training images augmented on {device} in whole batches ({nbytes / 2 ** 20:.0f} MiB uint8 cache)")
    return DeviceImageCache(train_set, device)


def training_batches(device_images, augmenter, train_set, sampler, batch_size, num_workers, seed, epoch, device):
    """One epoch's training batches: augmented on the device from `device_images` when for_training
    kept the cache there, else the usual DataLoader (data.epoch_loader)."""
    if device_images is not None:
        return EpochBatches(device_images, sampler, batch_size, augmenter, seed, epoch)
    return epoch_loader(train_set, sampler, batch_size, num_workers, seed, epoch, device)
