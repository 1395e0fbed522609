"""Prepare MBA-Net-style splits of any identity-folder dataset, seeded and with a manifest.

<data_dir>/<identity>/<photo> (one folder per person; hidden folders and the split root itself are
skipped). Identities are split into train and test identities at random (--train_fraction, seeded)
or by a list (--train_ids FILE, one identity per line; every other identity is a test identity).
Output: <data_dir>/train_val_test_split/ with train_all/ train/ val/ test/ query{i}/ gallery{i}/
(layout <set>/<identity>/<file>; val: one held-out photo per train identity; gallery{i}: one photo
per test identity, the rest query{i}), splits.json (same seed -> same bytes) and prepare_config.json,
exactly as the 11k and HD scripts write them, so every trainer and evaluator reads it unchanged
(the manifest records dataset "folder"). --distractors DIR adds every photo of DIR (identity
sub-folders, or flat photos, each its own identity) to every gallery{i} under labels that match no
query. An identity with a single photo can give neither a val nor a query/gallery pair: it is left
out, and the manifest lists it.

    python prepare_train_val_test_folder.py --data_dir ./my_dataset --train_fraction 0.5 --seed 0
"""
import os
import sys

import numpy as np

from utils import data, flags, interrupts, splits
from utils.errors import ClipFHError, SplitInputError

SPLIT_ROOT = "train_val_test_split"
DATASET = "folder"


def parse_args(argv=None):
    parser = splits.split_script_parser(__doc__, "./my_dataset", "folder of <identity>/<photo> sub-folders",
                                       "replace an existing split folder")
    parser.add_argument("--train_fraction", type=float, default=0.5,
                        help="share of the identities that train, drawn with --seed (default 0.5, about the "
                             "11k protocol's half)")
    parser.add_argument("--train_ids", default=None,
                        help="file of train identities, one per line ('#' comments); the others are test identities")
    parser.add_argument("--distractors", default=None,
                        help="folder of photos added to every gallery{i} with labels that never match a query")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the pre-flight check that decodes every photo")
    args = parser.parse_args(argv)
    if not 0 < args.train_fraction < 1:
        parser.error(f"--train_fraction must be between 0 and 1, got {args.train_fraction}")
    flags.exit_on_problems(flags.bound_problems(args, at_least={"num_workers": 0, "num_splits": 1}))
    return args


def photos_by_identity(folder, skip=()):
    """{identity: [photo file name, ...]} of <folder>/<identity>/<photo>, and the flat photos of `folder`."""
    by_id, flat = {}, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.abspath(path) in skip:
            continue
        if os.path.isdir(path):
            files = [f for f in sorted(os.listdir(path)) if not f.startswith(".") and f.lower().endswith(
                splits.IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))]
            if files:
                by_id[name] = files
        elif name.lower().endswith(splits.IMAGE_EXTENSIONS):
            flat.append(name)
    return by_id, flat


def read_train_ids(path, identities):
    try:
        with open(path, encoding="utf-8-sig") as f:
            wanted = [line.split("#", 1)[0].strip() for line in f]
    except OSError as err:
        raise SplitInputError(f"cannot read --train_ids {path}: {err.strerror}") from None
    wanted = sorted({w for w in wanted if w})
    unknown = [w for w in wanted if w not in identities]
    if unknown:
        noun = "identity" if len(unknown) == 1 else "identities"
        raise SplitInputError(f"--train_ids {path} names {len(unknown)} {noun} without photos in --data_dir, "
                              f"e.g. {unknown[0]!r}")
    return wanted


def split_identities(identities, args):
    """(train identities, test identities): from --train_ids, or a seeded draw of --train_fraction."""
    if args.train_ids:
        train = read_train_ids(args.train_ids, identities)
    else:
        count = int(round(args.train_fraction * len(identities)))
        order = np.random.default_rng([args.seed, 1]).permutation(len(identities))  # not the sets' stream
        train = sorted(identities[i] for i in order[:count])
    test = sorted(set(identities) - set(train))
    if not train or not test:
        raise SplitInputError(f"{len(train)} train and {len(test)} test identities of {len(identities)}; both must "
                              f"be non-empty (--train_fraction / --train_ids)")
    return train, test


def distractor_entries(folder, data_dir, identities):
    """[(label, source relative to data_dir)] of --distractors, and how the labels were made: numbers above
    every identity when the identities are numbers (offset = the next power of ten), else 'distractor_<name>'."""
    if not os.path.isdir(folder):
        raise SplitInputError(f"--distractors {folder} is not a folder")
    by_id, flat = photos_by_identity(folder)
    groups = [(name, [os.path.join(folder, name, f) for f in files]) for name, files in by_id.items()]
    groups += [(os.path.splitext(f)[0], [os.path.join(folder, f)]) for f in flat]
    if not groups:
        raise SplitInputError(f"--distractors {folder} holds no photos")
    numeric = all(i.isdigit() for i in identities)
    offset = 10 ** len(str(max(int(i) for i in identities))) if numeric else None
    entries = []
    for k, (name, paths) in enumerate(sorted(groups)):
        label = str(offset + k + 1) if numeric else f"distractor_{name}"
        if label in identities:
            raise SplitInputError(f"distractor label {label} is also an identity of the data set; rename {name}")
        entries += [(label, os.path.relpath(os.path.abspath(p), os.path.abspath(data_dir)).replace(os.sep, "/"))
                    for p in paths]
    rule = {"offset": offset} if numeric else {"prefix": "distractor_"}
    return sorted(entries), rule


def build_sets(args):
    """(sets, manifest header fields, photo paths to check) of --data_dir."""
    root = os.path.abspath(os.path.join(args.data_dir, SPLIT_ROOT))
    skip = {root, os.path.abspath(args.distractors)} if args.distractors else {root}
    by_id, flat = photos_by_identity(args.data_dir, skip)
    if flat:
        print(f"note: {len(flat)} photo(s) directly in {args.data_dir} (not in an identity folder) are left out, "
              f"e.g. {flat[0]}", file=sys.stderr)
    single = sorted(i for i, files in by_id.items() if len(files) < 2)
    if single:
        noun = "identity" if len(single) == 1 else "identities"
        print(f"note: {len(single)} {noun} with a single photo left out (they give no val or "
              f"query/gallery pair), e.g. {single[0]}", file=sys.stderr)
    images = {i: [f"{i}/{f}" for f in files] for i, files in by_id.items() if len(files) >= 2}
    if len(images) < 2:
        raise SplitInputError(f"--data_dir {args.data_dir} has {len(images)} identity folder(s) with two or more "
                              f"photos; it must hold <identity>/<photo> folders")
    identities = sorted(images)
    train, test = split_identities(identities, args)
    origin = os.path.abspath(args.data_dir)
    sets = splits.make_split_sets({i: images[i] for i in train}, {i: images[i] for i in test}, args.num_splits,
                                  np.random.default_rng(args.seed), origin)
    header = {"identities": {"train": len(train), "test": len(test)}, "skipped_identities": single,
              "train_split": {"train_ids": os.path.abspath(args.train_ids)} if args.train_ids
              else {"train_fraction": args.train_fraction}, "name": os.path.basename(origin)}
    if args.distractors:
        entries, rule = distractor_entries(args.distractors, args.data_dir, identities)
        for i in range(args.num_splits):
            sets[f"gallery{i}"] = sorted(sets[f"gallery{i}"] + entries)
        header["distractors"] = {"folder": os.path.relpath(os.path.abspath(args.distractors), origin).replace(
            os.sep, "/"), "images": len(entries), "labels": rule}
    paths = sorted({os.path.join(args.data_dir, *source.split("/")) for entries in sets.values()
                    for _, source in entries})
    return sets, header, paths


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.data_dir):
            raise SplitInputError(f"--data_dir {args.data_dir} is not a folder of <identity>/<photo> folders")
        splits.check_split_roots_free([os.path.join(args.data_dir, SPLIT_ROOT)], args.force)
        linker = splits.FileLinker(args.link)
        sets, header, paths = build_sets(args)
        data.check_images(paths, None, args.num_workers, what=f"photos of {args.data_dir}")
        manifest = splits.split_manifest(sets, dataset=DATASET, aspect=None, seed=args.seed,
                                         num_splits=args.num_splits, gallery_variants=["own"], source_root="..",
                                         **header)
        counts = {header["name"]: splits.split_counts(sets)}
        root, = splits.write_split_roots(args.data_dir, {SPLIT_ROOT: (manifest, {"dataset": DATASET, "counts":
                                                                                counts[header["name"]]})},
                                         linker, args)
    except ClipFHError as e:
        raise SystemExit(f"error: {e}") from None
    print(splits.format_split_counts(counts, first_column="dataset"))
    print(f"Wrote {args.num_splits} query/gallery splits (files by {linker.mode}) to {os.path.abspath(root)}")
    return counts


if __name__ == "__main__":
    main()
