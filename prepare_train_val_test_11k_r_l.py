"""Prepare the 11k Hands splits of the MBA-Net protocol, seeded and with a manifest.

For each aspect (dorsal/palmar x right/left) of <data_dir>/HandInfo.csv, rows with accessories == 0
are split by id into train (id <= the aspect's threshold) and test identities, and written to
<data_dir>/train_val_test_split_{dorsal_r,dorsal_l,palmar_r,palmar_l}/ as
train_all/ train/ val/ test/ query{i}/ gallery{i}/ gallery{i}_all/ (layout <set>/<id>/<file>),
plus splits.json (every file and label; same seed -> same bytes) and prepare_config.json.

    python prepare_train_val_test_11k_r_l.py --data_dir ./11k --num_splits 10 --seed 0
"""
import os
import sys

import numpy as np

from utils import flags, interrupts, splits
from utils.errors import ClipFHError, SplitInputError
from utils.splits import ASPECT_FOLDERS_11K, ASPECTS_11K, DISTRACTOR_OFFSETS_11K, LAST_TRAIN_ID_11K

REQUIRED_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")


def parse_args(argv=None):
    parser = splits.split_script_parser(__doc__, "./11k", "folder with HandInfo.csv and Hands/ (default ./11k)",
                                       "replace existing split folders")
    parser.add_argument("--skip_missing", action="store_true",
                        help="skip images listed in HandInfo.csv but missing from Hands/ (default: error)")
    args = parser.parse_args(argv)
    flags.exit_on_problems(flags.bound_problems(args, at_least={"num_splits": 1}))
    return args


def collect_images(data_dir, skip_missing):
    """{aspect: {id: [source, ...]}} for the rows with accessories == 0; ids are stripped text."""
    csv_path = os.path.join(data_dir, "HandInfo.csv")
    hands_dir = os.path.join(data_dir, "Hands")
    rows = splits.read_hand_info(csv_path, REQUIRED_COLUMNS)
    if not os.path.isdir(hands_dir):
        raise SplitInputError(f"image folder {hands_dir} not found; --data_dir must hold the 11k Hands/ folder")
    unknown = {}
    for line, row in rows:
        aspect = (row["aspectOfHand"] or "").strip()
        if aspect not in ASPECTS_11K:
            unknown.setdefault(aspect, []).append(line)
    if unknown:
        listing = "; ".join(f"{value!r} (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:5]))}"
                            f"{', ...' if len(lines) > 5 else ''})" for value, lines in sorted(unknown.items()))
        raise SplitInputError(f"{csv_path}: unknown aspectOfHand value(s) {listing}; each must be one of "
                              f"{', '.join(ASPECTS_11K)}")
    images = {aspect: {} for aspect in ASPECTS_11K}
    seen, missing = set(), []
    for line, row in rows:
        label, name = (row["id"] or "").strip(), (row["imageName"] or "").strip()
        try:
            accessories = int(row["accessories"])
            int(label)
        except (TypeError, ValueError):
            raise SplitInputError(f"{csv_path} line {line}: id {row['id']!r} and accessories "
                                  f"{row['accessories']!r} must be integers") from None
        aspect = (row["aspectOfHand"] or "").strip()
        if accessories != 0 or aspect not in images:
            continue
        if name in seen:
            raise SplitInputError(f"{csv_path} line {line}: image {name} is listed twice")
        seen.add(name)
        if not os.path.isfile(os.path.join(hands_dir, name)):
            missing.append(name)
            continue
        images[aspect].setdefault(label, []).append(f"Hands/{name}")
    if missing and not skip_missing:
        raise SplitInputError(f"{len(missing)} image(s) listed in {csv_path} are missing from {hands_dir} "
                              f"(first: {missing[0]}); restore them or pass --skip_missing")
    if missing:
        print(f"warning: skipped {len(missing)} image(s) listed in {csv_path} but missing from {hands_dir} "
              f"(first: {missing[0]})", file=sys.stderr)
    return images, len(missing)


def build_sets(images, num_splits, seed, csv_path):
    """{aspect: sets} with train/val/test/query{i}/gallery{i} per aspect, then gallery{i}_all."""
    sets_by_aspect = {}
    for index, aspect in enumerate(ASPECTS_11K):
        train, test = splits.split_by_last_train_id(images[aspect], LAST_TRAIN_ID_11K[aspect])
        if not train or not test:
            raise SplitInputError(f"{csv_path}: aspect '{aspect}' has {len(train)} train and {len(test)} test "
                                  f"identities (threshold id <= {LAST_TRAIN_ID_11K[aspect]}); both must be non-empty")
        rng = np.random.default_rng([seed, index])  # one stream per aspect
        sets_by_aspect[aspect] = splits.make_split_sets(train, test, num_splits, rng, f"{csv_path} ({aspect})")
    for aspect, sets in sets_by_aspect.items():
        for i in range(num_splits):
            gallery_all = list(sets[f"gallery{i}"])
            for other, offset in DISTRACTOR_OFFSETS_11K[aspect].items():
                gallery_all += splits.relabel(sets_by_aspect[other][f"gallery{i}"], offset)
            sets[f"gallery{i}_all"] = sorted(gallery_all)
    return sets_by_aspect


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.data_dir):
            raise SplitInputError(f"--data_dir {args.data_dir} is not a folder; it must hold HandInfo.csv and Hands/")
        csv_path = os.path.join(args.data_dir, "HandInfo.csv")
        roots = {aspect: f"train_val_test_split_{ASPECT_FOLDERS_11K[aspect]}" for aspect in ASPECTS_11K}
        splits.check_split_roots_free([os.path.join(args.data_dir, r) for r in roots.values()], args.force)
        linker = splits.FileLinker(args.link)
        images, num_missing = collect_images(args.data_dir, args.skip_missing)
        sets_by_aspect = build_sets(images, args.num_splits, args.seed, csv_path)
        counts, outputs = {}, {}
        for aspect, sets in sets_by_aspect.items():
            manifest = splits.split_manifest(
                sets, dataset="11k", aspect=aspect, seed=args.seed, num_splits=args.num_splits,
                thresholds={"last_train_id": LAST_TRAIN_ID_11K}, filter={"accessories": 0},
                distractor_offsets=DISTRACTOR_OFFSETS_11K[aspect], gallery_variants=["own", "all"],
                source_root="..")
            counts[aspect] = splits.split_counts(sets)
            outputs[roots[aspect]] = (manifest, {"dataset": "11k", "aspect": aspect, "counts": counts[aspect],
                                                 "missing_skipped": num_missing})
        splits.write_split_roots(args.data_dir, outputs, linker, args)  # all four aspects or none
    except ClipFHError as e:
        raise SystemExit(f"error: {e}") from None
    print(splits.format_split_counts(counts))
    print(f"Wrote {len(roots)} split roots ({args.num_splits} query/gallery splits each, "
          f"files by {linker.mode}) to {os.path.abspath(args.data_dir)}")
    return counts


if __name__ == "__main__":
    main()
