"""Speed benchmarks of CLIP-FH's building blocks. Each part prints its figures; all of them are saved
(merged with earlier runs of other parts) in --out.

    python benchmark.py                      # every part
    python benchmark.py --only decode metrics

Parts:
  decode   load_image (JPEG draft decoding + bicubic resize) against a full decode + resize, on
           generated 1600x1200 JPEGs (the size of the 11k photos). Target: >= 2.5x.
  metrics  the vectorised evaluation (utils.query_gallery_metrics: CMC, mAP in both conventions, mINP)
           against a straightforward per-query Python loop, on a 2,000 x 10,000 score matrix.
           Target: >= 5x.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

import utils


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
        draft, _ = best_time(lambda: [utils.load_image(p, size) for p in paths], args.repeats)
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
        fast_s, got = best_time(lambda: utils.query_gallery_metrics(sim, q_labels, g_labels, 50), args.repeats)
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


PARTS = {"decode": bench_decode, "metrics": bench_metrics}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run")
    parser.add_argument("--out", default="benchmark_results.json",
                        help="JSON file the figures are merged into (earlier parts are kept)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs is reported")
    parser.add_argument("--decode_images", type=int, default=20)
    parser.add_argument("--photo_size", type=int, nargs=2, default=[1600, 1200], metavar=("W", "H"))
    parser.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--metrics_shape", type=int, nargs=2, default=[2000, 10000], metavar=("Q", "G"))
    parser.add_argument("--matches_per_query", type=int, nargs="+", default=[1, 5],
                        help="gallery images per identity in the metrics part (1 = the hand protocol)")
    utils.add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    utils.set_seed(args.seed)
    figures = {}
    for name in args.only:
        figures[name] = PARTS[name](args)
    previous = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    previous.update(figures)
    previous.setdefault("runs", {}).update({name: utils.run_info() for name in figures})
    utils.atomic_write_json(args.out, previous)
    print(f"Wrote {', '.join(figures)} benchmark figures to {args.out}")
    return figures


if __name__ == "__main__":
    main()
