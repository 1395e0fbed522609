"""The MBA-Net split protocol for 11k Hands and HD: constants, hold-out and Monte-Carlo
query/gallery sets, the split manifest (splits.json) writer and its readers."""
import argparse
import csv
import json
import os
import re
import shutil
import sys
from contextlib import ExitStack

from tqdm import tqdm

from . import outputs
from .errors import SplitInputError
from .io import add_common_args, read_json, write_run_config


HAND_INFO_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
                     "imageName", "irregularities")


def read_hand_info(csv_path, required_columns=HAND_INFO_COLUMNS):
    """Rows of an 11k HandInfo.csv as (line number, dict of text) pairs; the columns named in
    `required_columns` must be present."""
    if not os.path.isfile(csv_path):
        raise SplitInputError(f"{csv_path} not found; the 11k data folder must hold HandInfo.csv and Hands/")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required_columns if c not in (reader.fieldnames or [])]
        if missing:
            raise SplitInputError(f"{csv_path} lacks column(s) {', '.join(missing)} "
                                  f"(found: {', '.join(reader.fieldnames or [])})")
        return [(reader.line_num, row) for row in reader]


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
        if os.path.lexists(path) and not os.path.isdir(path):  # --force would not help: say so first
            raise SplitInputError(f"{path} exists and is not a folder; remove it by hand")
        if os.path.lexists(path) and not force:
            raise SplitInputError(f"{path} already exists; pass --force to replace it "
                                  f"(it is left untouched otherwise)")


def build_split_root(folder, data_dir, manifest, linker, args, extra=None, desc=None):
    """Fill the new folder `folder` with <set>/<label>/<file> (sources relative to data_dir),
    splits.json and prepare_config.json."""
    os.mkdir(folder)
    jobs = [(row[0], row[2]) for rows in manifest["sets"].values() for row in rows]
    for subfolder in sorted({relpath.rsplit("/", 1)[0] for relpath, _ in jobs}):
        os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
    for relpath, source in tqdm(jobs, desc=desc, unit="file", leave=False,
                                disable=len(jobs) < 2000 or not sys.stderr.isatty()):
        linker(data_dir + os.sep + source, folder + os.sep + relpath)
    with open(os.path.join(folder, SPLITS_MANIFEST), "w") as f:  # the folder itself is the temporary
        f.write(manifest_text(manifest))
    write_run_config(folder, args, extra={"link_used": linker.mode, **(extra or {})}, name=PREPARE_CONFIG)


def split_roots_bytes(data_dir, roots, linker):
    """About what build_split_root writes for every root of `roots`: each file copied (--link copy) or a
    directory entry / symlink per file (hard links and symlinks), a block per folder, the manifests."""
    total = 0
    for manifest, _ in roots.values():
        rows = [row for rows in manifest["sets"].values() for row in rows]
        total += 4096 * (len({row[0].rsplit("/", 1)[0] for row in rows}) + 1) + 2 * len(manifest_text(manifest))
        if linker.mode == "copy":
            total += sum(os.path.getsize(os.path.join(data_dir, row[2])) for row in rows)
        else:
            total += 256 * len(rows)
    return total


def write_split_roots(data_dir, roots, linker, args):
    """All or nothing, one writer: build every split root of `roots` {root name: (manifest,
    prepare_config extra)} under a temporary name in data_dir, then swap them all into place (an old
    root is replaced only with --force). Every root is locked first (a second preparation of them is
    refused), leftovers of a process that died are recovered, and the space they need is checked.
    Until the swap nothing existing is touched, so an error, a full disk or Ctrl-C leaves the old roots
    exactly as they were; a failure during the swap puts the old roots back. The swap and the removal
    of the old roots run with Ctrl-C and SIGTERM held back until they are done. Returns the final paths."""
    final = {name: os.path.join(data_dir, name) for name in roots}
    tmp = {name: outputs.staging_name(final[name], "tmp") for name in roots}  # not mkdtemp: 0700
    old = {name: outputs.staging_name(final[name], "old") for name in roots}
    outputs.check_writable(data_dir, "--data_dir")
    with ExitStack() as locks:
        for name in sorted(roots):
            locks.enter_context(outputs.FolderLock(final[name], "another split preparation"))
            outputs.recover_leftovers(final[name])
        check_split_roots_free(final.values(), getattr(args, "force", False))
        outputs.check_space(data_dir, split_roots_bytes(data_dir, roots, linker), "--data_dir")
        try:
            with outputs.output_errors(data_dir):
                for name, (manifest, extra) in roots.items():
                    build_split_root(tmp[name], data_dir, manifest, linker, args, extra, desc=name)
            with outputs.signals_deferred():
                swap_split_roots(final, tmp, old)
        finally:
            with outputs.signals_deferred():
                for path in tmp.values():
                    shutil.rmtree(path, ignore_errors=True)
    return [final[name] for name in roots]


def swap_split_roots(final, tmp, old):
    """Rename every old root aside and every new one into place; on a failure put everything back.
    Then delete the old roots."""
    moved, placed = [], []
    try:
        for name in final:
            if os.path.lexists(final[name]):
                os.rename(final[name], old[name])
                moved.append(name)
        for name in final:
            os.rename(tmp[name], final[name])
            placed.append(name)
    except BaseException:
        for name in placed:
            os.rename(final[name], tmp[name])
        for name in moved:
            os.rename(old[name], final[name])
        raise
    for name in moved:
        shutil.rmtree(old[name], ignore_errors=True)


def sibling_roots(split_root):
    """The split roots one prepare call writes together with `split_root`: for 11k the four aspect
    roots beside it (those that exist), else the root alone."""
    manifest = read_manifest(split_root)
    if not manifest or manifest.get("dataset") != "11k":
        return [split_root]
    parent = os.path.dirname(os.path.abspath(split_root))
    found = [os.path.join(parent, f"train_val_test_split_{folder}") for folder in ASPECT_FOLDERS_11K.values()]
    return [split_root] + [path for path in found if os.path.isfile(os.path.join(path, SPLITS_MANIFEST))]


def check_split_seeds(roots, allow_mixed=False):
    """Refuse split roots (with their 11k sibling aspects) whose manifests record different seeds:
    their val images and galleries do not come from one protocol instance. Returns {root: seed} of
    the roots whose manifest records one; with allow_mixed the mix is only reported on stderr."""
    seeds = {}
    for root in roots:
        for path in sibling_roots(root):
            manifest = read_manifest(path)
            if manifest and manifest.get("seed") is not None:
                seeds[os.path.abspath(path)] = manifest["seed"]
    if len(set(seeds.values())) > 1:
        listing = ", ".join(f"{path} (seed {seed})" for path, seed in sorted(seeds.items()))
        if not allow_mixed:
            raise SplitInputError(f"split roots prepared with different --seed values: {listing}; re-run the "
                                  f"prepare script with --force and one --seed, or pass --allow_mixed_seeds")
        print(f"warning: --allow_mixed_seeds: split roots prepared with different seeds: {listing}",
              file=sys.stderr)
    return seeds


def dataset_of_roots(roots, data_type=None):
    """The dataset kind ('11k', 'HD' or 'folder': prepare_train_val_test_folder.py) the manifests of
    `roots` record; a --data_type that disagrees is an error. Roots without a manifest (made by hand)
    take --data_type, else 'unknown'."""
    found = {}
    for root in roots:
        manifest = read_manifest(root)
        if manifest and manifest.get("dataset"):
            found[root] = manifest["dataset"]
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        raise SplitInputError("split roots of different datasets: " + ", ".join(
            f"{root} ({kind})" for root, kind in found.items()) + "; train on roots of one dataset")
    if kinds and data_type is not None and data_type != kinds[0]:
        root = next(iter(found))
        raise SplitInputError(f"--data_type {data_type} disagrees with {os.path.join(root, SPLITS_MANIFEST)}, "
                              f"which records dataset {kinds[0]}; drop --data_type (it is read from the manifest)")
    return kinds[0] if kinds else (data_type or "unknown")


def test_set_name(test_dir):
    """Short name of a split root for output folders: the 11k aspect (dorsal_r, ...), HD, or else
    the folder name without the train_val_test_split_ prefix."""
    manifest = read_manifest(test_dir) or {}
    if manifest.get("dataset") == "11k" and manifest.get("aspect") in ASPECT_FOLDERS_11K:
        return ASPECT_FOLDERS_11K[manifest["aspect"]]
    if manifest.get("dataset") == "HD":
        return "HD"
    if manifest.get("dataset") == "folder" and manifest.get("name"):
        return manifest["name"]  # the identity-folder data set's own folder name
    name = os.path.basename(os.path.normpath(os.path.abspath(test_dir)))
    return name.removeprefix("train_val_test_split_") or name


def query_gallery_paths(test_dir):
    """The image paths an evaluation of `test_dir` reads: every query{i} and gallery{i}[_all] image,
    one path per image (sets share images)."""
    layout = read_split_layout(test_dir)
    names = [f"query{i}" for i in range(layout["num_splits"])]
    names += [gallery_set_name(i, v) for i in range(layout["num_splits"]) for v in layout["gallery_variants"]]
    first_path = {}
    for entries in read_split_sets(test_dir, names).values():
        for path, _, key in entries:
            first_path.setdefault(key, path)
    return list(first_path.values())


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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


GALLERY_VARIANTS = ("own", "all")


def gallery_set_name(split, variant):
    """'own' -> gallery{i} (this aspect's identities); 'all' -> gallery{i}_all (plus distractors)."""
    return f"gallery{split}" if variant == "own" else f"gallery{split}_all"


def result_mat_name(split, variant):
    return f"result_split{split}.mat" if variant == "own" else f"result_split{split}_all.mat"


def read_manifest(split_root):
    """The split manifest (splits.json) of a split root as a dict, or None when the root has none
    (folders made by hand). The one reader of splits.json: every script and module goes through it."""
    path = os.path.join(split_root, SPLITS_MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, error=SplitInputError)
    if not isinstance(manifest.get("sets"), dict):
        raise SplitInputError(f"split manifest {path} has no 'sets'; re-run the prepare script")
    return manifest


def read_split_layout(test_dir):
    """How many query/gallery splits `test_dir` holds and which gallery variants, from splits.json
    when present, else from the folder names. Returns {"dataset", "num_splits", "gallery_variants",
    "manifest": bool}."""
    if not os.path.isdir(test_dir):
        raise SplitInputError(f"--test_dir {test_dir} is not a folder; point it at a split root made by a "
                              f"prepare_train_val_test_*.py script (it holds query0/, gallery0/, ...)")
    manifest = read_manifest(test_dir)
    names = set(manifest["sets"]) if manifest else {
        n for n in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, n))}
    num_splits = 0
    while f"query{num_splits}" in names and f"gallery{num_splits}" in names:
        num_splits += 1
    if num_splits == 0:
        raise SplitInputError(f"{test_dir} has no query0/ and gallery0/ " + ("sets in splits.json" if manifest
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
    manifest = read_manifest(test_dir)
    sets = {}
    for name in split_names:
        if manifest is not None:
            if name not in manifest["sets"]:
                raise SplitInputError(f"{os.path.join(test_dir, 'splits.json')} has no set '{name}'")
            sets[name] = [(os.path.join(test_dir, *relpath.split("/")), str(label), "source:" + source)
                          for relpath, label, source in manifest["sets"][name]]
            continue
        folder = os.path.join(test_dir, name)
        if not os.path.isdir(folder):
            raise SplitInputError(f"split folder {folder} is missing")
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
            raise SplitInputError(f"split folder {folder} holds no images (expected {folder}/<identity>/<image>)")
        sets[name] = entries
    return sets


def distractor_origin(label, manifest):
    """Where a relabelled distractor of a gallery comes from: (the manifest's distractor_offsets key,
    i.e. the 11k aspect or the HD folder 502-712, original id) for a label at or above one of its
    offsets; None for the split root's own identities (or without a manifest)."""
    offsets = (manifest or {}).get("distractor_offsets") or {}
    try:
        value = int(label)
    except (TypeError, ValueError):
        return None
    found = [(offset, origin) for origin, offset in offsets.items() if isinstance(offset, int) and value >= offset]
    if not found:
        return None
    offset, origin = max(found)
    return origin, value - offset
