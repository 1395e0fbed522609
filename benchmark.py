"""Speed benchmarks of CLIP-FH's building blocks. Each part prints its figures; all of them are saved
(merged with earlier runs of other parts) in --out, a JSON file that benchmark.py wrote or a new one
(--force replaces any other file).

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
    python benchmark.py --fast_paths     # each CUDA fast path on and off, end to end (benchmark_fast_paths.py)

--gpu times ViT-B/16 and RN50 training and inference at 224x224, bf16, from every data path, eager
and compiled, and writes the device, torch/CUDA versions, each figure, its fraction of the FLOP
ceiling at 790 TFLOP/s and whether each target is met. --protocol_run draws a synthetic data set of
the 11k dorsal-right size (1600x1200 photos), prepares 10 splits, fine-tunes a random-weight ViT-B/16
for 70 epochs with --cache_resized and the speed options (bf16, --fast_decode, validation every 5
epochs) and evaluates it with eval_query_gallery_finetune.py (full decoding), and reports the wall
time of each step. --tiny makes each run in seconds on a CPU (tiny models and images; the
figures mean nothing then, the JSON has the same structure): it changes the defaults of the sizes
and counts, and a flag given on the command line keeps its value.
"""
import argparse
import os
import tempfile
import time

import numpy as np

import benchmark_fast_paths
import benchmark_protocol
import benchmark_throughput as throughput
import clip
import models
from utils import io, data, flags, gallery, interrupts, metrics, outputs, verification
from utils.errors import ClipFHError, InputFileError, OutputExistsError, TrainingInputError


def best_time(fn, repeats):
    """Fastest of `repeats` runs of fn() in seconds, and fn's last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---- decode -----------------------------------------------------------------------------------

def full_decode_resize(path, size):
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)


def bench_decode(args):
    from PIL import Image
    size = tuple(args.input_size)
    with tempfile.TemporaryDirectory() as folder:
        paths = throughput.write_test_photos(folder, args.decode_images, tuple(args.photo_size), args.seed)
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


PARTS = {"decode": bench_decode, "metrics": bench_metrics, "verification": bench_verification,
         "train": throughput.bench_train, "infer": throughput.bench_infer, "search": bench_search,
         "gpu": throughput.bench_gpu, "protocol_run": benchmark_protocol.bench_protocol,
         "fast_paths": benchmark_fast_paths.bench_fast_paths}
CPU_PARTS = ["decode", "metrics", "verification", "train", "infer", "search"]  # --only; the GPU parts have flags
# flags whose default depends on --tiny: (default, --tiny default); set only where the command line left them out
SCALED_DEFAULTS = {
    "input_size": ([224, 224], [32, 32]), "photo_size": ([1600, 1200], [64, 48]), "bench_photos": (64, 4),
    "iters": (30, 1), "warmup": (5, 1), "bench_workers": (min(16, os.cpu_count() or 1), 0),
    "train_batch": (None, 2), "infer_batch": (None, 2),  # None: decided by the device (bench_throughput)
    "search_sizes": ([10_000, 100_000, 1_000_000], [1000, 5000]), "search_queries": (256, 8),
    "protocol_ids": (290, 8), "protocol_epochs": (70, 1),
    "fast_paths_epochs": (benchmark_fast_paths.PROTOCOL_EPOCHS, 2), "fast_paths_encode": ([1000, 10000], [8]),
}
# the key that marks a JSON file as benchmark.py's (--out merges only into such a file)
MARKER = {"program": "benchmark.py", "format": 1}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=CPU_PARTS, default=CPU_PARTS, help="parts to run")
    parser.add_argument("--gpu", action="store_true", help="issue 14's table only (see above)")
    parser.add_argument("--protocol_run", action="store_true", help="the whole-protocol run only (see above)")
    parser.add_argument("--fast_paths", action="store_true",
                        help="each CUDA fast path on and off, end to end (benchmark_fast_paths.py)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models, images and counts (the defaults of the flags left out): a CPU check of "
                             "the outputs' structure in seconds")
    parser.add_argument("--protocol_ids", type=int, default=None,
                        help="--protocol_run identities per aspect, at least 3 (half train, half test; 6-8 "
                             "photos each, --tiny 3-4; default 290, --tiny 8)")
    parser.add_argument("--protocol_epochs", type=int, default=None,
                        help="fine-tuning epochs of --protocol_run (default 70, --tiny 1)")
    parser.add_argument("--out", default="benchmark_results.json",
                        help="JSON file the figures are merged into (earlier parts are kept); a file that "
                             "benchmark.py did not write is refused unless --force")
    parser.add_argument("--force", action="store_true",
                        help="replace an --out file that holds something other than benchmark figures (a "
                             "benchmark file is always merged into)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs is reported")
    parser.add_argument("--decode_images", type=int, default=20, help="photos timed in the decoding benchmark (default 20)")
    parser.add_argument("--photo_size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="size of the synthetic photos (default 1600 1200, as 11k; --tiny 64 48)")
    parser.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="network input size (default 224 224, --tiny 32 32)")
    parser.add_argument("--metrics_shape", type=int, nargs=2, default=[2000, 10000], metavar=("Q", "G"),
                        help="queries and gallery size of the metrics benchmark (default 2000 10000)")
    parser.add_argument("--matches_per_query", type=int, nargs="+", default=[1, 5],
                        help="gallery images per identity in the metrics part (1 = the hand protocol)")
    parser.add_argument("--search_sizes", type=int, nargs="+", default=None,
                        help="gallery sizes of the search part (default 10k 100k 1M, --tiny 1000 5000)")
    parser.add_argument("--search_dim", type=int, default=512, help="feature size of the search part (default 512)")
    parser.add_argument("--search_queries", type=int, default=None,
                        help="queries per timed search (default 256, --tiny 8)")
    g = parser.add_argument_group("train / infer throughput")
    g.add_argument("--backbones", nargs="+", default=["ViT-B/16", "RN50"], help="official names, random weights")
    g.add_argument("--method", choices=["finetune", "promptsg"], default="finetune",
                   help="model and objective timed: the fine-tuning model, or PromptSG's (inference with the "
                        "fixed prompt; compare its infer figures with finetune's for the cost ratio)")
    g.add_argument("--amps", nargs="+", choices=["none", "bf16", "fp16"], default=None,
                   help="AMP settings to time (default: none and bf16 on CUDA, none on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="also time every case with the image encoder's forward_features torch.compiled (CUDA only)")
    g.add_argument("--data_paths", nargs="+", choices=throughput.DATA_PATHS, default=throughput.DATA_PATHS,
                   help="where training images come from in the timed runs (default: all four)")
    g.add_argument("--iters", type=int, default=None, help="timed batches per measurement (default 30, --tiny 1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="untimed batches before each measurement (default 5, --tiny 1)")
    g.add_argument("--train_batch", type=int, default=None, help="default 128 on CUDA, 4 on CPU, 2 with --tiny")
    g.add_argument("--infer_batch", type=int, default=None, help="default 512 on CUDA, 4 on CPU, 2 with --tiny")
    g.add_argument("--bench_workers", type=int, default=None,
                   help="DataLoader workers (default: one per CPU core up to 16, --tiny 0)")
    g.add_argument("--bench_photos", type=int, default=None,
                   help="generated photos for the jpeg/cache paths (default 64, --tiny 4)")
    g.add_argument("--photo_dir", default=None, help="where the photos and their cache go (default: a temp folder)")
    g.add_argument("--stride", type=int, default=None, help="ViT patch stride (default: the backbone's patch size)")
    g.add_argument("--last_stride", type=int, default=1, choices=[1, 2], help="RN layer4 stride (1 as in training)")
    g.add_argument("--peak_tflops", type=float, nargs="+", default=[990.0, 790.0],
                   help="peak FLOP/s (TFLOP/s) for the ceilings; H100 SXM dense bf16 = 990")
    benchmark_fast_paths.add_arguments(parser)
    io.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.gpu or args.protocol_run or args.fast_paths:
        args.only = ["gpu"] * args.gpu + ["protocol_run"] * args.protocol_run + ["fast_paths"] * args.fast_paths
    for flag, (full, tiny) in SCALED_DEFAULTS.items():  # only flags left out: a value given always wins
        if getattr(args, flag) is None:
            setattr(args, flag, tiny if args.tiny else full)
    flags.exit_on_problems(flag_problems(args))
    return args


def flag_problems(args):
    """One message per flag that no part could run with (every flag is checked, whichever parts run)."""
    problems = flags.bound_problems(args, at_least={
        "repeats": 1, "decode_images": 1, "photo_size": 1, "input_size": 1, "matches_per_query": 1,
        "search_sizes": 1, "search_dim": 1, "search_queries": 1, "protocol_ids": 3, "protocol_epochs": 1,
        "iters": 1, "warmup": 0, "train_batch": 1, "infer_batch": 1, "bench_workers": 0, "bench_photos": 1,
        "stride": 1, "fast_paths_epochs": 1, "fast_paths_encode": 1, "fast_paths_timeout": 1},
        positive=("peak_tflops",))
    num_q, num_g = args.metrics_shape
    if num_q < 1 or num_g < 5:
        problems.append(f"--metrics_shape Q G needs at least 1 query and 5 gallery entries (the verification part "
                        f"draws G/5 identities), got {num_q} {num_g}")
    elif max(args.matches_per_query) > num_g:
        problems.append(f"--matches_per_query {max(args.matches_per_query)} is more than the gallery of "
                        f"--metrics_shape ({num_g}); give at most {num_g}")
    for flag in ("backbones", "fast_paths_backbones"):
        unknown = [name for name in getattr(args, flag) if name not in clip.model.MODEL_CONFIGS]
        if unknown:
            problems.append(f"--{flag}: {' '.join(unknown)} is not an official CLIP name; choose from "
                            f"{' '.join(clip.model.MODEL_CONFIGS)}")
    if not problems:
        problems += geometry_problems(args)
    for part, flag in (("gpu", "--gpu"), ("fast_paths", "--fast_paths")):
        if part in args.only and not args.device.startswith("cuda") and not args.tiny:
            problems.append(f"{flag} measures a CUDA GPU; pass --device cuda (or --tiny for a CPU smoke run)")
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        problems.append(f"--out {args.out} is a folder; name a JSON file, e.g. "
                        f"{os.path.join(args.out, 'benchmark_results.json')}")
    elif os.path.lexists(out) and not os.path.isfile(out):
        problems.append(f"--out {args.out} is not a regular file; name a JSON file")
    elif not os.path.isdir(os.path.dirname(out)):
        problems.append(f"--out {args.out}: the folder {os.path.dirname(out)} does not exist; create it or choose "
                        f"another --out")
    return problems


def geometry_problems(args):
    """One message per encoder the chosen parts build that cannot take --input_size (--stride,
    --last_stride), found by building it without weights, before any part runs."""
    built = []  # (backbone spec, tiny checkpoint kind or None)
    if {"train", "infer", "gpu"} & set(args.only):
        names = ["ViT-B/16", "RN50"] if "gpu" in args.only else []
        names += [n for n in args.backbones if n not in names and {"train", "infer"} & set(args.only)]
        built += [(throughput.throughput_spec(name, args), None) for name in names]
    if {"protocol_run", "fast_paths"} & set(args.only):  # the trainer's geometry: the patch size, last stride 1
        names = ["ViT-B/16"] + [n for n in args.fast_paths_backbones if n != "ViT-B/16" and "fast_paths" in args.only]
        for name in names:
            kind = "rn" if name.startswith("RN") else "vit"
            spec = models.backbone_spec(name, tuple(args.input_size))
            spec["arch"] = (clip.clip.tiny_config(kind, image_resolution=args.input_size[0]) if args.tiny
                            else dict(clip.model.MODEL_CONFIGS[name]))
            built.append((spec, kind if args.tiny else None))
    problems = []
    for spec, tiny_kind in built:
        unit = 32 if tiny_kind == "rn" else 16
        if tiny_kind and args.input_size[0] % unit:
            problems.append(f"--input_size {args.input_size[0]} {args.input_size[1]}: the tiny {spec['name']} "
                            f"checkpoint of --tiny --protocol_run / --fast_paths needs a height that is a multiple of "
                            f"{unit}")
            continue
        try:
            models.load_backbone(spec, weights="empty")
        except TrainingInputError as err:
            problems.append(str(err))
    return list(dict.fromkeys(problems))


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
    if {"protocol_run", "fast_paths"} & set(args.only):
        folder = args.photo_dir or temp
        photos = args.protocol_ids * 4 * (4 if args.tiny else 8)
        need[folder] = need.get(folder, 0) + photos * (jpeg + cached) + (0 if args.tiny else 4 * 2 ** 30)
        if "fast_paths" in args.only and not args.tiny:  # a run of each backbone kept (checkpoints), evaluations
            need[folder] += len(args.fast_paths_backbones) * 2 * 2 ** 30
    return need


def earlier_figures(path, force):
    """The figures already in --out, to merge the new ones into: {} where there is no file, or where
    `force` replaces one that holds something else. Any other file is refused, so another program's
    output (an evaluation's results.json) is never merged into."""
    if not os.path.isfile(path):
        return {}
    try:
        found = io.read_json(path)
    except InputFileError:
        found = None
    if isinstance(found, dict):
        marked = isinstance(found.get("benchmark"), dict) and found["benchmark"].get("program") == MARKER["program"]
        # before the marker, a benchmark file held only parts and their "runs"
        if marked or ("runs" in found and set(found) <= set(PARTS) | {"runs"}):
            return found
    if force:
        return {}
    raise OutputExistsError(f"--out {path} holds something benchmark.py did not write (no \"benchmark\" key); "
                            f"choose another --out, or pass --force to replace it")


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
        if {"protocol_run", "fast_paths"} & set(args.only):
            benchmark_protocol.check_protocol_root(args)
        with outputs.FolderLock(args.out, "another benchmark"):  # one writer merges into --out at a time
            previous = earlier_figures(args.out, args.force)
            figures = {}
            for name in args.only:
                figures[name] = PARTS[name](args)
            previous.update(figures, benchmark=MARKER)
            previous.setdefault("runs", {}).update({name: io.run_info() for name in figures})
            io.atomic_write_json(args.out, previous)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Wrote {', '.join(figures)} benchmark figures to {args.out}")
    return figures


if __name__ == "__main__":
    main()
