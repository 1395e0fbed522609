"""benchmark.py's train and infer parts and --gpu: images/s of training and inference of random-weight
models from each data path (in memory, JPEG files, the --cache_resized cache, that cache on the GPU),
next to the FLOP ceiling, and issue 14's table of them with its targets. Also the generated photos these
parts (and the decode part) read."""
import itertools
import os
import tempfile
import time

import numpy as np

import clip
import models
from utils import io, data, gpu_augment, training

DATA_PATHS = ["memory", "jpeg", "cache", "device"]


def write_test_photos(folder, count, size, seed):
    """JPEGs that compress like photos: smooth colour fields, a few shapes and sensor-like noise."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, size=(height // 40, width // 40, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(40, 300))
            draw.ellipse([x - r, y - r // 2, x + r, y + r // 2], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(2))
        noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
        path = os.path.join(folder, f"photo_{i:03d}.jpg")
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(path)
    return paths


# ---- training / inference throughput ----------------------------------------------------------

def image_flops(visual, input_size):
    """FLOPs of one image through the encoder (linear, conv and attention matmuls; 1 MAC = 2 FLOPs),
    counted on the meta device."""
    import copy
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(visual).to("meta")
    with FlopCounterMode(display=False) as counter:
        meta.forward_features(torch.zeros(1, 3, *input_size, device="meta"))
    return counter.get_total_flops()


def throughput_spec(backbone, args):
    """The backbone spec of a timed model: the official architecture, or with --tiny the same kind of
    encoder a few layers wide."""
    spec = models.backbone_spec(backbone, tuple(args.input_size), args.stride, args.last_stride)
    spec["arch"] = dict(clip.model.MODEL_CONFIGS[backbone])
    if args.tiny:
        spec["arch"] = clip.clip.tiny_config("rn" if models.is_resnet_arch(spec["arch"]) else "vit",
                                             image_resolution=spec["arch"]["image_resolution"])
    return spec


def throughput_model(backbone, args, num_classes):
    """A random-weight model of --method and its training objective (from losses.py): the fine-tuning
    model (models.HandReIDModel) or PromptSG's (both CLIP towers, inference with the fixed prompt)."""
    import losses
    spec = throughput_spec(backbone, args)
    if args.method == "promptsg":
        clip_model = models.load_clip_model(spec, weights="random")
        model = models.build_promptsg_model(models.promptsg_model_config(spec), num_classes, clip_model=clip_model)
        return model, losses.PromptSGLoss(model)
    model = models.HandReIDModel(models.load_backbone(spec, weights="random"), num_classes)
    return model, losses.FinetuneLoss(model, ls=0.1)


def benchmark_photos(args, folder):
    """(paths, labels) of --bench_photos generated photos (the 11k size), written once into `folder`."""
    count = args.bench_photos
    marker = os.path.join(folder, f"photos_{count}_{args.photo_size[0]}x{args.photo_size[1]}.json")
    if os.path.isfile(marker):
        paths = io.read_json(marker, kind=list)
    else:
        paths = write_test_photos(folder, count, tuple(args.photo_size), args.seed)
        io.atomic_write_json(marker, paths)
    return paths, [i % 72 for i in range(len(paths))]


def batches_source(kind, dataset, batch_size, steps, args, device):
    """An iterable of `steps` (images, labels) batches: the same tensors on the device ("memory"),
    or a DataLoader reading `dataset` with --bench_workers workers (samples drawn with replacement)."""
    import torch
    if kind == "memory":
        images = torch.randn(batch_size, 3, *args.input_size, device=device)
        labels = torch.arange(batch_size, device=device) % 72
        return [(images, labels)] * steps
    if kind == "device":
        return device_batches(dataset, batch_size, steps, args, device)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch_size * steps)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.bench_workers,
                                       pin_memory=device.startswith("cuda"), drop_last=True,
                                       persistent_workers=False, prefetch_factor=4 if args.bench_workers else None)


def device_batches(dataset, batch_size, steps, args, device):
    """Batches drawn with replacement from the cache held on the device: augmented there as the
    trainers' --gpu_augment does for training (dataset at the load size), normalised only for inference."""
    import torch
    if not hasattr(dataset, "device_cache"):
        dataset.device_cache = gpu_augment.DeviceImageCache(dataset, device)
    cache = dataset.device_cache
    train = tuple(dataset.size) != tuple(args.input_size)
    augmenter = gpu_augment.BatchAugmenter(args.input_size, flip_p=0.5 if train else 0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(steps):
        index = torch.randint(len(cache.labels), (batch_size,), generator=generator).to(device)
        yield augmenter(cache.images[index], generator), cache.labels[index]


def throughput_datasets(args, folder, train):
    """{"jpeg": ..., "cache": ...} datasets of the benchmark photos with the training or eval pipeline."""
    paths, labels = benchmark_photos(args, folder)
    size = data.train_load_size(args.input_size) if train else tuple(args.input_size)
    transform = data.build_train_transform(args.input_size) if train else data.eval_transform(args.input_size)
    items = list(zip(paths, labels))
    cache = data.ResizedImageCache(paths, size, os.path.join(folder, "cache"), desc="building the resized cache")
    return {"jpeg": data.LabeledImageDataset(items, size, transform),
            "cache": data.LabeledImageDataset(items, size, transform, cache=cache),
            "device": data.LabeledImageDataset(items, size, transform, cache=cache)}


def time_training(loss_module, source_fn, args, device, amp):
    model = loss_module.model
    optimizer = training.make_optimizer("adam", training.param_groups(model, 5e-6, 5e-4), 5e-6, 5e-4)
    scaler = training.make_grad_scaler(amp, device)

    def step(module, images, labels):
        return module(images, labels)

    training.train_one_epoch(loss_module, source_fn(args.warmup), step, [optimizer], scaler, amp, device, 0,
                          progress=False)
    result = training.train_one_epoch(loss_module, source_fn(args.iters), step, [optimizer], scaler, amp, device, 1,
                                   progress=False)
    return result.images_per_s


def time_inference(model, source_fn, args, device, amp):
    import torch
    model.eval()

    def run(source):
        seen = 0
        start = time.perf_counter()
        with torch.no_grad(), io.autocast(amp, device):
            for images, _ in source:
                model(images.to(device, non_blocking=True))
                seen += images.shape[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return seen / (time.perf_counter() - start)

    run(source_fn(args.warmup))
    return run(source_fn(args.iters))


def bench_throughput(args, train):
    import torch
    device = args.device
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as train_finetune.py on CUDA
    mode = "train" if train else "infer"
    batch_size = args.train_batch if train else args.infer_batch
    if batch_size is None:
        batch_size = (128 if train else 512) if device.startswith("cuda") else 4
    amps = args.amps or (["none", "bf16"] if device.startswith("cuda") else ["none"])
    compile_modes = [False, True] if args.compile and device.startswith("cuda") else [False]
    if args.compile and not device.startswith("cuda"):
        print("--compile ignored: torch.compile of the encoder is only timed on CUDA")
    figures = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
               "batch_size": batch_size, "input_size": list(args.input_size), "iters": args.iters,
               "workers": args.bench_workers, "peak_tflops": args.peak_tflops}
    folder = args.photo_dir or os.path.join(tempfile.gettempdir(), "clipfh_benchmark_photos")
    os.makedirs(folder, exist_ok=True)
    datasets = throughput_datasets(args, folder, train) if set(args.data_paths) - {"memory"} else {}
    for backbone in args.backbones:
        model, loss_module = throughput_model(backbone, args, num_classes=72)
        flops = image_flops(model.visual, args.input_size) * (3 if train else 1)
        ceilings = {f"{peak:g}": peak * 1e12 / flops for peak in args.peak_tflops}
        model.to(device)
        loss_module.to(device)
        models.speed_up_image_encoder(model.visual, device, compile=False, for_training=train)  # channels_last
        entry = {"gflop_per_image": flops / 1e9, "ceiling_images_per_s": ceilings}
        for compiled in compile_modes:
            if compiled:
                models.speed_up_image_encoder(model.visual, device, compile=True, for_training=train)
            for amp, kind in itertools.product(amps, args.data_paths):
                def source_fn(steps, kind=kind):
                    return batches_source(kind, datasets.get(kind), batch_size, steps, args, device)
                if train:
                    rate = time_training(loss_module, source_fn, args, device, amp)
                else:
                    rate = time_inference(model, source_fn, args, device, amp)
                entry[f"{amp}/{kind}" + ("/compiled" if compiled else "")] = rate
                share = ", ".join(f"{c:,.0f} at {p} TF/s ({100 * rate / c:.2f}%)" for p, c in ceilings.items())
                print(f"{mode} {backbone} {args.input_size[0]}x{args.input_size[1]} amp {amp:4s} {kind:6s} "
                      f"compile {'on ' if compiled else 'off'}: {rate:10.1f} img/s (batch {batch_size}); "
                      f"ceiling img/s {share}")
        figures[backbone] = entry
        del model, loss_module
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for dataset in datasets.values():
        dataset.__dict__.pop("device_cache", None)
    return figures


def bench_train(args):
    return bench_throughput(args, train=True)


def bench_infer(args):
    return bench_throughput(args, train=False)


# issue 14's targets (img/s on one GPU, bf16, 224x224, data loading included) and the whole-protocol row
TARGETS = {"train": {"ViT-B/16": 4000, "RN50": 6000}, "infer": {"ViT-B/16": 12000, "RN50": 20000}}
TARGET_PEAK_TFLOPS = 790.0
TARGET_PATH = "device"  # the trainers' default on CUDA with --cache_resized


def gpu_table(figures, measured):
    """One row per (train | infer, backbone) of the measured figures: eager and compiled img/s of every
    data path, the target path's share of the FLOP ceiling at 790 TFLOP/s, and whether the target is met
    (None unless `measured`: full-size models on a CUDA GPU)."""
    rows = []
    for mode in ("train", "infer"):
        for backbone, entry in figures.get(mode, {}).items():
            if not isinstance(entry, dict) or "gflop_per_image" not in entry:
                continue
            ceiling = entry["ceiling_images_per_s"][f"{TARGET_PEAK_TFLOPS:g}"]
            rates = {key: value for key, value in entry.items() if key.startswith("bf16/")}
            best = max((v for k, v in rates.items() if k.split("/")[1] == TARGET_PATH), default=None)
            target = TARGETS[mode].get(backbone)
            rows.append({"mode": mode, "backbone": backbone, "images_per_s": rates,
                         "eager": rates.get(f"bf16/{TARGET_PATH}"), "compiled": rates.get(f"bf16/{TARGET_PATH}/compiled"),
                         "best": best, "target_path": TARGET_PATH, "ceiling_images_per_s": ceiling,
                         "fraction_of_peak": None if best is None else best / ceiling,
                         "target_images_per_s": target,
                         "target_met": None if best is None or target is None or not measured else best >= target})
    return rows


def bench_gpu(args):
    """Issue 14's table: train and infer parts for ViT-B/16 and RN50, bf16, every data path, eager and
    compiled (compiled only on CUDA), and the summary rows."""
    import torch
    args.backbones, args.amps, args.data_paths = ["ViT-B/16", "RN50"], ["bf16"], list(DATA_PATHS)
    args.compile = args.device.startswith("cuda")
    figures = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "tiny": args.tiny, "input_size": list(args.input_size), "peak_tflops": TARGET_PEAK_TFLOPS,
               "train": bench_train(args), "infer": bench_infer(args)}
    figures["rows"] = gpu_table(figures, measured=args.device.startswith("cuda") and not args.tiny)
    for row in figures["rows"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[row["target_met"]]
        compiled = "n/a" if row["compiled"] is None else f"{row['compiled']:,.0f}"
        print(f"{row['mode']} {row['backbone']}: eager {row['eager']:,.0f}, compiled {compiled} "
              f"img/s ({row['target_path']} path); {100 * (row['fraction_of_peak'] or 0):.1f}% of the "
              f"{row['ceiling_images_per_s']:,.0f} img/s ceiling; target {row['target_images_per_s']:,} {met}")
    return figures
