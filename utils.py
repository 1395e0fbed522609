"""Shared helpers for the CLIP-FH scripts: run bookkeeping, data splits, image loading,
evaluation and training utilities. Each script imports what it needs from here."""
import argparse
import bisect
import csv
import datetime
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
_UMASK = os.umask(0)
os.umask(_UMASK)


# ==== SECTION COMMON ==========================================================================

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser):
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=default_device(),
                        help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda when available)")
    return parser


def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _atomic_write(path, write_fn, mode="w"):
    """Write through `write_fn(file)` into a temporary file next to `path`, then rename it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def atomic_savemat(path, mdict):
    import scipy.io
    _atomic_write(path, lambda f: scipy.io.savemat(f, mdict), mode="wb")


def run_info():
    return {"git_commit": git_commit(), "torch": torch.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}


def write_run_config(out_dir, args, extra=None, name="config.json"):
    """Record every argument, the seed and the git commit of a run in `out_dir/name`."""
    config = {"args": vars(args) if not isinstance(args, dict) else dict(args), **run_info()}
    if extra:
        config.update(extra)
    atomic_write_json(os.path.join(out_dir, name), config)
    return config


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=0)) if len(values) > 1 else 0.0


def format_results_table(rows, title=None):
    """Paper-style table. `rows`: list of (name, {"rank1": [...], "rank5": [...], "rank10": [...],
    "mAP": [...]}) where each list holds one fraction per split; printed as mean ± std in percent."""
    columns = [("Rank-1", "rank1"), ("Rank-5", "rank5"), ("Rank-10", "rank10"), ("mAP", "mAP")]
    name_width = max([len("method")] + [len(name) for name, _ in rows])
    cells = []
    for name, metrics in rows:
        row = []
        for _, key in columns:
            mean, std = mean_std(metrics[key])
            row.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
        cells.append((name, row))
    col_width = max([len(c) for _, row in cells for c in row] + [7])
    lines = []
    if title:
        lines.append(title)
    header = "method".ljust(name_width) + " | " + " | ".join(h.rjust(col_width) for h, _ in columns)
    lines += [header, "-" * len(header)]
    for name, row in cells:
        lines.append(name.ljust(name_width) + " | " + " | ".join(c.rjust(col_width) for c in row))
    return "\n".join(lines)


# ==== SECTION SPLITS + SYNTHETIC DATA ============================================


# ---- protocol constants (MBA-Net, see README "Data splits") ----
HAND_INFO_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
                     "imageName", "irregularities")
ASPECTS_11K = ("dorsal right", "dorsal left", "palmar right", "palmar left")
# Per aspect: the split-root folder suffix and the last (highest) id that goes to training.
ASPECT_FOLDERS_11K = {"dorsal right": "dorsal_r", "dorsal left": "dorsal_l",
                      "palmar right": "palmar_r", "palmar left": "palmar_l"}
LAST_TRAIN_ID_11K = {"dorsal right": 1050, "dorsal left": 1037, "palmar right": 1051, "palmar left": 1042}
# gallery{i}_all of a target aspect = its own gallery{i} plus the other aspects' gallery{i},
# relabelled int(id) + offset so a distractor never shares a label with a query.
DISTRACTOR_OFFSETS_11K = {
    "dorsal right": {"dorsal left": 11_000_000, "palmar right": 21_000_000, "palmar left": 31_000_000},
    "dorsal left": {"dorsal right": 11_000_000, "palmar right": 21_000_000, "palmar left": 31_000_000},
    "palmar right": {"dorsal left": 11_000_000, "dorsal right": 21_000_000, "palmar left": 31_000_000},
    "palmar left": {"palmar right": 11_000_000, "dorsal right": 21_000_000, "dorsal left": 31_000_000},
}
HD_IMAGE_DIR = "Original Images"
HD_SUBJECT_FOLDER = "1-501"
HD_DISTRACTOR_FOLDER = "502-712"
HD_LAST_TRAIN_ID = 447
HD_DISTRACTOR_OFFSET = 1000
SPLITS_MANIFEST = "splits.json"
PREPARE_CONFIG = "prepare_config.json"


class SplitInputError(ValueError):
    """Bad input to split preparation; the message names the file or flag to fix."""


# ---- choosing val / query / gallery ----

def hold_out_one(images_by_id, rng, kind, origin):
    """For every identity (sorted) move one uniformly chosen image out of its sorted list.
    Returns (rest_by_id, held_by_id). An identity with a single image cannot keep any rest."""
    rest, held = {}, {}
    for label in sorted(images_by_id):
        files = sorted(images_by_id[label])
        if len(files) < 2:
            raise SplitInputError(
                f"identity '{label}' has a single {kind} image ({files[0] if files else 'none'}) in {origin}; "
                f"it cannot give both a {'val and a train' if kind == 'train' else 'gallery and a query'} "
                f"image. Remove the identity from {origin} or add images of it.")
        pick = int(rng.integers(len(files)))
        held[label] = [files[pick]]
        rest[label] = files[:pick] + files[pick + 1:]
    return rest, held


def flatten_by_id(images_by_id):
    """{label: [source, ...]} -> sorted [(label, source), ...]."""
    return sorted((label, source) for label, files in images_by_id.items() for source in files)


def make_split_sets(train_by_id, test_by_id, num_splits, rng, origin):
    """MBA-Net sets from {label: [source]} dicts: train_all, train + val (one image per train id),
    test, and for i < num_splits query{i} + gallery{i} (one image per test id).
    `rng` is a numpy Generator; val is drawn first, then the galleries split by split, so the first
    k splits do not depend on num_splits."""
    if num_splits < 1:
        raise SplitInputError(f"--num_splits must be at least 1, got {num_splits}")
    train, val = hold_out_one(train_by_id, rng, "train", origin)
    sets = {"train_all": flatten_by_id(train_by_id), "train": flatten_by_id(train),
            "val": flatten_by_id(val), "test": flatten_by_id(test_by_id)}
    for i in range(num_splits):
        query, gallery = hold_out_one(test_by_id, rng, "test", origin)
        sets[f"query{i}"] = flatten_by_id(query)
        sets[f"gallery{i}"] = flatten_by_id(gallery)
    return sets


def relabel(entries, offset):
    """Distractor labels: str(int(label) + offset)."""
    return [(str(int(label) + offset), source) for label, source in entries]


def split_by_last_train_id(images_by_id, last_train_id):
    train = {label: files for label, files in images_by_id.items() if int(label) <= last_train_id}
    test = {label: files for label, files in images_by_id.items() if int(label) > last_train_id}
    return train, test


# ---- manifest, folders, counts ----

def split_manifest(sets, **header):
    """splits.json content: header fields plus "sets" {name: [[relpath, label, source], ...]} where
    relpath = "<name>/<label>/<file name>" inside the split root and source is relative to data_dir."""
    manifest = dict(header)
    manifest["sets"] = {}
    for name, entries in sets.items():
        rows = sorted([f"{name}/{label}/{source.rsplit('/', 1)[-1]}", label, source] for label, source in entries)
        for a, b in zip(rows, rows[1:]):
            if a[0] == b[0]:
                raise SplitInputError(f"two images map to the same file {a[0]}: {a[2]} and {b[2]}")
        manifest["sets"][name] = rows
    return manifest


def manifest_text(manifest):
    """splits.json text: the header fields indented, then one line per [relpath, label, source] row.
    Deterministic: keys sorted, sets sorted by name, no timestamps."""
    header = json.dumps({k: v for k, v in manifest.items() if k != "sets"}, indent=1, sort_keys=True)
    blocks = []
    for name in sorted(manifest["sets"]):
        rows = ",\n".join("   " + json.dumps(row) for row in manifest["sets"][name])
        blocks.append(f"  {json.dumps(name)}: [\n{rows}\n  ]" if rows else f"  {json.dumps(name)}: []")
    return header[:-2] + ',\n "sets": {\n' + ",\n".join(blocks) + "\n }\n}\n"


class FileLinker:
    """Puts a source image at a destination path as a copy, hard link or relative symlink.
    Hard links fall back to copies (once, with a message) where the filesystem refuses them."""

    def __init__(self, mode="hardlink"):
        if mode not in ("copy", "hardlink", "symlink"):
            raise SplitInputError(f"--link must be copy, hardlink or symlink, got {mode!r}")
        self.mode = mode

    def __call__(self, src, dst):
        if self.mode == "hardlink":
            try:
                os.link(src, dst)
                return
            except (FileNotFoundError, FileExistsError):
                raise
            except OSError as e:
                print(f"note: cannot hard-link {src} ({e.strerror}); copying files instead "
                      f"(pass --link symlink to save space)", file=sys.stderr)
                self.mode = "copy"
        if self.mode == "symlink":
            os.symlink(os.path.relpath(os.path.abspath(src), os.path.dirname(os.path.abspath(dst))), dst)
        else:
            shutil.copyfile(src, dst)


def split_script_parser(doc, data_dir, data_dir_help, force_help):
    """The command line shared by the prepare_train_val_test_* scripts."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data_dir", default=data_dir, help=data_dir_help)
    parser.add_argument("--num_splits", type=int, default=10, help="number of query/gallery splits (default 10)")
    parser.add_argument("--link", choices=["copy", "hardlink", "symlink"], default="hardlink",
                        help="how split folders refer to the images (default hardlink; copies where "
                             "the filesystem refuses hard links)")
    parser.add_argument("--force", action="store_true", help=force_help)
    add_common_args(parser)
    return parser


def check_split_roots_free(paths, force):
    """Refuse before doing any work when an output split root exists and --force is not given."""
    for path in paths:
        if os.path.lexists(path) and not force:
            raise SplitInputError(f"{path} already exists; pass --force to replace it "
                                  f"(it is left untouched otherwise)")
        if os.path.lexists(path) and not os.path.isdir(path):
            raise SplitInputError(f"{path} exists and is not a folder; remove it by hand")


def write_split_root(data_dir, root_name, manifest, linker, args, extra=None, desc=None):
    """Build <data_dir>/<root_name> (folders <set>/<label>/<file>, splits.json, prepare_config.json)
    under a temporary name and rename it into place when complete (replacing an old one with --force)."""
    final = os.path.join(data_dir, root_name)
    tmp = os.path.join(data_dir, f".{root_name}.tmp-{os.getpid()}")  # mkdtemp would make it private (0700)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        jobs = [(row[0], row[2]) for rows in manifest["sets"].values() for row in rows]
        for folder in sorted({relpath.rsplit("/", 1)[0] for relpath, _ in jobs}):
            os.makedirs(os.path.join(tmp, folder), exist_ok=True)
        for relpath, source in tqdm(jobs, desc=desc or root_name, unit="file", leave=False,
                                    disable=len(jobs) < 2000 or not sys.stderr.isatty()):
            linker(data_dir + os.sep + source, tmp + os.sep + relpath)
        with open(os.path.join(tmp, SPLITS_MANIFEST), "w") as f:  # the folder itself is the temporary
            f.write(manifest_text(manifest))
        write_run_config(tmp, args, extra={"link_used": linker.mode, **(extra or {})}, name=PREPARE_CONFIG)
        if os.path.lexists(final):
            if not getattr(args, "force", False):
                raise SplitInputError(f"{final} already exists; pass --force to replace it")
            old = os.path.join(data_dir, f".{root_name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def split_counts(sets):
    """Counts for the table: ids and images per set; query/gallery sizes over the splits."""
    def ids(name):
        return len({label for label, _ in sets[name]})

    def sizes(prefix, suffix=""):
        names = [n for n in sets if re.fullmatch(rf"{prefix}\d+{suffix}", n)]
        values = sorted({len(sets[n]) for n in names})
        if not values:
            return "-"
        return values[0] if len(values) == 1 else f"{values[0]}-{values[-1]}"

    return {"train ids": ids("train_all"), "train_all imgs": len(sets["train_all"]),
            "train imgs": len(sets["train"]), "val imgs": len(sets["val"]), "test ids": ids("test"),
            "test imgs": len(sets["test"]), "query{i}": sizes("query"), "gallery{i}": sizes("gallery"),
            "gallery{i}_all": sizes("gallery", "_all")}


def format_split_counts(counts_by_name, first_column="aspect"):
    """Plain-text table from {row name: split_counts(...)}."""
    columns = [first_column] + list(next(iter(counts_by_name.values())))
    rows = [[name] + [str(v) for v in counts.values()] for name, counts in counts_by_name.items()]
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# ---- synthetic hands (tests and demo) ----
# A hand is drawn in local units (palm width ~1, y up): palm, four fingers, thumb and wrist as
# polygons, plus aspect details (dorsal: nails, knuckle creases, moles, rings; palmar: palm lines,
# finger creases). Identity = shape, colour and detail parameters; each image adds pose, scale,
# rotation, lighting, JPEG quality and background noise.

SKIN_TONES = {"very fair": (236, 200, 178), "fair": (222, 176, 146), "medium": (190, 140, 106),
              "dark": (122, 84, 60)}
SYNTHETIC_MARKER = "SYNTHETIC_DATA.json"


def _random_person(rng):
    # skin colour: a point on the very fair -> dark line of SKIN_TONES, plus a little hue noise
    tone = float(np.clip(rng.normal(1.4, 0.9), 0, 3))
    anchors = np.array(list(SKIN_TONES.values()), float)
    lower = min(int(tone), 2)
    skin = anchors[lower] + (tone - lower) * (anchors[lower + 1] - anchors[lower])
    polish = rng.random() < 0.2
    return {
        "tone_name": list(SKIN_TONES)[int(round(tone))],
        "skin": skin * rng.uniform(0.95, 1.05) + rng.normal(0, 4, 3),
        "palm_w": rng.uniform(0.9, 1.1),
        "palm_h": rng.uniform(0.95, 1.3),
        "palm_taper": rng.uniform(-0.12, 0.12),
        "finger_len": np.array([0.92, 1.02, 0.96, 0.74]) * rng.uniform(0.8, 1.15) * rng.uniform(0.9, 1.1, 4),
        "finger_w": rng.uniform(0.17, 0.24) * rng.uniform(0.9, 1.1, 4),
        "finger_gap": rng.uniform(0.8, 1.05),
        "thumb_len": rng.uniform(0.55, 0.8),
        "thumb_w": rng.uniform(0.22, 0.3),
        "thumb_angle": rng.uniform(30, 60),
        "thumb_pos": rng.uniform(-0.3, 0.05),
        "nail_color": (np.array([200, 40, 70]) + rng.normal(0, 40, 3)) if polish else None,
        "nail_len": rng.uniform(0.2, 0.38),
        "crease_dark": rng.uniform(0.72, 0.88),
        "palm_lines": rng.uniform(-1, 1, 8),
        "age": int(rng.integers(18, 76)),
        "gender": "female" if rng.random() < 0.6 else "male",
        "polish": int(polish),
    }


def _random_hand_side(rng):
    """What differs between a person's left and right hand, and between its back and palm."""
    ring = None
    if rng.random() < 0.35:
        metal = [(212, 175, 55), (196, 196, 206), (60, 60, 70)][rng.integers(3)]  # gold, silver, black
        ring = (int(rng.integers(4)), np.array(metal, float))
    return {"len_jitter": rng.uniform(0.96, 1.04, 4), "ring": ring,
            "moles": [(rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.025, 0.045))
                      for _ in range(int(rng.integers(0, 4)))]}


def _capsule(base, angle, length, width, tip_ratio=0.85, n_tip=7):
    """Polygon of a rounded finger starting at `base`, pointing `angle` radians from +y."""
    d = np.array([np.sin(angle), np.cos(angle)])
    n = np.array([d[1], -d[0]])
    r0, r1 = width / 2, width * tip_ratio / 2
    tip = base + d * (length - r1)
    t = np.linspace(0, np.pi, n_tip)[:, None]
    arc = tip + r1 * (np.cos(t) * n + np.sin(t) * d)
    return np.concatenate([[base + r0 * n], arc, [base - r0 * n]])


def _ellipse(center, rx, ry, angle=0.0, n=12):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + center


def _bezier(p0, p1, p2, n=10):
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _draw_hand(draw, person, side, aspect, rng, to_pixels, line_px, accessory):
    """Draw one hand with ImageDraw `draw`; `to_pixels` maps local (N,2) points to pixel (N,2)."""
    palmar = aspect.startswith("palmar")
    # Thumb on the image-left for the back of a right hand and the palm of a left hand.
    mirror = 1.0 if aspect in ("dorsal right", "palmar left") else -1.0
    skin = person["skin"] * (np.array([1.06, 1.0, 0.98]) if palmar else 1.0)
    fill = tuple(int(v) for v in np.clip(skin, 0, 255))
    edge = tuple(int(v) for v in np.clip(skin * 0.75, 0, 255))
    crease = tuple(int(v) for v in np.clip(skin * person["crease_dark"], 0, 255))

    def poly(points, color, outline=None):
        pts = to_pixels(np.asarray(points) * np.array([mirror, 1.0]))
        draw.polygon([tuple(p) for p in pts], fill=color, outline=outline)

    def line(points, color, width=1):
        pts = to_pixels(np.asarray(points) * np.array([mirror, 1.0]))
        draw.line([tuple(p) for p in pts], fill=color, width=max(1, int(round(width * line_px))))

    pw, ph = person["palm_w"], person["palm_h"]
    top, bottom = ph / 2, -ph / 2
    taper = person["palm_taper"]
    # wrist and forearm run off the bottom of the image
    poly([(-0.42 * pw, bottom + 0.1), (0.42 * pw, bottom + 0.1), (0.4 * pw, bottom - 2.5),
          (-0.4 * pw, bottom - 2.5)], fill)
    if accessory:  # a watch band on the wrist (rows with accessories == 1)
        poly([(-0.45 * pw, bottom - 0.25), (0.45 * pw, bottom - 0.25), (0.45 * pw, bottom - 0.45),
              (-0.45 * pw, bottom - 0.45)], (40, 40, 48))
    palm = [(-0.5 * pw * (1 - taper), top), (0.5 * pw * (1 + taper), top), (0.52 * pw, 0.0),
            (0.47 * pw, bottom), (-0.47 * pw, bottom), (-0.53 * pw, 0.0)]
    poly(palm, fill, edge)
    # fingers: index (thumb side, x < 0 before mirroring) to little
    spread = rng.normal(0, 0.06, 4) + rng.uniform(0.0, 0.12) * np.array([-1.5, -0.5, 0.5, 1.5])
    lengths = person["finger_len"] * side["len_jitter"]
    xs = np.array([-0.36, -0.12, 0.12, 0.35]) * pw * person["finger_gap"]
    tips = []
    for k in range(4):
        base = np.array([xs[k], top - 0.12 * (k == 3) - 0.05])
        width, length = person["finger_w"][k], lengths[k]
        poly(_capsule(base, spread[k], length, width), fill, edge)
        d = np.array([np.sin(spread[k]), np.cos(spread[k])])
        nrm = np.array([d[1], -d[0]])
        for frac in ((0.38, 0.7) if palmar else (0.45, 0.72)):
            c = base + d * length * frac
            line([c - nrm * width * 0.35, c + nrm * width * 0.35], crease, 1)
        tips.append((base, d, nrm, width, length))
    thumb_angle = -np.deg2rad(person["thumb_angle"] + rng.normal(0, 6))
    thumb_base = np.array([-0.45 * pw, person["thumb_pos"] * ph])
    poly(_capsule(thumb_base, thumb_angle, person["thumb_len"] + 0.25, person["thumb_w"]), fill, edge)
    td = np.array([np.sin(thumb_angle), np.cos(thumb_angle)])
    tips.append((thumb_base, td, np.array([td[1], -td[0]]), person["thumb_w"], person["thumb_len"] + 0.25))

    if palmar:
        a = person["palm_lines"]
        heart = _bezier(np.array([0.5 * pw, 0.22 * ph]), np.array([0.1 * pw, (0.32 + 0.1 * a[0]) * ph]),
                        np.array([(-0.2 + 0.1 * a[1]) * pw, (0.38 + 0.06 * a[2]) * ph]))
        head = _bezier(np.array([-0.5 * pw, 0.12 * ph]), np.array([0.0, (0.1 + 0.1 * a[3]) * ph]),
                       np.array([(0.35 + 0.1 * a[4]) * pw, (-0.05 + 0.12 * a[5]) * ph]))
        life = _bezier(np.array([-0.48 * pw, 0.1 * ph]), np.array([(-0.15 + 0.1 * a[6]) * pw, -0.05 * ph]),
                       np.array([(-0.2 + 0.1 * a[7]) * pw, -0.5 * ph]))
        for curve in (heart, head, life):
            line(curve, crease, 1.5)
    else:
        nail_color = person["nail_color"]
        if nail_color is None:  # unpolished: a little pinker and lighter than the skin
            nail_color = skin * np.array([1.08, 0.95, 0.95]) + 12
        nail_fill = tuple(int(v) for v in np.clip(nail_color, 0, 255))
        for base, d, nrm, width, length in tips:
            nail_len = person["nail_len"] * length * 0.6
            center = base + d * (length - nail_len / 2 - 0.02)
            poly(_ellipse(center, width * 0.32, nail_len / 2, np.arctan2(d[0], d[1])), nail_fill, edge)
        for x, y, r in side["moles"]:
            poly(_ellipse(np.array([x * pw, y * ph]), r, r, 0, 8), tuple(int(v) for v in skin * 0.45))
        for base, d, nrm, width, _ in tips[:4]:  # knuckle folds just below each finger
            line([base - nrm * width * 0.3 - d * 0.04, base + nrm * width * 0.3 - d * 0.04], crease, 1)
    if side["ring"] is not None:
        k, color = side["ring"]
        base, d, nrm, width, length = tips[k]
        c = base + d * length * 0.2
        band = [c - nrm * width * 0.56, c + nrm * width * 0.56, c + nrm * width * 0.56 + d * 0.08,
                c - nrm * width * 0.56 + d * 0.08]
        poly(band, tuple(int(v) for v in color), (30, 30, 30))


def render_synthetic_hand(person, side, aspect, rng, image_size=(160, 120), accessory=False, supersample=2):
    """One synthetic hand photo (PIL RGB image of size image_size=(W, H)) with random pose and lighting."""
    from PIL import Image, ImageDraw
    W, H = image_size
    w2, h2 = W * supersample, H * supersample
    base_bg = rng.uniform(195, 245) + rng.normal(0, 6, 3)
    blotches = base_bg + rng.normal(0, 7, (3, 4, 3))
    background = Image.fromarray(np.clip(blotches, 0, 255).astype(np.uint8)).resize((W, H), Image.BILINEAR)
    canvas = background.resize((w2, h2), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    scale = rng.uniform(0.3, 0.36) * h2 * rng.uniform(0.9, 1.1)
    angle = np.deg2rad(rng.uniform(-25, 25))
    center = np.array([w2 * rng.uniform(0.42, 0.58), h2 * rng.uniform(0.58, 0.7)])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def to_pixels(points):
        p = points @ rot.T * scale
        return p * np.array([1.0, -1.0]) + center

    _draw_hand(draw, person, side, aspect, rng, to_pixels, supersample * max(1.0, H / 120), accessory)
    img = np.asarray(canvas.reduce(supersample), dtype=np.float32)
    # lighting: overall gain, colour cast and a linear gradient in a random direction
    direction = rng.normal(size=2)
    ramp = ((np.arange(W, dtype=np.float32) / W - 0.5) * direction[0]
            + (np.arange(H, dtype=np.float32)[:, None] / H - 0.5) * direction[1])
    gain = np.float32(rng.uniform(0.86, 1.1)) * (1 + np.float32(rng.uniform(0, 0.25)) * ramp)
    img *= gain[..., None] * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    img += np.float32(rng.uniform(4, 12)) * (rng.random(img.shape, dtype=np.float32) - 0.5)  # sensor noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _prepare_synthetic_root(root, names):
    """Refuse to write into a folder that holds real data (no marker); clear old synthetic output."""
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, SYNTHETIC_MARKER)
    if not os.path.exists(marker):
        present = [n for n in names if os.path.lexists(os.path.join(root, n))]
        if present:
            raise FileExistsError(f"{os.path.join(root, present[0])} exists and {root} has no {SYNTHETIC_MARKER}; "
                                  f"refusing to overwrite what looks like real data. Choose an empty folder.")
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _images_per_id(rng, images_per_id):
    lo, hi = images_per_id
    if lo < 2 or hi < lo:
        raise ValueError(f"images_per_id must be (min, max) with 2 <= min <= max, got {images_per_id}")
    return int(rng.integers(lo, hi + 1))


def make_synthetic_11k(root, num_ids_per_aspect=8, images_per_id=(3, 5), image_size=(160, 120), seed=0,
                       accessory_fraction=0.1):
    """Write a small 11k-format dataset: <root>/HandInfo.csv (the real columns) and
    <root>/Hands/Hand_XXXXXXX.jpg. Each aspect gets num_ids_per_aspect identities, half of them at or
    below its train threshold and half above, drawn from one pool of people so a person appears in
    several aspects (as in 11k). About accessory_fraction of the identities get one extra image with a
    watch (accessories = 1, filtered out by the protocol; at least one per aspect). One row of the last
    dorsal-right test id carries a trailing space, as "1200000 " does in the real file.
    Also writes SYNTHETIC_DATA.json (arguments and ids); refuses a folder that holds real data.
    Same arguments -> byte-identical files. Returns that info dict ("num_images", "ids": {aspect: [id]})."""
    rng = np.random.default_rng(seed)
    n_test = num_ids_per_aspect // 2
    n_train = num_ids_per_aspect - n_test
    lo = min(LAST_TRAIN_ID_11K.values()) - 2 * n_train - 2
    hi = max(LAST_TRAIN_ID_11K.values()) + 2 * n_test + 2
    persons = {pid: _random_person(rng) for pid in range(lo, hi + 1)}
    sides = {(pid, aspect): _random_hand_side(rng) for pid in persons for aspect in ASPECTS_11K}
    ids = {}
    for aspect in ASPECTS_11K:
        last = LAST_TRAIN_ID_11K[aspect]
        below = [p for p in persons if p <= last]
        above = [p for p in persons if p > last]
        ids[aspect] = sorted(rng.choice(below, n_train, replace=False).tolist()
                             + rng.choice(above, n_test, replace=False).tolist())
    _prepare_synthetic_root(root, ["Hands", "HandInfo.csv"])
    os.makedirs(os.path.join(root, "Hands"))
    rows, number = [], 0
    spaced_id = ids["dorsal right"][-1]  # a test id: one of its rows is written as "<id> "
    for aspect in ASPECTS_11K:
        for position, pid in enumerate(ids[aspect]):
            person = persons[pid]
            count = _images_per_id(rng, images_per_id)
            with_watch = rng.random() < accessory_fraction or position == 0  # every aspect has some
            accessories = [0] * count + [1] * int(with_watch)
            for k, accessory in enumerate(accessories):
                number += 1
                name = f"Hand_{number:07d}.jpg"
                img = render_synthetic_hand(person, sides[(pid, aspect)], aspect, rng, image_size, bool(accessory))
                img.save(os.path.join(root, "Hands", name), quality=int(rng.integers(85, 96)))
                id_text = f"{pid:07d}" + (" " if pid == spaced_id and aspect == "dorsal right" and k == 1 else "")
                rows.append([id_text, person["age"], person["gender"], person["tone_name"], accessory,
                             person["polish"], aspect, name, 0])
    buffer = io.StringIO()
    buffer.write(",".join(HAND_INFO_COLUMNS) + "\r\n")  # like the real file: bare header, quoted text values
    csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC).writerows(rows)
    atomic_write_text(os.path.join(root, "HandInfo.csv"), buffer.getvalue())
    info = {"dataset": "11k", "seed": seed, "num_ids_per_aspect": num_ids_per_aspect,
            "images_per_id": list(images_per_id), "image_size": list(image_size), "num_images": len(rows),
            "ids": {aspect: [f"{p:07d}" for p in ids[aspect]] for aspect in ASPECTS_11K}}
    atomic_write_json(os.path.join(root, SYNTHETIC_MARKER), info)
    return info


def make_synthetic_hd(root, num_train_ids=6, num_test_ids=6, num_distractor_ids=4, images_per_id=(3, 5),
                      image_size=(160, 120), seed=0):
    """Write a small HD-format tree: <root>/Original Images/1-501/<id>_<n>.jpg (train ids sampled from
    1..447, test ids from 448..501) and <root>/Original Images/502-712/<id>_<n>.jpg (distractor ids from
    502..712). Dorsal right hands. Same arguments -> byte-identical files."""
    if not (0 < num_train_ids <= HD_LAST_TRAIN_ID and 0 < num_test_ids <= 501 - HD_LAST_TRAIN_ID
            and 0 <= num_distractor_ids <= 211):
        raise ValueError("make_synthetic_hd: need 1..447 train ids, 1..54 test ids and 0..211 distractor ids")
    rng = np.random.default_rng(seed)
    def sample(first, last, count):
        return rng.choice(np.arange(first, last + 1), count, replace=False).tolist()

    groups = {HD_SUBJECT_FOLDER: sorted(sample(1, HD_LAST_TRAIN_ID, num_train_ids)
                                        + sample(HD_LAST_TRAIN_ID + 1, 501, num_test_ids)),
              HD_DISTRACTOR_FOLDER: sorted(sample(502, 712, num_distractor_ids))}
    _prepare_synthetic_root(root, [HD_IMAGE_DIR])
    num_images = 0
    for folder, subject_ids in groups.items():
        out = os.path.join(root, HD_IMAGE_DIR, folder)
        os.makedirs(out)
        for sid in subject_ids:
            person, side = _random_person(rng), _random_hand_side(rng)
            for n in range(1, _images_per_id(rng, images_per_id) + 1):
                img = render_synthetic_hand(person, side, "dorsal right", rng, image_size)
                img.save(os.path.join(out, f"{sid}_{n}.jpg"), quality=int(rng.integers(85, 96)))
                num_images += 1
    info = {"dataset": "HD", "seed": seed, "images_per_id": list(images_per_id), "image_size": list(image_size),
            "num_images": num_images, "ids": {k: [str(v) for v in ids] for k, ids in groups.items()}}
    atomic_write_json(os.path.join(root, SYNTHETIC_MARKER), info)
    return info


# ==== SECTION IMAGES + EVALUATION ================================================
# ---- images ------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageLoadError(ValueError):
    """An image that cannot be read. The message always names the file. It takes a single message
    argument so that a DataLoader worker can re-raise it in the main process."""


def load_image(path, size=None):
    """Read `path` as an RGB PIL image resized (bicubic) to exactly size=(H, W); None keeps the size.
    No centre crop: a crop cuts fingers off. JPEGs are decoded at the smallest DCT scale (1/8, 1/4,
    1/2, 1) whose output is still at least H x W, which is several times faster for large photos."""
    from PIL import Image
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size[1], size[0]))
            img = img.convert("RGB")  # decodes now, so truncated files fail here
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except Exception as e:
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return img


def eval_transform(size, mean=CLIP_MEAN, std=CLIP_STD):
    """Resize to exactly size=(H, W) (bicubic, a no-op for load_image output), to tensor, normalise."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(tuple(size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths; items are (image tensor, index into `paths`)."""

    def __init__(self, paths, size=(224, 224), transform=None):
        self.paths = [os.fspath(p) for p in paths]
        self.size = tuple(size)
        self.transform = transform if transform is not None else eval_transform(self.size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_image(self.paths[index], self.size)), index


def _autocast(device, amp):
    """torch.autocast for `amp` in {"fp16", "bf16"} on CUDA; a no-op context otherwise ("none", CPU)."""
    import contextlib
    if amp in (None, "none") or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


@torch.no_grad()
def extract_features(encode_fn, paths, size=(224, 224), batch_size=64, num_workers=0, device="cpu",
                     flip=False, amp="bf16", mean=CLIP_MEAN, std=CLIP_STD, normalize=True, desc="encode"):
    """Features (N, D) float32 on CPU for `paths`, in order. `encode_fn(images)` maps a normalised
    batch (B, 3, H, W) on `device` to (B, D). With `flip` the feature is the sum of the image's and its
    mirror's features. L2-normalised when `normalize`."""
    from tqdm import tqdm
    if len(paths) == 0:
        raise ValueError("extract_features: no images to encode")
    dataset = ImageListDataset(paths, size, eval_transform(size, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    chunks = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        with _autocast(device, amp):
            feats = encode_fn(images).float()
            if flip:
                feats = feats + encode_fn(images.flip(3)).float()
        chunks.append(feats.cpu())
    feats = torch.cat(chunks)
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats


# ---- retrieval metrics -------------------------------------------------------------------------
# Two conventions (see README):
#   "hand"     MBA-Net / CLIP-HandID / CLIP-FH: trapezoid AP; a query without a true match adds 0
#              to AP and to CMC but stays in the denominators.
#   "standard" torchreid / CLIP-ReID / fast-reid: non-interpolated AP; gallery items with the query's
#              pid AND camera are removed first; queries without a remaining match are skipped.
# Ties in score are broken by gallery order (what a stable descending sort gives).

_COUNTING_MAX_MATCHES = 2  # above this many true matches per query, sorting rows is cheaper than counting


def _count_sorted_below(ascending, rows, values, inclusive):
    """For every pair (rows[p], values[p]): how many entries of the ascending row are < value
    (<= value when inclusive). A binary search run for all pairs at once (log2(G) numpy steps)."""
    num_g = ascending.shape[1]
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), num_g, dtype=np.int64)
    active = lo < hi
    while active.any():
        mid = (lo + hi) // 2
        at_mid = ascending[rows, np.minimum(mid, num_g - 1)]
        go_right = active & ((at_mid <= values) if inclusive else (at_mid < values))
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
        active = lo < hi
    return lo


def _match_ranks(scores, matches, method="auto"):
    """0-based ranks of the true matches in each query's ranked list (descending score, ties by
    gallery order). Returns (query_index, rank) arrays sorted by query, then rank.
    method "count": one pass over the matrix per match slot (the m-th match of every query at once),
    fastest with one or two matches per query (the hand protocol); "bisect": sort every row once,
    then binary-search all matches together; "auto" picks by the largest number of matches."""
    num_q, num_g = scores.shape
    q_idx, g_idx = np.divmod(np.flatnonzero(matches), num_g)
    match_scores = scores[q_idx, g_idx]
    counts = np.bincount(q_idx, minlength=num_q)
    max_matches = int(counts.max()) if len(q_idx) else 0
    if method == "auto":
        method = "count" if max_matches <= _COUNTING_MAX_MATCHES else "bisect"
    if method == "count":
        slot = np.arange(len(q_idx)) - (np.cumsum(counts) - counts)[q_idx]
        higher = np.empty(len(q_idx), dtype=np.int64)
        higher_or_equal = np.empty(len(q_idx), dtype=np.int64)
        for m in range(max_matches):
            in_slot = slot == m
            threshold = np.full((num_q, 1), np.inf, dtype=scores.dtype)
            threshold[q_idx[in_slot], 0] = match_scores[in_slot]
            higher[in_slot] = np.greater(scores, threshold).sum(1, dtype=np.int64)[q_idx[in_slot]]
            higher_or_equal[in_slot] = np.greater_equal(scores, threshold).sum(1, dtype=np.int64)[q_idx[in_slot]]
    elif method == "bisect":
        ascending = np.sort(scores, axis=1)
        higher = num_g - _count_sorted_below(ascending, q_idx, match_scores, inclusive=True)
        higher_or_equal = num_g - _count_sorted_below(ascending, q_idx, match_scores, inclusive=False)
    else:
        raise ValueError(f"unknown ranking method {method!r}; use 'auto', 'count' or 'bisect'")
    ranks = higher
    tied = np.flatnonzero(higher_or_equal - higher > 1)  # another item has exactly the match's score
    if len(tied):
        rows = scores[q_idx[tied]]
        earlier = np.arange(num_g)[None, :] < g_idx[tied][:, None]
        ranks[tied] += np.count_nonzero((rows == match_scores[tied][:, None]) & earlier, axis=1)
    order = np.lexsort((ranks, q_idx))
    return q_idx[order], ranks[order]


def _metrics_from_ranks(q_idx, ranks, num_q, max_rank, convention):
    """CMC, mAP, mINP and per-query AP, INP, first_rank from the sorted match ranks."""
    counts = np.bincount(q_idx, minlength=num_q)
    has_match = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    hit_number = (np.arange(len(q_idx)) - starts[q_idx] + 1).astype(np.float64)  # i = 1..n per query
    precision = hit_number / (ranks + 1)
    if convention == "hand":
        # trapezoid rule: mean of the precision just before and at each hit (1 before rank 0)
        before = np.where(ranks == 0, 1.0, (hit_number - 1) / np.maximum(ranks, 1))
        terms = (before + precision) / 2
    elif convention == "standard":
        terms = precision
    else:
        raise ValueError(f"unknown metric convention {convention!r}; use 'hand' or 'standard'")
    ap = np.bincount(q_idx, weights=terms, minlength=num_q) / np.maximum(counts, 1)
    first_rank = np.full(num_q, -1, dtype=np.int64)
    last_rank = np.full(num_q, -1, dtype=np.int64)
    first_rank[has_match] = ranks[starts[has_match]]
    last_rank[has_match] = ranks[starts[has_match] + counts[has_match] - 1]
    inp = np.where(has_match, counts / np.maximum(last_rank + 1.0, 1.0), 0.0)
    counted = np.ones(num_q, dtype=bool) if convention == "hand" else has_match
    num_counted = int(counted.sum())
    if num_counted == 0:
        raise ValueError("no query has a true match in the gallery; nothing to evaluate")
    hits = first_rank[counted & has_match]
    cmc = np.cumsum(np.bincount(hits[hits < max_rank], minlength=max_rank)[:max_rank]) / num_counted
    return {"cmc": cmc, "mAP": float(ap[counted].sum() / num_counted),
            "mINP": float(inp[counted].sum() / num_counted), "AP": ap, "INP": inp,
            "first_rank": first_rank, "num_queries": num_q, "num_valid": num_counted}


def rank_metrics(scores, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=50,
                 convention="hand", distance=False, method="auto"):
    """Retrieval metrics for a (num_query, num_gallery) score matrix, computed for all queries at
    once (no per-query loop). Higher scores rank first; `distance=True` means lower ranks first.
    Returns cmc (max_rank,), mAP, mINP and per-query AP, INP, first_rank (-1 when no match).
    convention "hand": trapezoid AP, every query counts (no match -> 0), cameras not allowed.
    convention "standard": non-interpolated AP, same pid+camera gallery items removed when cameras
    are given, queries without a match skipped."""
    scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if distance:
        scores = -scores
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    if scores.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"score matrix shape {scores.shape} does not match {len(q_pids)} query and "
                         f"{len(g_pids)} gallery labels")
    if not np.isfinite(scores).all():
        raise ValueError("score matrix contains NaN or infinite values")
    matches = q_pids[:, None] == g_pids[None, :]
    if (q_camids is None) != (g_camids is None):
        raise ValueError("give both q_camids and g_camids, or neither")
    if q_camids is not None:
        if convention == "hand":
            raise ValueError("the 'hand' convention has no camera filtering; use convention='standard'")
        same_cam = np.asarray(q_camids).reshape(-1)[:, None] == np.asarray(g_camids).reshape(-1)[None, :]
        junk = matches & same_cam
        matches = matches & ~junk
        scores = np.where(junk, -np.inf, scores)  # ranked below every real item, never counted
    q_idx, ranks = _match_ranks(scores, matches, method)
    return _metrics_from_ranks(q_idx, ranks, len(q_pids), max_rank, convention)


REPORTED_RANKS = (1, 5, 10, 20)
METRIC_NAMES = ("rank1", "rank5", "rank10", "rank20", "mAP_hand", "mAP_standard", "mINP")


def query_gallery_metrics(sim, q_labels, g_labels, max_rank=50):
    """Every reported metric for one query/gallery pair (no cameras): Rank-1/5/10/20 and mAP in the
    hand convention, mAP in the standard convention, mINP (all queries; no match counts 0)."""
    sim = sim.detach().cpu().numpy() if torch.is_tensor(sim) else np.asarray(sim)
    matches = np.asarray(q_labels)[:, None] == np.asarray(g_labels)[None, :]
    q_idx, ranks = _match_ranks(sim, matches)
    length = max(max_rank, max(REPORTED_RANKS))
    hand = _metrics_from_ranks(q_idx, ranks, len(sim), length, "hand")
    out = {f"rank{k}": float(hand["cmc"][k - 1]) for k in REPORTED_RANKS}
    out["mAP_hand"] = hand["mAP"]
    out["mINP"] = hand["mINP"]
    if (hand["first_rank"] >= 0).any():
        out["mAP_standard"] = _metrics_from_ranks(q_idx, ranks, len(sim), length, "standard")["mAP"]
    else:
        out["mAP_standard"] = 0.0
    out["num_query_without_match"] = int((hand["first_rank"] < 0).sum())
    out["cmc"] = hand["cmc"][:max_rank].tolist()
    return out


def re_ranking(qf, gf, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of queries `qf` against gallery `gf`.
    Distances are squared euclidean on the features as given. Returns the (num_q, num_g) re-ranked
    distance (lower = closer). Memory is O((num_q + num_g)^2). The neighbour weights V and the
    Jaccard distance are kept in float16 as in the public code (Zhong et al., TransReID, CLIP-ReID);
    published re-ranked numbers depend on that rounding (float32 moves them by ~1e-3)."""
    qf = torch.as_tensor(qf, dtype=torch.float32).cpu()
    gf = torch.as_tensor(gf, dtype=torch.float32).cpu()
    num_q = len(qf)
    feats = torch.cat([qf, gf])
    num_all = len(feats)
    sq = feats.pow(2).sum(1, keepdim=True)
    dist = (sq + sq.t() - 2 * feats @ feats.t()).numpy()
    dist = np.transpose(dist / np.max(dist, axis=0))  # column-normalised, as in the original
    initial_rank = np.argsort(dist, axis=1).astype(np.int32)

    def reciprocal_neighbours(k):
        # R[i, j]: j is among i's top-(k+1) neighbours and i among j's
        top = np.zeros((num_all, num_all), dtype=bool)
        np.put_along_axis(top, initial_rank[:, :k + 1].astype(np.int64), True, axis=1)
        return top & top.T

    recip = reciprocal_neighbours(k1)
    recip_half = reciprocal_neighbours(int(np.around(k1 / 2.0)))
    # expand R(i) by R(j, k1/2) for each j in R(i) when more than 2/3 of R(j, k1/2) is already in R(i)
    overlap = recip.astype(np.float32) @ recip_half.T.astype(np.float32)
    half_size = recip_half.sum(1)
    absorb = recip & (overlap > 2.0 / 3 * half_size[None, :])
    expanded = recip | ((absorb.astype(np.float32) @ recip_half.astype(np.float32)) > 0)

    V = np.zeros((num_all, num_all), dtype=np.float16)
    for i in range(num_all):  # per-row sums, in the original's order, so float16 rounding matches
        members = np.flatnonzero(expanded[i])
        weight = np.exp(-dist[i, members])
        V[i, members] = weight / np.sum(weight)
    if k2 != 1:
        V = np.mean(V[initial_rank[:, :k2]], axis=1)  # float32 accumulation, float16 result
    dist = dist[:num_q]
    V_columns = np.ascontiguousarray(V.T)
    jaccard = np.zeros((num_q, num_all), dtype=np.float16)
    for i in range(num_q):
        # float16 running sum over the query's non-zero columns in order, as the reference code does
        shared = np.zeros(num_all, dtype=np.float16)
        for j in np.flatnonzero(V[i]):
            shared += np.minimum(V[i, j], V_columns[j])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:, num_q:]


# ---- query / gallery evaluation over Monte-Carlo splits ---------------------------------------

GALLERY_VARIANTS = ("own", "all")


def gallery_set_name(split, variant):
    """'own' -> gallery{i} (this aspect's identities); 'all' -> gallery{i}_all (plus distractors)."""
    return f"gallery{split}" if variant == "own" else f"gallery{split}_all"


def result_mat_name(split, variant):
    return f"result_split{split}.mat" if variant == "own" else f"result_split{split}_all.mat"


def _read_manifest(test_dir):
    path = os.path.join(test_dir, "splits.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read split manifest {path}: {e}") from e
    if not isinstance(manifest.get("sets"), dict):
        raise ValueError(f"split manifest {path} has no 'sets'; re-run the prepare script")
    return manifest


def read_split_layout(test_dir):
    """How many query/gallery splits `test_dir` holds and which gallery variants, from splits.json
    when present, else from the folder names. Returns {"dataset", "num_splits", "gallery_variants",
    "manifest": bool}."""
    if not os.path.isdir(test_dir):
        raise ValueError(f"--test_dir {test_dir} is not a folder; point it at a split root made by a "
                         f"prepare_train_val_test_*.py script (it holds query0/, gallery0/, ...)")
    manifest = _read_manifest(test_dir)
    names = set(manifest["sets"]) if manifest else {
        n for n in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, n))}
    num_splits = 0
    while f"query{num_splits}" in names and f"gallery{num_splits}" in names:
        num_splits += 1
    if num_splits == 0:
        raise ValueError(f"{test_dir} has no query0/ and gallery0/ " + ("sets in splits.json" if manifest
                         else "folders") + "; is it a split root made by a prepare script?")
    if manifest and manifest.get("gallery_variants"):
        variants = [v for v in GALLERY_VARIANTS if v in manifest["gallery_variants"]]
    else:
        has_all = all(gallery_set_name(i, "all") in names for i in range(num_splits))
        variants = ["own", "all"] if has_all else ["own"]
    dataset = (manifest or {}).get("dataset") or ("11k" if "all" in variants else "unknown")
    return {"dataset": dataset, "num_splits": num_splits, "gallery_variants": variants,
            "manifest": manifest is not None}


def read_split_sets(test_dir, split_names):
    """{name: [(path, label, key), ...]} for the named sets of a split root. From splits.json when
    present (key = the image's `source`, so the copies of one image in different sets share a key);
    else from the folders <test_dir>/<name>/<label>/<file> (key = label/file name/size). Paths are
    absolute, so result files stay usable from any working directory."""
    test_dir = os.path.abspath(test_dir)
    manifest = _read_manifest(test_dir)
    sets = {}
    for name in split_names:
        if manifest is not None:
            if name not in manifest["sets"]:
                raise ValueError(f"{os.path.join(test_dir, 'splits.json')} has no set '{name}'")
            sets[name] = [(os.path.join(test_dir, *relpath.split("/")), str(label), "source:" + source)
                          for relpath, label, source in manifest["sets"][name]]
            continue
        folder = os.path.join(test_dir, name)
        if not os.path.isdir(folder):
            raise ValueError(f"split folder {folder} is missing")
        entries = []
        for label in sorted(os.listdir(folder)):
            label_dir = os.path.join(folder, label)
            if not os.path.isdir(label_dir):
                continue
            for file in sorted(os.listdir(label_dir)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(label_dir, file)
                    entries.append((path, label, f"file:{label}/{file}/{os.path.getsize(path)}"))
        if not entries:
            raise ValueError(f"split folder {folder} holds no images (expected {folder}/<identity>/<image>)")
        sets[name] = entries
    return sets


def _labels_for_mat(labels):
    """Integer labels when every label is a number (CLIP-HandID's format), else strings."""
    if all(label.strip().lstrip("-").isdigit() for label in labels):
        return np.array([int(label) for label in labels], dtype=np.int64)
    return np.array(labels, dtype=object)


def load_result_mat(path):
    """Read a result_split{i}.mat back: features float32 (N, D), labels and paths as 1-D arrays
    (paths None for files without them), rerank_dist (Q, G) or None."""
    import scipy.io
    if not os.path.isfile(path):
        raise ValueError(f"result file {path} does not exist; run an eval_query_gallery_*.py script first")
    mat = scipy.io.loadmat(path)
    missing = [k for k in ("query_f", "query_label", "gallery_f", "gallery_label") if k not in mat]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it is not a result file of our evaluators")

    def strings(key):
        if key not in mat:
            return None
        return np.array([str(np.asarray(v).reshape(-1)[0]) if np.size(v) else "" for v in mat[key].reshape(-1)])

    def labels(key):
        values = mat[key].reshape(-1)
        return values if values.dtype != object else strings(key)

    return {"query_f": mat["query_f"].astype(np.float32), "query_label": labels("query_label"),
            "query_path": strings("query_path"), "gallery_f": mat["gallery_f"].astype(np.float32),
            "gallery_label": labels("gallery_label"), "gallery_path": strings("gallery_path"),
            "rerank_dist": mat["rerank_dist"].astype(np.float32) if "rerank_dist" in mat else None}


def _metric_table(rows, columns):
    """Plain-text table of mean ± std (percent) for extra metric columns [(header, key)]."""
    cells = [(name, [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in (mean_std(metrics[key]) for _, key in columns)])
             for name, metrics in rows]
    name_width = max([len("method")] + [len(name) for name, _ in cells])
    width = max([len(c) for _, row in cells for c in row] + [len(h) for h, _ in columns])
    header = "method".ljust(name_width) + " | " + " | ".join(h.rjust(width) for h, _ in columns)
    lines = [header, "-" * len(header)]
    lines += [name.ljust(name_width) + " | " + " | ".join(c.rjust(width) for c in row) for name, row in cells]
    return "\n".join(lines)


def evaluate_query_gallery(encode_fn, test_dir, out_dir, *, gallery=None, method_name="model",
                           input_size=(224, 224), batch_size=64, num_workers=0, device="cpu", flip=False,
                           amp="bf16", max_rank=50, mean=CLIP_MEAN, std=CLIP_STD, rerank=None,
                           overwrite=False, extra=None, verbose=True):
    """The query/gallery evaluation shared by the zero-shot and fine-tuned evaluators.

    encode_fn(images) -> (B, D) features for a normalised batch (B, 3, H, W) already on `device`
    (called under torch.no_grad and, on CUDA, autocast `amp`). Every image of every query{i},
    gallery{i} and gallery{i}_all of the split root `test_dir` is encoded exactly once (the sets
    share images); with `flip` the feature is f(x) + f(mirror(x)); features are L2-normalised and
    ranked by cosine similarity, or by the k-reciprocal re-ranked distance when `rerank` is a dict
    {"k1", "k2", "lambda_value"} (then the .mat files also hold it as `rerank_dist`).
    gallery: "own", "all", "both" or None (every variant the split root has: 11k own + all, HD own).
    Writes to `out_dir`: result_split{i}.mat (own gallery) and result_split{i}_all.mat
    (gallery{i}_all) with query_f, query_label, query_path, gallery_f, gallery_label, gallery_path;
    results.json; results.csv (a row per split and variant, then mean and std rows). Prints the
    paper-style table. Returns the results dict (as in results.json)."""
    import time
    layout = read_split_layout(test_dir)
    available = layout["gallery_variants"]
    wanted = list(available) if gallery in (None, "both") else [gallery]
    if gallery == "both" and "all" not in available:
        wanted = ["own"]  # HD has no gallery{i}_all: 'both' means what there is
    for variant in wanted:
        if variant not in GALLERY_VARIANTS:
            raise ValueError(f"--gallery must be own, all or both, got {gallery!r}")
        if variant not in available:
            raise ValueError(f"{test_dir} has no gallery{{i}}_all sets (HD-style split root); use --gallery own")
    results_path = os.path.join(out_dir, "results.json")
    if os.path.exists(results_path) and not overwrite:
        raise FileExistsError(f"{results_path} already exists; pass --force to overwrite it or choose "
                              f"another --f_name")
    splits = list(range(layout["num_splits"]))
    names = [f"query{i}" for i in splits] + [gallery_set_name(i, v) for i in splits for v in wanted]
    sets = read_split_sets(test_dir, names)

    # the union of all sets, each image once (first path seen for each key)
    index_of_key, unique_paths = {}, []
    for name in names:
        for path, _, key in sets[name]:
            if key not in index_of_key:
                index_of_key[key] = len(unique_paths)
                unique_paths.append(path)
    missing = [p for p in unique_paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{len(missing)} image(s) listed for {test_dir} are missing, e.g. {missing[0]}; "
                         f"re-run the prepare script")
    start = time.time()
    features = extract_features(encode_fn, unique_paths, size=input_size, batch_size=batch_size,
                                num_workers=num_workers, device=device, flip=flip, amp=amp, mean=mean,
                                std=std, desc=f"encode {len(unique_paths)} images").numpy()
    encode_seconds = time.time() - start
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ValueError(f"the encoder produced NaN/inf features for {len(bad)} image(s), e.g. "
                         f"{unique_paths[bad[0]]}; try --amp off or check the checkpoint")

    if overwrite:  # leftovers of an earlier run (e.g. with more splits) would not match this one
        for file in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
            if file.startswith("result_split") and file.endswith(".mat"):
                os.remove(os.path.join(out_dir, file))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in splits:
        query = sets[f"query{i}"]
        query_f = features[[index_of_key[key] for _, _, key in query]]
        query_labels = [label for _, label, _ in query]
        for variant in wanted:
            gallery_set = sets[gallery_set_name(i, variant)]
            gallery_f = features[[index_of_key[key] for _, _, key in gallery_set]]
            gallery_labels = [label for _, label, _ in gallery_set]
            mat_extra = {}
            if rerank:
                rerank_dist = re_ranking(query_f, gallery_f, **rerank)
                scores, mat_extra["rerank_dist"] = -rerank_dist, rerank_dist.astype(np.float32)
            else:
                scores = query_f @ gallery_f.T
            metrics = query_gallery_metrics(scores, np.array(query_labels), np.array(gallery_labels),
                                            max_rank=max_rank)
            rows.append({"split": i, "gallery": variant, "query_set": f"query{i}",
                         "gallery_set": gallery_set_name(i, variant), "num_query": len(query),
                         "num_gallery": len(gallery_set), **metrics})
            atomic_savemat(os.path.join(out_dir, result_mat_name(i, variant)), {
                "query_f": query_f, "query_label": _labels_for_mat(query_labels),
                "query_path": np.array([p for p, _, _ in query], dtype=object),
                "gallery_f": gallery_f, "gallery_label": _labels_for_mat(gallery_labels),
                "gallery_path": np.array([p for p, _, _ in gallery_set], dtype=object), **mat_extra})

    summary = {}
    for variant in wanted:
        mine = [r for r in rows if r["gallery"] == variant]
        summary[variant] = {"mean": {k: mean_std([r[k] for r in mine])[0] for k in METRIC_NAMES},
                            "std": {k: mean_std([r[k] for r in mine])[1] for k in METRIC_NAMES},
                            "cmc_mean": np.mean([r["cmc"] for r in mine], axis=0).tolist()}
    results = {"method": method_name, "test_dir": os.path.abspath(test_dir), "dataset": layout["dataset"],
               "num_splits": len(splits), "gallery_variants": wanted, "metrics": list(METRIC_NAMES),
               "metric_conventions": {
                   "rank1..rank20, mAP_hand, mINP": "all queries count; a query without a true match "
                                                   "counts 0 (MBA-Net / CLIP-HandID / CLIP-FH)",
                   "mAP_hand": "trapezoid-rule AP (MBA-Net / CLIP-HandID / CLIP-FH tables)",
                   "mAP_standard": "non-interpolated AP over queries with a match (torchreid / "
                                   "CLIP-ReID / fast-reid)"},
               "input_size": list(input_size), "flip": bool(flip), "rerank": dict(rerank) if rerank else None,
               "feature_dim": int(features.shape[1]),
               "num_images_encoded": len(unique_paths), "encode_seconds": round(encode_seconds, 3),
               "rows": rows, "summary": summary, **(extra or {})}
    atomic_write_json(results_path, results)
    csv_columns = ["split", "gallery", "num_query", "num_gallery", *METRIC_NAMES]
    lines = [",".join(csv_columns)]
    for row in rows:
        lines.append(",".join(str(row[c]) if c in ("split", "gallery", "num_query", "num_gallery")
                              else f"{row[c]:.6f}" for c in csv_columns))
    for variant in wanted:
        for stat in ("mean", "std"):
            values = summary[variant][stat]
            lines.append(",".join([stat, variant, "", ""] + [f"{values[k]:.6f}" for k in METRIC_NAMES]))
    atomic_write_text(os.path.join(out_dir, "results.csv"), "\n".join(lines) + "\n")

    if verbose:
        table_rows = []
        for variant in wanted:
            mine = [r for r in rows if r["gallery"] == variant]
            per_split = {k: [r[k] for r in mine] for k in METRIC_NAMES}
            per_split["mAP"] = per_split["mAP_hand"]
            table_rows.append((f"{method_name} [gallery {variant}]", per_split))
        print(format_results_table(table_rows, title=f"{test_dir}: mean ± std over {len(splits)} "
                                                     f"split(s), percent; mAP = hand convention"))
        print(_metric_table(table_rows, [("Rank-20", "rank20"), ("mAP (standard)", "mAP_standard"),
                                         ("mINP", "mINP")]))
    return results


# ==== SECTION TRAINING ==========================================================
# Pieces shared by train_finetune.py and the CLIP-ReID / PromptSG trainers: data sets and samplers,
# transforms, LR schedule, optimizer groups, AMP, a generic training epoch, validation, checkpoints
# with resume, metrics/log writers and DDP set-up.


class TrainingInputError(ValueError):
    """Bad training input (data folder, flags, checkpoint); the message says what to fix."""


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss; the message names the epoch and batch."""


# ---- data sets ----

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
    with load_image, or read from a ResizedImageCache of the same items and size."""

    def __init__(self, items, size, transform, cache=None):
        self.paths = [p for p, _ in items]
        self.labels = [int(label) for _, label in items]
        self.size = tuple(size)
        self.transform = transform
        self.cache = cache
        if cache is not None and (cache.paths != self.paths or cache.size != self.size):
            raise ValueError("the resized-image cache was built for other images or another size")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.cache is not None:
            image = self.cache.image(index)
        else:
            image = load_image(self.paths[index], size=self.size)
        return self.transform(image), self.labels[index]


class ResizedImageCache:
    """One-time cache of images decoded and resized (bicubic) to `size` (H, W), stored as one uint8
    array (N, H, W, 3) in `cache_dir`; later runs memory-map it instead of decoding JPEGs. A cache
    whose key (paths, file sizes and mtimes, size) differs is rebuilt."""

    def __init__(self, paths, size, cache_dir, desc="caching resized images"):
        self.paths = list(paths)
        self.size = tuple(int(s) for s in size)
        key_text = json.dumps([self.size, [(p, os.path.getsize(p), int(os.path.getmtime(p)))
                                           for p in self.paths]])
        import hashlib
        digest = hashlib.sha1(key_text.encode()).hexdigest()[:16]
        self.file = os.path.join(cache_dir, f"resized_{self.size[0]}x{self.size[1]}_{digest}.npy")
        if not os.path.exists(self.file):
            self._build(desc)
        self._array = None

    def _build(self, desc):
        height, width = self.size
        array = np.empty((len(self.paths), height, width, 3), dtype=np.uint8)
        for i, path in enumerate(tqdm(self.paths, desc=desc, leave=False)):
            array[i] = np.asarray(load_image(path, size=self.size), dtype=np.uint8)
        _atomic_write(self.file, lambda f: np.save(f, array), mode="wb")

    def image(self, index):
        from PIL import Image
        if self._array is None:  # opened lazily so DataLoader workers each map the file
            self._array = np.load(self.file, mmap_mode="r")
        return Image.fromarray(np.array(self._array[index]))

    def __getstate__(self):
        return dict(self.__dict__, _array=None)


# ---- samplers (deterministic per (seed, epoch); each DDP rank takes its share) ----

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


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed, epoch):
    """Global RNG seed of an epoch, so augmentation in the main process is the same after resume."""
    return (int(seed) * 100_003 + int(epoch) * 7919) % 2 ** 31


# ---- optimisation ----

class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Per-epoch schedule (CLIP-HandID): linear warm-up from warmup_factor x lr over warmup_epochs,
    then x gamma at every milestone. Factor at epoch e < warmup_epochs: f + (1 - f) * e / warmup_epochs;
    afterwards gamma ** (number of milestones <= e). Call step() once after every epoch."""

    def __init__(self, optimizer, milestones=(40, 60), gamma=0.5, warmup_epochs=10, warmup_factor=0.01,
                 last_epoch=-1):
        if list(milestones) != sorted(milestones):
            raise TrainingInputError(f"--milestones must be increasing, got {list(milestones)}")
        self.milestones = [int(m) for m in milestones]
        self.gamma, self.warmup_epochs, self.warmup_factor = float(gamma), int(warmup_epochs), float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, epoch):
        if epoch < self.warmup_epochs:
            return self.warmup_factor + (1 - self.warmup_factor) * epoch / self.warmup_epochs
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def get_lr(self):
        return [base_lr * self.lr_factor(self.last_epoch) for base_lr in self.base_lrs]


def param_groups(model, lr, weight_decay, head_lr_mult=10.0, backbone_prefixes=("visual.",)):
    """Two groups of trainable parameters: the pretrained encoder (names starting with one of
    backbone_prefixes) at lr and every new layer at head_lr_mult x lr. Frozen parameters
    (requires_grad False) are left out."""
    backbone, heads = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith(tuple(backbone_prefixes)) else heads).append(param)
    groups = [{"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
              {"params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay, "name": "heads"}]
    return [g for g in groups if g["params"]]


def make_optimizer(name, groups, lr, weight_decay):
    """adam (coupled L2, as CLIP-HandID), adamw (decoupled) or sgd (momentum 0.9, Nesterov)."""
    name = name.lower()
    params = [p for group in groups for p in group["params"]]
    # the fused kernels run the whole update in a few launches, but need every parameter on CUDA
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise TrainingInputError(f"--optimizer must be adam, adamw or sgd, got {name!r}")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ["none", "bf16", "fp16"]


def resolve_amp(amp, device):
    """None/"auto" -> bf16 on CUDA, none elsewhere."""
    if amp in (None, "auto"):
        return "bf16" if str(device).startswith("cuda") else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise TrainingInputError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    return amp


def autocast(amp, device):
    device_type = torch.device(device).type
    if amp == "none":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(amp, device):
    """A GradScaler, active only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "fp16"))


# ---- one training epoch ----

@dataclass
class EpochResult:
    losses: dict
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self):
        return self.images / max(self.seconds, 1e-9)


def _first_bad(values, epoch, offset, names, dist_info):
    """Raise NonFiniteLossError if any recorded loss is NaN/inf (on any rank); batches count from 1."""
    stacked = torch.stack(values)  # (steps, terms)
    finite = torch.isfinite(stacked).all(dim=1)
    bad = (~finite).any().float()
    if dist_info is not None and dist_info.distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() == 0:
        return
    steps = (~finite).nonzero().flatten().tolist()
    if steps:
        step = steps[0]
        terms = {n: float(v) for n, v in zip(names, stacked[step].tolist())}
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, batch {offset + step + 1}: {terms}")
    raise NonFiniteLossError(f"non-finite loss on another rank at epoch {epoch}, batches "
                             f"{offset + 1}..{offset + len(values)}")


def train_one_epoch(model, loader, compute_loss, optimizers, scaler, amp, device, epoch, grad_clip=None,
                    dist_info=None, check_every=20, progress=True):
    """Generic training epoch.

    compute_loss(model, images, labels) -> (total loss, {term name: loss tensor}, logits or None)
    runs under autocast. optimizers: list; the first one's parameters are gradient-clipped
    (clip_grad_norm_ to grad_clip, after unscaling and BEFORE the step). Loss terms are checked for
    NaN/inf every `check_every` batches and at the end (NonFiniteLossError names epoch and batch; the
    caller keeps the last good checkpoint). Returns an EpochResult with mean losses over batches and
    the training accuracy of the logits."""
    model.train()
    names, recorded, offset = None, [], 0
    sums, correct, seen, steps = None, torch.zeros((), device=device), 0, 0
    start = time.perf_counter()
    batches = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(amp, device):
            loss, terms, logits = compute_loss(model, images, labels)
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        if names is None:
            names = ["loss"] + list(terms)
            sums = torch.zeros_like(values)
        recorded.append(values)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizers[0])
            params = [p for group in optimizers[0].param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        sums += values
        if logits is not None:
            correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
        steps += 1
        if len(recorded) >= check_every:
            _first_bad(recorded, epoch, offset, names, dist_info)
            offset += len(recorded)
            recorded = []
    if recorded:
        _first_bad(recorded, epoch, offset, names, dist_info)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if steps == 0:
        raise TrainingInputError(f"epoch {epoch} had no full batch: the training set is smaller than one batch "
                                 f"(lower --batch_size)")
    totals = torch.cat([sums, correct.float()[None], torch.tensor([float(seen), float(steps)], device=sums.device)])
    if dist_info is not None and dist_info.distributed:
        torch.distributed.all_reduce(totals)
    totals = totals.tolist()
    num_steps, num_seen = totals[-1], totals[-2]
    losses = {name: totals[i] / num_steps for i, name in enumerate(names)}
    return EpochResult(losses=losses, accuracy=totals[len(names)] / num_seen, images=int(num_seen), seconds=seconds)


# ---- validation ----

@torch.no_grad()
def collect_outputs(forward_fn, loader, device, amp="none", flip=False, progress=False, desc="features"):
    """Concatenated outputs of forward_fn(images) over a loader of (images, labels), as fp32 on the
    CPU. flip=True adds the output for the horizontally flipped images. Returns (outputs, labels)."""
    outputs, labels = [], []
    for images, batch_labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        with autocast(amp, device):
            out = forward_fn(images)
            if flip:
                out = out + forward_fn(torch.flip(images, dims=[3]))
        outputs.append(out.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(outputs), torch.cat(labels)


def validate(feature_fn, logits_fn, val_set, gallery_set, device, amp="none", batch_size=64, num_workers=0):
    """Validation on training identities only: closed-set accuracy of logits_fn(images) on the val
    images, and retrieval with the val images as queries against the gallery (train) images by
    cosine similarity of L2-normalised feature_fn(images). Returns {"val_acc", "val_rank1", "val_mAP"}
    (standard non-interpolated AP: every gallery image of the identity is a true match)."""
    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           pin_memory=str(device).startswith("cuda"))
    val_loader = loader(val_set)
    logits, val_labels = collect_outputs(logits_fn, val_loader, device, amp)
    query_f, _ = collect_outputs(feature_fn, val_loader, device, amp)
    gallery_f, gallery_labels = collect_outputs(feature_fn, loader(gallery_set), device, amp)
    similarity = torch.nn.functional.normalize(query_f, dim=1) @ torch.nn.functional.normalize(gallery_f, dim=1).t()
    metrics = rank_metrics(similarity, val_labels.numpy(), gallery_labels.numpy(), convention="standard")
    return {"val_acc": (logits.argmax(dim=1) == val_labels).float().mean().item(),
            "val_rank1": float(metrics["cmc"][0]), "val_mAP": float(metrics["mAP"])}


# ---- checkpoints ----

def capture_rng_state():
    """Python, NumPy, torch (and CUDA) RNG states in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def save_checkpoint(path, state):
    """Atomic torch.save of a dict of tensors and plain Python values (no pickled objects), so
    load_checkpoint can use weights_only=True."""
    atomic_torch_save(state, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise TrainingInputError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, pickled objects, ...
        raise TrainingInputError(f"cannot read checkpoint {path}: {err}") from None


def checkpoint_path(run_dir, which_epoch="last"):
    """net_last.pth, net_best.pth or net_<N>.pth of a run folder."""
    which = str(which_epoch)
    if which not in ("last", "best") and not which.isdigit():
        raise TrainingInputError(f"--which_epoch must be best, last or an epoch number, got {which!r}")
    return os.path.join(run_dir, f"net_{which}.pth")


def unwrap_model(model):
    return model.module if hasattr(model, "module") else model


# ---- logs, metrics.csv and the training curve ----

def setup_logger(out_dir, is_main=True, name="clipfh.train", filename="train.log"):
    """Logger writing to stdout and <out_dir>/train.log (appended, so a resumed run continues it);
    silent on DDP ranks other than 0."""
    logger = get_logger(out_dir, name)
    close_logger(logger)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not is_main:
        logger.addHandler(logging.NullHandler())  # (without a handler Python prints warnings to stderr)
    else:
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(out_dir, filename))):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    return logger


def get_logger(out_dir, name="clipfh.train"):
    return logging.getLogger(f"{name}.{os.path.abspath(out_dir)}")


def close_logger(logger):
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def write_metrics_csv(path, rows):
    """Rows (dicts) -> CSV, columns in first-seen order; written atomically."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_csv_cell(row.get(c)) for c in columns))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_training_curve(path, rows):
    """training_curve.png: losses, accuracies, val Rank-1/mAP and lr per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]

    def series(key):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    loss_keys = [k for k in rows[0] if k.startswith("loss")] if rows else []
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for key in loss_keys:
        axes[0].plot(*series(key), label=key)
    axes[0].set_title("training losses")
    for key in ("train_acc", "val_acc"):
        axes[1].plot(*series(key), marker=".", label=key)
    axes[1].set_title("closed-set accuracy")
    for key in ("val_rank1", "val_mAP"):
        axes[2].plot(*series(key), marker=".", label=key)
    axes[2].set_title("val retrieval (val vs train)")
    axes[3].plot(*series("lr"), label="lr (encoder)")
    axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.9, wspace=0.25)  # tight_layout is slow
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=72), mode="wb")
    plt.close(fig)


# ---- distributed ----

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) start the process group: nccl on CUDA (one GPU per local rank),
    gloo on CPU. Returns a DistInfo; a plain run gets rank 0 of 1 on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=str(device))
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=str(device))


def cleanup_distributed(dist_info):
    if dist_info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist_info):
    if dist_info.distributed:
        torch.distributed.barrier()


def ranks_agree(model, dist_info):
    """True when every rank holds the same parameters (checksums compared). BatchNorm running
    statistics are not compared: DDP syncs them from rank 0 at each forward, then each rank updates
    them with its own batch; checkpoints hold rank 0's."""
    if not dist_info.distributed:
        return True
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(dist_info.device)
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def broadcast_object(obj, dist_info):
    """Rank 0's `obj` on every rank."""
    if not dist_info.distributed:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


# ---- trainer scaffolding shared by train_finetune.py, train_clipreid.py and train_promptsg.py ----

def parse_pretrained(value, backbone_name):
    """--pretrained true/false, else True for an official CLIP name and None (unknown) for a file."""
    if value is not None:
        return value == "true"
    import clip
    return True if backbone_name in clip.available_models() else None


RUN_FILES = ("config.json", "train.log", "metrics.csv", "training_curve.png", "net_last.pth", "net_best.pth")


def trainer_parser(doc, m_name, several_roots=False):
    """A trainer's ArgumentParser (description: the first paragraph of doc) with the data and output flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_output_args(parser, m_name, several_roots)
    return parser


def add_data_output_args(parser, m_name, several_roots=False):
    g = parser.add_argument_group("data and output")
    if several_roots:
        g.add_argument("--data_dir", nargs="+", default=["./11k/train_val_test_split_dorsal_r"],
                       help="split root(s) holding train/ (or train_all/) and val/; several roots train one model "
                            "on several aspects (each root's identities are separate classes)")
    else:
        g.add_argument("--data_dir", default="./11k/train_val_test_split_dorsal_r",
                       help="split root holding train/ (or train_all/) and val/")
    g.add_argument("--f_name", default="./model_11k_d_r", help="output root")
    g.add_argument("--m_name", default=m_name, help="run folder inside --f_name")
    g.add_argument("--data_type", default="11k", choices=["11k", "HD"], help="dataset kind (recorded in config.json)")
    g.add_argument("--backbone_name", default="ViT-B/16",
                   help="CLIP model name (ViT-B/16, RN50, ...) or path to an OpenAI-format checkpoint")
    g.add_argument("--pretrained", choices=["true", "false"], default=None,
                   help="record whether the backbone weights are pretrained (default: true for official CLIP "
                        "names, unknown for local files)")
    g.add_argument("--train_all", action="store_true",
                   help="train on train_all (train + val); val then overlaps training, so net_best = last epoch")
    g.add_argument("--download_root", default=None, help="where pretrained CLIP weights are cached (~/.cache/clip)")
    g.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    return g


def add_batching_args(parser, batch_size, title="batching"):
    g = parser.add_argument_group(title)
    g.add_argument("--batch_size", type=int, default=batch_size, help="images per batch (per process under DDP)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    return g


def add_sampler_args(group, sampler):
    group.add_argument("--sampler", default=sampler, choices=["random", "pk"])
    group.add_argument("--num_instances", type=int, default=4, help="K images per identity with --sampler pk")


def add_optimisation_args(parser, lr, epochs, warmup_epochs, milestones, gamma, weight_decay=5e-4,
                          title="optimisation", helps=None):
    """The optimiser and learning-rate schedule flags; helps: {flag name: help text}."""
    helps = helps or {}
    g = parser.add_argument_group(title)
    g.add_argument("--lr", type=float, default=lr, help=helps.get("lr"))
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--weight_decay", type=float, default=weight_decay, help=helps.get("weight_decay"))
    g.add_argument("--epochs", type=int, default=epochs, help=helps.get("epochs"))
    g.add_argument("--warmup_epochs", type=int, default=warmup_epochs,
                   help=helps.get("warmup_epochs", "linear warm-up from 0.01 x lr"))
    g.add_argument("--milestones", type=int, nargs="*", default=milestones,
                   help=helps.get("milestones", "epochs where lr is multiplied by --gamma"))
    g.add_argument("--gamma", type=float, default=gamma)
    g.add_argument("--ls", type=float, default=0.1, help=helps.get("ls", "label smoothing of the ID loss (0 disables)"))
    return g


def add_input_args(parser, erasing_p=0.0, cache_root="<data_dir>", color_jitter=True):
    """Augmentation, input geometry and the resized-image cache."""
    group = parser.add_argument_group("augmentation and input")
    if color_jitter:
        group.add_argument("--color_jitter", action="store_true")
    group.add_argument("--erasing_p", type=float, default=erasing_p, help="random erasing probability")
    group.add_argument("--input_size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    group.add_argument("--stride", type=int, default=16, help="ViT patch stride (< patch size: overlapping patches)")
    group.add_argument("--last_stride", type=int, default=1, choices=[1, 2],
                       help="ResNet layer4 stride (1 as in CLIP-HandID: 14x14 map at 224)")
    group.add_argument("--cache_resized", nargs="?", const="", default=None, metavar="DIR",
                       help=f"decode and resize every photo once into a uint8 cache (default DIR: "
                            f"{cache_root}/.cache_resized) so epochs skip JPEG decoding")
    return group


def add_run_control_args(parser, resume_help, final_test_help):
    g = parser.add_argument_group("run control")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES, help="default: bf16 on CUDA, none on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder (CUDA only; the first steps are slower while it compiles)")
    g.add_argument("--grad_clip", type=float, default=0.0, help="max gradient norm (0: off); applied before the step")
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--save_every", type=int, default=10, help="also keep net_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--eval_every", type=int, default=5, help="validate every N epochs (and after the last)")
    g.add_argument("--final_test", action=argparse.BooleanOptionalAction, default=True, help=final_test_help)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    add_common_args(g)
    return g


def common_arg_problems(args):
    """Messages for the flags every trainer shares (a flag still None takes a backbone default later)."""
    problems = []
    for flag in ("batch_size", "epochs", "eval_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be positive, got {value}")
    if args.lr is not None and args.lr <= 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ls < 1:
        problems.append(f"--ls must be in [0, 1), got {args.ls}")
    if not 0 <= args.erasing_p <= 1:
        problems.append(f"--erasing_p must be in [0, 1], got {args.erasing_p}")
    if args.save_every < 0 or args.warmup_epochs < 0 or args.grad_clip < 0:
        problems.append("--save_every, --warmup_epochs and --grad_clip must not be negative")
    if min(args.input_size) < 1 or args.stride < 1:
        problems.append(f"--input_size and --stride must be positive, got {args.input_size} and {args.stride}")
    return problems


def read_config(out_dir):
    with open(os.path.join(out_dir, "config.json")) as f:
        return json.load(f)


def prepare_run_folder(out_dir, args, run_files, resume_file="net_last.pth"):
    """Refuse to overwrite a run without --force; --resume needs `resume_file` in the run folder."""
    if args.resume:
        path = os.path.join(out_dir, resume_file)
        if not os.path.isfile(path):
            raise TrainingInputError(f"--resume: {path} does not exist; start the run without --resume")
        return
    existing = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if existing and not args.force:
        raise TrainingInputError(f"{out_dir} already holds a run ({', '.join(existing)}); pass --resume to "
                                 f"continue it, --force to overwrite it, or choose another --m_name")


def clear_run_folder(out_dir, run_files):
    for name in os.listdir(out_dir):
        if name in run_files or (name.startswith("net_") and name.endswith(".pth")):
            os.remove(os.path.join(out_dir, name))
    if os.path.isdir(os.path.join(out_dir, "final_test")):
        shutil.rmtree(os.path.join(out_dir, "final_test"))


def open_run_folder(out_dir, args, dist_info, run_files):
    """Create (or with --force, empty) the run folder on rank 0, then open train.log on every rank."""
    barrier(dist_info)
    if dist_info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if args.force and not args.resume:
            clear_run_folder(out_dir, run_files)
    barrier(dist_info)
    log = setup_logger(out_dir, dist_info.is_main)
    log.info("command: " + " ".join(sys.argv))
    return log


def val_gallery_items(train_items, val_items, train_all):
    """The gallery the val queries are ranked against: the training images, without the val images
    themselves when training on train_all (which contains them)."""
    if not train_all:
        return train_items
    val_files = {(os.path.basename(p), label) for p, label in val_items}
    return [(p, label) for p, label in train_items if (os.path.basename(p), label) not in val_files]


def build_datasets(args, data, input_size, dist_info):
    """(train set with augmentation, val set, val gallery = train images) of one split root."""
    load_size = train_load_size(input_size)
    gallery_items = val_gallery_items(data["train"], data["val"], args.train_all)
    caches = {"train": None, "val": None, "gallery": None}
    if args.cache_resized is not None:
        cache_dir = args.cache_resized or os.path.join(args.data_dir, ".cache_resized")
        wanted = {"train": (data["train"], load_size), "val": (data["val"], input_size),
                  "gallery": (gallery_items, input_size)}
        for turn in ("main", "others"):  # rank 0 builds the cache files, the other ranks then open them
            if (turn == "main") == dist_info.is_main:
                for name, (items, size) in wanted.items():
                    caches[name] = ResizedImageCache([p for p, _ in items], size, cache_dir,
                                                     desc=f"caching {name} images at {size[0]}x{size[1]}")
            barrier(dist_info)
    eval_tf = eval_transform(input_size)
    train_set = LabeledImageDataset(data["train"], load_size,
                                    build_train_transform(input_size, args.color_jitter, args.erasing_p),
                                    caches["train"])
    val_set = LabeledImageDataset(data["val"], input_size, eval_tf, caches["val"])
    gallery_set = LabeledImageDataset(gallery_items, input_size, eval_tf, caches["gallery"])
    return train_set, val_set, gallery_set


def make_sampler(args, train_set, dist_info, log):
    if args.sampler == "pk":
        sampler = PKSampler(train_set.labels, args.batch_size, args.num_instances, seed=args.seed,
                            rank=dist_info.rank, world_size=dist_info.world_size)
        if sampler.rare_labels:
            log.warning(f"warning: --sampler pk: {len(sampler.rare_labels)} identities have fewer than "
                        f"--num_instances {args.num_instances} training images; their images are drawn again "
                        f"(with replacement) to fill {args.num_instances} instances per batch")
    else:
        sampler = ShuffleSampler(len(train_set), args.batch_size, seed=args.seed, rank=dist_info.rank,
                                 world_size=dist_info.world_size)
    if len(sampler) == 0:
        raise TrainingInputError(
            f"the training set ({len(train_set)} images) does not fill one batch of {args.batch_size} per process "
            f"x {dist_info.world_size} process(es) with --sampler {args.sampler}; lower --batch_size")
    return sampler


def wrap_ddp(module, dist_info):
    if not dist_info.distributed:
        return module
    device_ids = [dist_info.local_rank] if dist_info.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def check_world_size(state, dist_info, path):
    if state.get("world_size", 1) != dist_info.world_size:
        raise TrainingInputError(f"{path} was written by a run with {state.get('world_size', 1)} process(es); "
                                 f"resume it with the same number ({dist_info.world_size} now)")


def restore_training_state(state, optimizer, scheduler, scaler, sampler, log, path, stage=""):
    """Everything of net_last.pth besides the weights; returns (history, best, epochs done)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    restore_rng_state(state["rng"])
    log.info(f"{stage + ': ' if stage else ''}resumed from {path} after epoch {state['epoch']}")
    return list(state["history"]), dict(state["best"]), int(state["epoch"])


def write_training_config(out_dir, args, extra, start_epoch=0):
    """config.json of a training run; a resumed run also lists after which epochs it was resumed."""
    if args.resume:
        extra["resumed_after_epochs"] = read_config(out_dir).get("resumed_after_epochs", []) + [start_epoch]
    write_run_config(out_dir, args, extra=extra)


def batch_summary(args, dist_info, amp, speed_note=""):
    """The end of a trainer's start-up log line: batch sizes, AMP, device and speed-ups."""
    text = (f"batch {args.batch_size} x {dist_info.world_size} process(es) = effective batch "
            f"{args.batch_size * dist_info.world_size}; amp {amp}; device {dist_info.device}")
    return text + (f"; {speed_note}" if speed_note else "")


def training_config(args, method, data, amp, dist_info, num_train_images, num_val_images, **extra):
    """The config.json entries every trainer writes besides its arguments (write_run_config adds those)."""
    return {"method": method, "num_classes": len(data["class_names"]), "class_names": data["class_names"],
            "amp": amp, "world_size": dist_info.world_size,
            "effective_batch_size": args.batch_size * dist_info.world_size,
            "pretrained": parse_pretrained(args.pretrained, args.backbone_name), "train_split": data["train_split"],
            "num_train_images": num_train_images, "num_val_images": num_val_images, **extra}


def stopped_by_nonfinite_loss(err, log, last_path, done_epoch, stage=""):
    """Log a NaN/inf loss and return the error that ends the run, naming the last good checkpoint."""
    prefix = f"{stage}: " if stage else ""
    kept = f"{last_path} (after epoch {done_epoch})" if os.path.exists(last_path) else \
        f"none (no {stage + ' ' if stage else ''}epoch finished)"
    log.error(f"{prefix}{err}; stopped. Last good checkpoint: {kept}")
    return NonFiniteLossError(f"{prefix}{err}; training stopped, last good checkpoint: {kept}")


def _call_module(module, images, labels):
    return module(images, labels)


def run_epochs(args, loop, log, history=(), best=None, start_epoch=0, stage="", lr_names=("lr", "lr_heads"),
               accuracy_name="train acc"):
    """The epoch loop of every trainer: train, validate every --eval_every epochs (net_best on val
    mAP, ties to the later epoch, the last epoch with --train_all), write net_last / net_best /
    net_<epoch>.pth, metrics.csv and the curve. `loop` holds:
      model; train_module: module(images, labels) -> (loss, terms, logits), DDP-wrapped if distributed;
      optimizers (the first one is checkpointed), scheduler, scaler, sampler, train_set;
      validate() -> val metrics; record(epoch, row) -> checkpoint dict; extra_state() -> more
      net_last.pth entries (optional); out_dir, dist_info, device, amp.
    Returns (best, history)."""
    out_dir, dist_info, device, amp = loop["out_dir"], loop["dist_info"], loop["device"], loop["amp"]
    optimizers, scheduler, sampler = loop["optimizers"], loop["scheduler"], loop["sampler"]
    history, best = list(history), dict(best or {"epoch": None, "val_mAP": -1.0})
    last_path, best_path = os.path.join(out_dir, "net_last.pth"), os.path.join(out_dir, "net_best.pth")
    for epoch in range(start_epoch, args.epochs):
        number = epoch + 1  # epochs are numbered from 1 in logs and file names
        set_seed(epoch_seed(args.seed, epoch))
        sampler.set_epoch(epoch)
        loader = make_loader(loop["train_set"], args.batch_size, sampler, args.num_workers, args.seed, epoch, device,
                             drop_last=True)
        lrs = [group["lr"] for group in optimizers[0].param_groups]
        try:
            result = train_one_epoch(loop["train_module"], loader, _call_module, optimizers, loop["scaler"], amp,
                                     device, number, grad_clip=args.grad_clip, dist_info=dist_info,
                                     progress=args.progress and dist_info.is_main)
        except NonFiniteLossError as err:
            raise stopped_by_nonfinite_loss(err, log, last_path, history[-1]["epoch"] if history else start_epoch,
                                            stage) from None
        scheduler.step()
        row = {"epoch": number, lr_names[0]: lrs[0], lr_names[1]: lrs[-1], **result.losses,
               "train_acc": result.accuracy, "val_acc": None, "val_rank1": None, "val_mAP": None,
               "images_per_s": result.images_per_s, "epoch_seconds": result.seconds}
        validate_now = number % args.eval_every == 0 or number == args.epochs
        improved = False
        if validate_now and dist_info.is_main:
            loop["model"].eval()
            row.update(loop["validate"]())
            loop["model"].train()
            improved = args.train_all or row["val_mAP"] >= best["val_mAP"]
            if improved:
                best = {"epoch": number, "val_mAP": row["val_mAP"], "val_rank1": row["val_rank1"]}
        history.append(row)
        if dist_info.is_main:
            record = loop["record"](number, row)
            if improved:
                save_checkpoint(best_path, record)
            if args.save_every and number % args.save_every == 0:
                save_checkpoint(os.path.join(out_dir, f"net_{number}.pth"), record)
            state = dict(record, optimizer=optimizers[0].state_dict(), scheduler=scheduler.state_dict(),
                         scaler=loop["scaler"].state_dict(), rng=capture_rng_state(), sampler=sampler.state_dict(),
                         history=history, best=best, world_size=dist_info.world_size)
            if loop.get("extra_state"):
                state.update(loop["extra_state"]())
            save_checkpoint(last_path, state)
            write_metrics_csv(os.path.join(out_dir, "metrics.csv"), history)
            if validate_now:  # drawing costs seconds: only when new val points arrive
                plot_training_curve(os.path.join(out_dir, "training_curve.png"), history)
            losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
            val = (f" | val acc {row['val_acc']:.4f} Rank-1 {row['val_rank1']:.4f} mAP {row['val_mAP']:.4f}"
                   + (" (best)" if improved else "")) if row["val_mAP"] is not None else ""
            log.info(f"{stage + ' ' if stage else ''}epoch {number}/{args.epochs} lr {lrs[0]:.3g} | {losses} | "
                     f"{accuracy_name} {result.accuracy:.4f}{val} | {result.images_per_s:.1f} img/s")
        barrier(dist_info)
    if dist_info.distributed:
        agree = ranks_agree(loop["model"], dist_info)
        log.info(f"model weights {'identical' if agree else 'DIFFERENT'} on all {dist_info.world_size} ranks")
        if not agree:
            raise RuntimeError("DDP ranks ended with different weights; the saved checkpoint is rank 0's")
    return best, history


def final_test(model, args, data_dir, out_dir, folder, method_name, amp, device, log, extra, what="net_best"):
    """Evaluate `model` on the query/gallery splits of data_dir into out_dir/folder with the shared
    pipeline; None (and a log line) when data_dir has no test splits."""
    try:
        read_split_layout(data_dir)
    except ValueError as err:
        log.info(f"final test skipped: {err}")
        return None
    results = evaluate_query_gallery(
        model, data_dir, os.path.join(out_dir, folder), method_name=method_name, input_size=tuple(args.input_size),
        batch_size=max(args.batch_size, 64), num_workers=args.num_workers, device=device, amp=amp, overwrite=True,
        extra=extra)
    variant = results["gallery_variants"][-1]
    mean = results["summary"][variant]["mean"]
    log.info(f"final test ({what}, gallery {variant}): Rank-1 {100 * mean['rank1']:.2f} "
             f"mAP {100 * mean['mAP_hand']:.2f} -> {os.path.join(out_dir, folder)}")
    return results


def start_run(args, dist_info, run_files, resume_file="net_last.pth"):
    """Claim the run folder <f_name>/<m_name> (see prepare_run_folder), open train.log and seed;
    returns (out_dir, log)."""
    out_dir = os.path.join(args.f_name, args.m_name)
    prepare_run_folder(out_dir, args, run_files, resume_file)
    log = open_run_folder(out_dir, args, dist_info, run_files)
    set_seed(args.seed)
    if dist_info.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return out_dir, log


def run_training(args, check_args, train_fn):
    """main() of a trainer: check_args(args), then train_fn(args, dist_info) in this process's share
    of a torchrun job (or alone). Bad input and NaN losses end with a clear message, not a traceback."""
    try:
        check_args(args)
        dist_info = setup_distributed(args.device)
        try:
            return train_fn(args, dist_info)
        finally:
            close_logger(get_logger(os.path.join(args.f_name, args.m_name)))
            cleanup_distributed(dist_info)
    except (TrainingInputError, NonFiniteLossError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
