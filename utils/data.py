"""Images and data sets: image loading, transforms, labelled data sets, the resized-image cache,
identity-folder scanning, the epoch samplers and the DataLoader factory."""
import json
import os
import random

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clip import CLIP_MEAN, CLIP_STD
from .errors import ImageLoadError, TrainingInputError
from . import preprocessing
from . import io as _io
from .io import _atomic_write, set_seed
from .splits import IMAGE_EXTENSIONS


def load_image(path, size=None, resize="squash", decode="full", interpolation="bicubic"):
    """Read `path` as an RGB PIL image of exactly size=(H, W) (None keeps its size), resized (bicubic
    unless told otherwise) as utils.preprocessing does: resize "squash" (the whole photo, no crop: a crop cuts fingers off)
    or "crop" (shorter side, centre crop); decode "full" decodes a JPEG whole first (what the
    references do), "draft" at the smallest DCT scale (1/8 .. 1) still at least the target size:
    several times faster for large photos, pixels differ slightly (--fast_decode; README "JPEG
    decoding"). Any unreadable file is an ImageLoadError naming it."""
    path = os.fspath(path)
    try:
        if size is None:
            with Image.open(path) as img:
                return img.convert("RGB")  # decodes now, so truncated files fail here
        return preprocessing.load(path, preprocessing.record(size, resize, interpolation, decode=decode))
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what PIL raises for bad files
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def load_preprocessed(path, rec):
    """The image at `path` as the preprocessing record `rec` says (utils.preprocessing), as a tensor."""
    image = load_image(path, rec["size"], rec["resize"], rec["decode"], rec["interpolation"])
    return preprocessing.transform(rec)(image)


class _DecodeCheck(torch.utils.data.Dataset):
    """Items: "" when the image decodes, else the ImageLoadError message."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            load_image(self.paths[index], self.size)
            return ""
        except ImageLoadError as err:
            return str(err)


def check_images(paths, size=None, num_workers=0, what="images", progress=None):
    """Pre-flight check: decode every image of `paths` once (as load_image(path, size) will),
    over `num_workers` DataLoader workers, so that a bad file stops a run before any work instead of
    hours into it. Raises one ImageLoadError listing the first 10 unreadable files and their count;
    returns the number of images checked."""
    paths = list(dict.fromkeys(os.fspath(p) for p in paths))
    loader = torch.utils.data.DataLoader(_DecodeCheck(paths, size), batch_size=16, num_workers=num_workers,
                                         collate_fn=list)
    bad = [message for batch in tqdm(loader, desc=f"checking {len(paths)} {what}", unit="batch", leave=False,
                                     disable=_io.bars_off(progress)) for message in batch if message]
    if bad:
        raise ImageLoadError(f"{len(bad)} of {len(paths)} {what} cannot be read: " + "; ".join(bad[:10])
                             + ("; ..." if len(bad) > 10 else "") + "; replace these files, or remove them from "
                             "the source data and re-run the prepare script")
    return len(paths)


def eval_transform(size, mean=CLIP_MEAN, std=CLIP_STD):
    """Resize to exactly size=(H, W) (bicubic, a no-op for load_image output), to tensor, normalise."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(tuple(size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths; items are (image tensor, index into `paths`). With a
    `preprocessing` record (utils.preprocessing) the images are decoded, resized and normalised as
    it says; otherwise resized to `size` by load_image and passed through `transform`."""

    def __init__(self, paths, size=(224, 224), transform=None, preprocessing=None):
        self.paths = [os.fspath(p) for p in paths]
        self.preprocessing = preprocessing
        self.size = tuple(preprocessing["size"] if preprocessing else size)
        self.transform = transform if transform is not None else eval_transform(self.size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.preprocessing is not None:
            return load_preprocessed(self.paths[index], self.preprocessing), index
        return self.transform(load_image(self.paths[index], self.size)), index


def scan_identity_folder(split_dir):
    """[(path, identity), ...] of `<split_dir>/<identity>/<file>`, sorted; empty identity folders
    are skipped."""
    if not os.path.isdir(split_dir):
        raise TrainingInputError(f"{split_dir} does not exist: expected a folder of identity sub-folders "
                                 f"(<split>/<identity>/<image>); run the prepare script first")
    items = []
    for identity in sorted(os.listdir(split_dir)):
        folder = os.path.join(split_dir, identity)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                items.append((os.path.join(folder, name), identity))
    return items


def load_train_val(data_dir, train_all=False):
    """Train and val sets of a split root. Returns {"train": [(path, label_index)], "val": [...],
    "class_names": [identity folder of class 0, 1, ...], "train_split": "train" | "train_all"}.
    Class indices follow the sorted train identity folders (like torchvision ImageFolder)."""
    train_split = "train_all" if train_all else "train"
    missing = [s for s in (train_split, "val") if not os.path.isdir(os.path.join(data_dir, s))]
    if missing:
        raise TrainingInputError(f"--data_dir {data_dir} has no {' or '.join(s + '/' for s in missing)} folder; "
                                 f"point it at a split root written by prepare_train_val_test_11k_r_l.py or "
                                 f"prepare_train_val_test_hd.py (e.g. 11k/train_val_test_split_dorsal_r)")
    train = scan_identity_folder(os.path.join(data_dir, train_split))
    val = scan_identity_folder(os.path.join(data_dir, "val"))
    class_names = sorted({identity for _, identity in train})
    if len(class_names) < 2:
        raise TrainingInputError(f"{os.path.join(data_dir, train_split)} holds {len(class_names)} identity "
                                 f"folder(s) with images; training needs at least 2 identities")
    class_index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({identity for _, identity in val} - set(class_index))
    if unknown:
        raise TrainingInputError(f"val identities {unknown[:5]}{' ...' if len(unknown) > 5 else ''} of "
                                 f"{os.path.join(data_dir, 'val')} have no folder in "
                                 f"{os.path.join(data_dir, train_split)}; val must hold held-out images of "
                                 f"training identities (re-run the prepare script)")
    if not val:
        raise TrainingInputError(f"{os.path.join(data_dir, 'val')} holds no images")
    return {"train": [(p, class_index[i]) for p, i in train], "val": [(p, class_index[i]) for p, i in val],
            "class_names": class_names, "train_split": train_split}


def train_load_size(input_size):
    """Size images are resized to before the random crop: 256 for a 224 input, scaled alike."""
    return tuple(int(round(s * 256 / 224)) for s in input_size)


def build_train_transform(input_size, color_jitter=False, erasing_p=0.0):
    """Train augmentation on a PIL image already resized to train_load_size(input_size) (bicubic):
    [color jitter], random crop to input_size, horizontal flip, CLIP mean/std, [random erasing]."""
    import torchvision.transforms as T
    ops = [T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0)] if color_jitter else []
    ops += [T.RandomCrop(tuple(input_size)), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD)]
    if erasing_p > 0:
        ops.append(T.RandomErasing(p=erasing_p, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3), value=0))
    return T.Compose(ops)


class LabeledImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) from [(path, label)] items. Images are loaded resized to `size` (H, W)
    with load_image (JPEG `decode` "full" or "draft"), or read from a ResizedImageCache of the same
    items, size and decoding."""

    def __init__(self, items, size, transform, cache=None, decode="full"):
        self.paths = [p for p, _ in items]
        self.labels = [int(label) for _, label in items]
        self.size = tuple(size)
        self.transform = transform
        self.cache = cache
        self.decode = decode
        if cache is not None and (cache.paths != self.paths or cache.size != self.size or cache.decode != decode):
            raise TrainingInputError("the resized-image cache was built for other images, another size or another "
                                     "JPEG decoding")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.cache is not None:
            image = self.cache.image(index)
        else:
            image = load_image(self.paths[index], size=self.size, decode=self.decode)
        return self.transform(image), self.labels[index]


class ResizedImageCache:
    """One-time cache of images decoded (JPEG `decode` "full" or "draft") and resized (bicubic) to
    `size` (H, W), stored as one uint8 array (N, H, W, 3) in `cache_dir`; later runs memory-map it
    instead of decoding JPEGs. A cache whose key (paths, file sizes and mtimes, size, decoding)
    differs is rebuilt."""

    def __init__(self, paths, size, cache_dir, desc="caching resized images", decode="full"):
        self.paths = list(paths)
        self.size = tuple(int(s) for s in size)
        self.decode = preprocessing.record(self.size, decode=decode)["decode"]  # checked
        key_text = json.dumps([self.size, self.decode, [(p, os.path.getsize(p), int(os.path.getmtime(p)))
                                                        for p in self.paths]])
        import hashlib
        digest = hashlib.sha1(key_text.encode()).hexdigest()[:16]
        self.file = os.path.join(cache_dir, f"resized_{self.size[0]}x{self.size[1]}_{self.decode}_{digest}.npy")
        if not os.path.exists(self.file):
            self._build(desc)
        self._array = None

    def _build(self, desc):
        height, width = self.size
        array = np.empty((len(self.paths), height, width, 3), dtype=np.uint8)
        for i, path in enumerate(tqdm(self.paths, desc=desc, leave=False, disable=_io.bars_off())):
            array[i] = np.asarray(load_image(path, size=self.size, decode=self.decode), dtype=np.uint8)
        _atomic_write(self.file, lambda f: np.save(f, array), mode="wb")

    def image(self, index):
        if self._array is None:  # opened lazily so DataLoader workers each map the file
            self._array = np.load(self.file, mmap_mode="r")
        return Image.fromarray(np.array(self._array[index]))

    def __getstate__(self):
        return dict(self.__dict__, _array=None)


class SubsetCache:
    """A view of a ResizedImageCache for a subset of its images, in the subset's order."""

    def __init__(self, cache, paths):
        position = {p: i for i, p in enumerate(cache.paths)}
        self.cache, self.paths, self.size, self.decode = cache, list(paths), cache.size, cache.decode
        self.rows = [position[p] for p in self.paths]

    @classmethod
    def of(cls, cache, items):
        return None if cache is None else cls(cache, [p for p, _ in items])

    def image(self, index):
        return self.cache.image(self.rows[index])


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, seed=0, rank=0, world_size=1):
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._plan = None

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self._plan = int(epoch), None

    def rng(self):
        return np.random.default_rng([self.seed, self.epoch])

    def state_dict(self):
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))
        self._plan = None

    def plan(self):
        if self._plan is None:
            self._plan = self.rank_share(self.global_batches())
        return self._plan

    def rank_share(self, batches):
        """Whole batches, round-robin over ranks, the same number for every rank."""
        per_rank = len(batches) // self.world_size
        return [i for batch in batches[self.rank::self.world_size][:per_rank] for i in batch]

    def __iter__(self):
        return iter(self.plan())

    def __len__(self):
        return len(self.plan())


class ShuffleSampler(_EpochSampler):
    """Random order over all images, cut into full batches of batch_size per rank (the incomplete
    rest is dropped, as in CLIP-HandID)."""

    def __init__(self, num_items, batch_size, seed=0, rank=0, world_size=1):
        super().__init__(seed, rank, world_size)
        self.num_items, self.batch_size = int(num_items), int(batch_size)

    def global_batches(self):
        order = self.rng().permutation(self.num_items).tolist()
        count = len(order) // self.batch_size
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]


class PKSampler(_EpochSampler):
    """P identities x K instances per batch (torchreid's RandomIdentitySampler): each identity's
    images are shuffled and cut into chunks of K; an identity with fewer than K images is filled up
    by drawing its images again with replacement. Batches pick P identities at random among those
    with chunks left, until fewer than P remain."""

    def __init__(self, labels, batch_size, num_instances, seed=0, rank=0, world_size=1):
        super().__init__(seed, rank, world_size)
        if num_instances < 1 or batch_size % num_instances:
            raise TrainingInputError(f"--batch_size {batch_size} must be a multiple of --num_instances "
                                     f"{num_instances} for --sampler pk")
        self.batch_size, self.num_instances = int(batch_size), int(num_instances)
        self.num_ids_per_batch = batch_size // num_instances
        self.index_by_label = {}
        for index, label in enumerate(labels):
            self.index_by_label.setdefault(int(label), []).append(index)
        if len(self.index_by_label) < self.num_ids_per_batch:
            raise TrainingInputError(
                f"--sampler pk needs {self.num_ids_per_batch} identities per batch (--batch_size {batch_size} / "
                f"--num_instances {num_instances}) but the training set has only {len(self.index_by_label)}")
        self.rare_labels = sorted(lbl for lbl, idx in self.index_by_label.items() if len(idx) < num_instances)

    def global_batches(self):
        rng = self.rng()
        chunks = {}
        for label in sorted(self.index_by_label):
            indices = np.array(self.index_by_label[label])
            if len(indices) < self.num_instances:
                indices = rng.choice(indices, self.num_instances, replace=True)
            indices = rng.permutation(indices)
            usable = len(indices) // self.num_instances * self.num_instances
            chunks[label] = [indices[i:i + self.num_instances].tolist() for i in range(0, usable, self.num_instances)]
        available = sorted(chunks)
        batches = []
        while len(available) >= self.num_ids_per_batch:
            picked = rng.choice(len(available), self.num_ids_per_batch, replace=False)
            batch = []
            for label in [available[i] for i in sorted(picked)]:
                batch += chunks[label].pop(0)
                if not chunks[label]:
                    available.remove(label)
            batches.append(batch)
        return batches


def make_loader(dataset, batch_size, sampler=None, num_workers=0, seed=0, epoch=0, device="cpu",
                drop_last=False):
    """DataLoader whose worker seeds depend only on (seed, epoch): a resumed run augments alike."""
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        pin_memory=str(device).startswith("cuda"), drop_last=drop_last, generator=generator,
        worker_init_fn=_seed_worker)


def epoch_loader(dataset, sampler, batch_size, num_workers, seed, epoch, device):
    """The training DataLoader of one epoch (0-based): seeds the global RNGs for the epoch and moves the
    sampler to it first, so a resumed run draws the same batches and augmentations."""
    set_seed(epoch_seed(seed, epoch))
    sampler.set_epoch(epoch)
    return make_loader(dataset, batch_size, sampler, num_workers, seed, epoch, device, drop_last=True)


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed, epoch):
    """Global RNG seed of an epoch, so augmentation in the main process is the same after resume."""
    return (int(seed) * 100_003 + int(epoch) * 7919) % 2 ** 31
