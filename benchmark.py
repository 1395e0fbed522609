"""Speed benchmarks of CLIP-FH's building blocks. Each part prints its figures; all of them are saved
(merged with earlier runs of other parts) in --out.

    python benchmark.py                      # every part
    python benchmark.py --only decode metrics

Parts:
  decode   load_image (JPEG draft decoding + bicubic resize) against a full decode + resize, on
           generated 1600x1200 JPEGs (the size of the 11k photos). Target: >= 2.5x.
  metrics  the vectorised evaluation (metrics.query_gallery_metrics: CMC, mAP in both conventions, mINP)
           against a straightforward per-query Python loop, on a 2,000 x 10,000 score matrix.
           Target: >= 5x.
  verification  verification.verification_metrics (EER, AUC, TAR@FAR, ROC curve) on a 2,000 x 10,000
           score matrix (20 M pairs). Target: well under a second.
  search   queries/s of identify_hands.py's search (utils/gallery.py: memory-mapped float16 shards read in
           chunks, running top-10) against synthetic galleries of --search_sizes 512-d entries, written to
           a temporary folder and deleted afterwards, and the gallery's bytes per million entries.
  train    training images/s of the fine-tuning step (train_finetune.py's: two LS-CE heads, Adam,
           train_one_epoch) and
  infer    inference images/s (retrieval feature), each for --backbones (random weights) at --input_size,
           with AMP off and on (--amps), from in-memory tensors ("memory"), from JPEG photos on disk
           decoded by DataLoader workers ("jpeg") and from the --cache_resized uint8 cache ("cache"),
           with --compile each case also with forward_features torch.compiled (CUDA only),
           next to the FLOP ceiling: images/s = peak FLOP/s / FLOPs per image (x3 for training);
           peaks --peak_tflops (H100 dense bf16 990 SXM / 790). Targets on one H100: ViT-B/16 bf16
           training >= 2,500 img/s, inference >= 8,000 img/s, and the data paths keeping up.
           The "device" data path is the --gpu_augment one: the cache held on the GPU as uint8 and
           augmented there in whole batches (utils/gpu_augment.py).

    python benchmark.py --gpu            # issue 14's table in one JSON (--out), on one CUDA GPU
    python benchmark.py --protocol_run   # 11k dorsal-right-sized fine-tune (70 epochs) + 10-split evaluation

--gpu times ViT-B/16 and RN50 training and inference at 224x224, bf16, from every data path, eager
and compiled, and writes the device, torch/CUDA versions, each figure, its fraction of the FLOP
ceiling at 790 TFLOP/s and whether each target is met. --protocol_run draws a synthetic data set of
the 11k dorsal-right size (1600x1200 photos), prepares 10 splits, fine-tunes a random-weight ViT-B/16
for 70 epochs with --cache_resized and the speed options (bf16, --fast_decode, validation every 5
epochs) and evaluates it with eval_query_gallery_finetune.py (full decoding), and reports the wall
time of each step. --tiny makes both run in seconds on a CPU (tiny models and images; the
figures mean nothing then, the JSON has the same structure).
"""
import argparse
import itertools
import os
import tempfile
import time

import numpy as np

import models
from utils import io, data, gallery, gpu_augment, interrupts, metrics, outputs, synthetic, training, verification
from utils.errors import ClipFHError


def best_time(fn, repeats):
    """Fastest of `repeats` runs of fn() in seconds, and fn's last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---- decode -----------------------------------------------------------------------------------

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


def full_decode_resize(path, size):
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)


def bench_decode(args):
    from PIL import Image
    size = tuple(args.input_size)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_test_photos(folder, args.decode_images, tuple(args.photo_size), args.seed)
        full, _ = best_time(lambda: [full_decode_resize(p, size) for p in paths], args.repeats)
        draft, _ = best_time(lambda: [data.load_image(p, size, decode="draft") for p in paths], args.repeats)
        with Image.open(paths[0]) as img:
            img.draft("RGB", (size[1], size[0]))
            decoded_at = img.size
    n = len(paths)
    figures = {"images": n, "photo_size_WxH": list(args.photo_size), "target_HxW": list(size),
               "draft_decode_size_WxH": list(decoded_at),
               "full_decode_ms_per_image": 1000 * full / n, "draft_decode_ms_per_image": 1000 * draft / n,
               "speedup": full / draft, "target_speedup": 2.5}
    print(f"decode: full decode + resize {figures['full_decode_ms_per_image']:.2f} ms/image, draft "
          f"(decoded at {decoded_at[0]}x{decoded_at[1]}) + resize {figures['draft_decode_ms_per_image']:.2f} "
          f"ms/image -> {figures['speedup']:.2f}x (target >= 2.5x)")
    return figures


# ---- metrics ----------------------------------------------------------------------------------

def metrics_loop(sim, q_labels, g_labels, max_rank):
    """The straightforward per-query evaluation (as in evaluation_metrics.py of MBA-Net/CLIP-HandID):
    sort each row, find the true matches, accumulate CMC, trapezoid AP, standard AP and INP."""
    num_q, num_g = sim.shape
    cmc = np.zeros(num_g)
    ap_hand = ap_standard = inp = 0.0
    for i in range(num_q):
        index = np.argsort(sim[i])[::-1]
        good = np.flatnonzero(g_labels == q_labels[i])
        if len(good) == 0:
            continue
        hit_rows = np.flatnonzero(np.isin(index, good))
        cmc[hit_rows[0]:] += 1
        for k, row in enumerate(hit_rows):
            precision = (k + 1) / (row + 1)
            before = k / row if row != 0 else 1.0
            ap_hand += (before + precision) / 2 / len(hit_rows)
            ap_standard += precision / len(hit_rows)
        inp += len(hit_rows) / (hit_rows[-1] + 1)
    return {"cmc": (cmc / num_q)[:max_rank], "mAP_hand": ap_hand / num_q, "mAP_standard": ap_standard / num_q,
            "mINP": inp / num_q}


def bench_metrics(args):
    num_q, num_g = args.metrics_shape
    rng = np.random.default_rng(args.seed)
    figures = {"shape_QxG": [num_q, num_g]}
    for matches_per_query in args.matches_per_query:
        num_ids = num_g // matches_per_query
        g_labels = np.repeat(np.arange(num_ids), matches_per_query)
        g_labels = np.concatenate([g_labels, np.arange(num_ids, num_ids + num_g - len(g_labels))])
        q_labels = rng.integers(0, num_ids, num_q)
        # scores that look like a weak model: true matches shifted up a little
        sim = rng.normal(size=(num_q, num_g)).astype(np.float32)
        sim += 1.5 * (q_labels[:, None] == g_labels[None, :])
        loop_s, expected = best_time(lambda: metrics_loop(sim, q_labels, g_labels, 50), args.repeats)
        fast_s, got = best_time(lambda: metrics.query_gallery_metrics(sim, q_labels, g_labels, 50), args.repeats)
        diff = max(float(np.abs(np.array(got["cmc"]) - expected["cmc"]).max()),
                   *(abs(got[k] - expected[k]) for k in ("mAP_hand", "mAP_standard", "mINP")))
        figures[f"{matches_per_query}_matches_per_query"] = {
            "loop_s": loop_s, "vectorised_s": fast_s, "speedup": loop_s / fast_s, "max_abs_difference": diff}
        print(f"metrics {num_q}x{num_g}, {matches_per_query} true match(es) per query: per-query loop "
              f"{loop_s:.3f} s, vectorised {fast_s:.3f} s -> {loop_s / fast_s:.1f}x (target >= 5x); "
              f"max |difference| {diff:.1e}")
        if diff > 1e-9:
            raise SystemExit("vectorised and loop metrics disagree; this is a bug")
    figures["target_speedup"] = 5.0
    return figures


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


def throughput_model(backbone, args, num_classes):
    """A random-weight model of --method and its training objective (from losses.py): the fine-tuning
    model (models.HandReIDModel) or PromptSG's (both CLIP towers, inference with the fixed prompt)."""
    import clip
    import losses
    spec = models.backbone_spec(backbone, tuple(args.input_size), args.stride, args.last_stride)
    spec["arch"] = dict(clip.model.MODEL_CONFIGS[backbone])
    if args.tiny:  # the same kind of encoder, a few layers wide
        spec["arch"] = clip.clip.tiny_config("rn" if models.is_resnet_arch(spec["arch"]) else "vit",
                                        image_resolution=spec["arch"]["image_resolution"])
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
        models.speed_up_image_encoder(model.visual, device, compile=False)  # channels_last for ResNets
        entry = {"gflop_per_image": flops / 1e9, "ceiling_images_per_s": ceilings}
        for compiled in compile_modes:
            if compiled:
                models.speed_up_image_encoder(model.visual, device, compile=True)
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


def bench_verification(args):
    num_q, num_g = args.metrics_shape
    rng = np.random.default_rng(args.seed)
    g_labels, q_labels = np.arange(num_g) % (num_g // 5), rng.integers(0, num_g // 5, num_q)
    sim = rng.normal(size=(num_q, num_g)).astype(np.float32) + 1.5 * (q_labels[:, None] == g_labels[None, :])
    seconds, got = best_time(lambda: verification.verification_metrics(sim, q_labels, g_labels), args.repeats)
    print(f"verification {num_q}x{num_g} ({num_q * num_g:,} pairs): {seconds:.3f} s (target < 1 s); "
          f"EER {got['EER']:.4f}, AUC {got['AUC']:.4f}")
    return {"shape_QxG": [num_q, num_g], "seconds": seconds, "target_seconds": 1.0}


def bench_search(args):
    rows = gallery.benchmark_search(args.search_sizes, args.search_dim, args.search_queries, device=args.device,
                                    seed=args.seed, repeats=args.repeats)
    for row in rows:
        print(f"search {row['entries']:,} x {row['dim']}-d on {row['device']}: {row['queries_per_s']:.1f} queries/s "
              f"({row['queries']} queries in {row['seconds']:.2f} s); "
              f"{row['bytes_per_million_entries'] / 1e9:.3f} GB per million entries")
    return {"rows": rows}


# issue 14's targets (img/s on one GPU, bf16, 224x224, data loading included) and the whole-protocol row
TARGETS = {"train": {"ViT-B/16": 4000, "RN50": 6000}, "infer": {"ViT-B/16": 12000, "RN50": 20000}}
PROTOCOL_TARGET_S = 180
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
    if not args.device.startswith("cuda") and not args.tiny:
        raise SystemExit("error: --gpu measures a CUDA GPU; pass --device cuda (or --tiny for a CPU smoke run)")
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


def write_protocol_photos(root, photo_size, seed, workers):
    """Replace every synthetic photo under root/Hands by itself upscaled (bicubic) to photo_size: the
    11k file size and decoding cost, at a fraction of the rendering time."""
    from concurrent.futures import ProcessPoolExecutor
    folder = os.path.join(root, "Hands")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(upscale_photo, paths, [tuple(photo_size)] * len(paths), chunksize=16))
    return len(paths)


def upscale_photo(path, photo_size):
    from PIL import Image
    with Image.open(path) as img:
        big = img.convert("RGB").resize(photo_size, Image.BICUBIC)
    big.save(path, quality=90)


def bench_protocol(args):
    """The 11k dorsal-right protocol end to end on synthetic data of its size: fine-tune (70 epochs,
    --cache_resized) and the 10-split evaluation, each step timed by wall clock."""
    import clip
    import torch
    import prepare_train_val_test_11k_r_l as prepare
    import train_finetune
    import eval_query_gallery_finetune as evaluate
    tiny = args.tiny
    root = os.path.join(args.photo_dir or os.path.join(tempfile.gettempdir(), "clipfh_protocol_run"), "11k")
    seconds = {}
    start = time.perf_counter()
    num_ids, per_id = (8, (3, 4)) if tiny else (args.protocol_ids, (6, 8))
    info = synthetic.make_synthetic_11k(root, num_ids_per_aspect=num_ids, images_per_id=per_id,
                                        image_size=(80, 60), seed=args.seed)
    photos = write_protocol_photos(root, args.photo_size, args.seed, os.cpu_count() or 1)
    seconds["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    num_splits = 2 if tiny else 10
    prepare.main(["--data_dir", root, "--num_splits", str(num_splits), "--seed", str(args.seed), "--force"])
    split_root = os.path.join(root, "train_val_test_split_dorsal_r")
    seconds["prepare"] = time.perf_counter() - start
    checkpoint = os.path.join(root, "random_vit.pt")
    if tiny:
        clip.save_tiny_checkpoint(checkpoint, kind="vit", image_resolution=args.input_size[0])
    else:
        torch.save(clip.model.random_state_dict("ViT-B/16", seed=args.seed), checkpoint)
    epochs = 1 if tiny else args.protocol_epochs
    out_root = os.path.join(root, "runs")
    common = ["--device", args.device, "--seed", str(args.seed)]
    train_args = ["--data_dir", split_root, "--f_name", out_root, "--m_name", "protocol", "--backbone_name",
                  checkpoint, "--pretrained", "false", "--epochs", str(epochs), "--cache_resized", "--force",
                  "--no-final_test", "--no-progress", "--input_size", *map(str, args.input_size), *common,
                  # the speed options, as issue 14 timed them (the recipe's defaults are fp32, full decoding and
                  # validation every epoch)
                  "--amp", "bf16" if args.device.startswith("cuda") else "none", "--fast_decode", "--eval_every", "5"]
    if tiny:
        train_args += ["--batch_size", "4", "--num_workers", "0"]
    start = time.perf_counter()
    result = train_finetune.main(train_args)
    seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    evaluate.main(["--f_name", out_root, "--m_name", "protocol", "--test_dir", split_root, "--which_epoch", "best",
                   "--force", *(["--num_workers", "0"] if tiny else []), *common])
    seconds["evaluate"] = time.perf_counter() - start
    counts = {name: sum(len(files) for _, _, files in os.walk(os.path.join(split_root, name)))
              for name in ("train_all", "test")}
    end_to_end = seconds["train"] + seconds["evaluate"]
    measured = args.device.startswith("cuda") and not tiny
    figures = {"tiny": tiny, "photo_size": list(args.photo_size), "photos_written": photos,
               "train_images": counts["train_all"], "test_images": counts["test"], "num_ids_per_aspect": num_ids,
               "synthetic": info["dataset"], "epochs": epochs, "num_splits": num_splits, "seconds": seconds,
               "end_to_end_s": end_to_end, "target_s": PROTOCOL_TARGET_S, "target_met": end_to_end <= PROTOCOL_TARGET_S if measured else None,
               "train_images_per_s_last_epoch": result["history"][-1]["images_per_s"], "run_dir": result["out_dir"]}
    print(f"protocol run: {counts['train_all']} train / {counts['test']} test images of {args.photo_size[0]}x"
          f"{args.photo_size[1]}, {epochs} epochs + {num_splits}-split evaluation: train {seconds['train']:.1f} s, "
          f"evaluate {seconds['evaluate']:.1f} s -> {end_to_end:.1f} s end to end (target <= {PROTOCOL_TARGET_S} s)")
    return figures


DATA_PATHS = ["memory", "jpeg", "cache", "device"]
PARTS = {"decode": bench_decode, "metrics": bench_metrics, "verification": bench_verification,
         "train": bench_train, "infer": bench_infer, "search": bench_search,
         "gpu": bench_gpu, "protocol_run": bench_protocol}
CPU_PARTS = ["decode", "metrics", "verification", "train", "infer", "search"]  # --only; --gpu and --protocol_run have flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=CPU_PARTS, default=CPU_PARTS, help="parts to run")
    parser.add_argument("--gpu", action="store_true", help="issue 14's table only (see above)")
    parser.add_argument("--protocol_run", action="store_true", help="the whole-protocol run only (see above)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models, images and counts: a CPU check of the outputs' structure in seconds")
    parser.add_argument("--protocol_ids", type=int, default=290,
                        help="--protocol_run identities per aspect (half train, half test; 6-8 photos each)")
    parser.add_argument("--protocol_epochs", type=int, default=70, help="fine-tuning epochs of --protocol_run")
    parser.add_argument("--out", default="benchmark_results.json",
                        help="JSON file the figures are merged into (earlier parts are kept)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs is reported")
    parser.add_argument("--decode_images", type=int, default=20, help="photos timed in the decoding benchmark (default 20)")
    parser.add_argument("--photo_size", type=int, nargs=2, default=[1600, 1200], metavar=("W", "H"),
                        help="size of the synthetic photos (default 1600 1200, as 11k)")
    parser.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="network input size (default 224 224)")
    parser.add_argument("--metrics_shape", type=int, nargs=2, default=[2000, 10000], metavar=("Q", "G"),
                        help="queries and gallery size of the metrics benchmark (default 2000 10000)")
    parser.add_argument("--matches_per_query", type=int, nargs="+", default=[1, 5],
                        help="gallery images per identity in the metrics part (1 = the hand protocol)")
    parser.add_argument("--search_sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="gallery sizes of the search part (default 10k 100k 1M)")
    parser.add_argument("--search_dim", type=int, default=512, help="feature size of the search part (default 512)")
    parser.add_argument("--search_queries", type=int, default=256, help="queries per timed search (default 256)")
    g = parser.add_argument_group("train / infer throughput")
    g.add_argument("--backbones", nargs="+", default=["ViT-B/16", "RN50"], help="official names, random weights")
    g.add_argument("--method", choices=["finetune", "promptsg"], default="finetune",
                   help="model and objective timed: the fine-tuning model, or PromptSG's (inference with the "
                        "fixed prompt; compare its infer figures with finetune's for the cost ratio)")
    g.add_argument("--amps", nargs="+", choices=["none", "bf16", "fp16"], default=None,
                   help="AMP settings to time (default: none and bf16 on CUDA, none on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="also time every case with the image encoder's forward_features torch.compiled (CUDA only)")
    g.add_argument("--data_paths", nargs="+", choices=DATA_PATHS, default=DATA_PATHS,
                   help="where training images come from in the timed runs (default: all four)")
    g.add_argument("--iters", type=int, default=30, help="timed batches per measurement")
    g.add_argument("--warmup", type=int, default=5, help="untimed batches before each measurement")
    g.add_argument("--train_batch", type=int, default=None, help="default 128 on CUDA, 4 on CPU")
    g.add_argument("--infer_batch", type=int, default=None, help="default 512 on CUDA, 4 on CPU")
    g.add_argument("--bench_workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers")
    g.add_argument("--bench_photos", type=int, default=64, help="generated photos for the jpeg/cache paths")
    g.add_argument("--photo_dir", default=None, help="where the photos and their cache go (default: a temp folder)")
    g.add_argument("--stride", type=int, default=None, help="ViT patch stride (default: the backbone's patch size)")
    g.add_argument("--last_stride", type=int, default=1, choices=[1, 2], help="RN layer4 stride (1 as in training)")
    g.add_argument("--peak_tflops", type=float, nargs="+", default=[990.0, 790.0],
                   help="peak FLOP/s (TFLOP/s) for the ceilings; H100 SXM dense bf16 = 990")
    io.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.gpu or args.protocol_run:
        args.only = ["gpu"] * args.gpu + ["protocol_run"] * args.protocol_run
    if args.tiny:
        args.input_size, args.photo_size, args.bench_photos = [32, 32], [64, 48], 4
        args.iters, args.warmup, args.bench_workers = 1, 1, 0
        args.train_batch, args.infer_batch = args.train_batch or 2, args.infer_batch or 2
        args.search_sizes, args.search_queries = [1000, 5000], 8
    return args


def folders_to_write(args):
    """{folder: about how many bytes the chosen parts write there}: generated JPEGs (--photo_size, about a
    tenth of their raw size) and their resized cache; --protocol_run also a data set of the 11k
    dorsal-right size, its split roots and a ViT-B/16 run (checkpoints with Adam's moments)."""
    jpeg = args.photo_size[0] * args.photo_size[1] * 3 // 10
    cached = 2 * 3 * args.input_size[0] * args.input_size[1]
    need = {os.path.dirname(os.path.abspath(args.out)): 2 ** 20}
    temp = tempfile.gettempdir()
    if "decode" in args.only:
        need[temp] = need.get(temp, 0) + args.decode_images * jpeg
    if {"train", "infer", "gpu"} & set(args.only):
        folder = args.photo_dir or temp
        need[folder] = need.get(folder, 0) + args.bench_photos * (jpeg + cached)
    if "protocol_run" in args.only:
        folder = args.photo_dir or temp
        photos = 8 * 4 * 4 if args.tiny else args.protocol_ids * 4 * 8
        need[folder] = need.get(folder, 0) + photos * (jpeg + cached) + (0 if args.tiny else 4 * 2 ** 30)
    return need


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    io.set_seed(args.seed)
    try:
        out_folder = os.path.dirname(os.path.abspath(args.out))
        for folder, need in folders_to_write(args).items():  # before the work
            flag = "--out" if folder == out_folder else "--photo_dir" if args.photo_dir else "the temporary folder"
            outputs.check_writable(folder, flag)
            outputs.check_space(folder, need, flag)
        with outputs.FolderLock(args.out, "another benchmark"):  # one writer merges into --out at a time
            previous = io.read_json(args.out) if os.path.isfile(args.out) else {}
            figures = {}
            for name in args.only:
                figures[name] = PARTS[name](args)
            previous.update(figures)
            previous.setdefault("runs", {}).update({name: io.run_info() for name in figures})
            io.atomic_write_json(args.out, previous)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Wrote {', '.join(figures)} benchmark figures to {args.out}")
    return figures


if __name__ == "__main__":
    main()
