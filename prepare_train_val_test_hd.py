"""Prepare the HD (PolyU Hand Dorsal) splits of the MBA-Net protocol, seeded and with a manifest.

Images of "<data_dir>/Original Images/1-501/<id>_<n>.jpg" with id <= 447 are train identities, the
rest test identities. Every image of "Original Images/502-712" joins every gallery{i} as a
distractor labelled id + 1000. Output: <data_dir>/train_val_test_split/ with train_all/ train/ val/
test/ query{i}/ gallery{i}/ (layout <set>/<id>/<file>), splits.json and prepare_config.json.

    python prepare_train_val_test_hd.py --data_dir ./HD --num_splits 10 --seed 0
"""
import os

import numpy as np

from utils import flags, interrupts, splits
from utils.errors import ClipFHError, SplitInputError
from utils.splits import HD_DISTRACTOR_FOLDER, HD_DISTRACTOR_OFFSET, HD_IMAGE_DIR, HD_LAST_TRAIN_ID, HD_SUBJECT_FOLDER

SPLIT_ROOT = "train_val_test_split"


def parse_args(argv=None):
    parser = splits.split_script_parser(__doc__, "./HD", "folder holding 'Original Images/' (default ./HD)",
                                       "replace an existing split folder")
    args = parser.parse_args(argv)
    flags.exit_on_problems(flags.bound_problems(args, at_least={"num_splits": 1}))
    return args


def images_by_subject(data_dir, folder):
    """{id: [source, ...]} for the *.jpg files of 'Original Images/<folder>'; id = text before the first '_'."""
    path = os.path.join(data_dir, HD_IMAGE_DIR, folder)
    if not os.path.isdir(path):
        raise SplitInputError(f"image folder {path} not found; --data_dir must hold "
                              f"'{HD_IMAGE_DIR}/{HD_SUBJECT_FOLDER}' and '{HD_IMAGE_DIR}/{HD_DISTRACTOR_FOLDER}'")
    images = {}
    for name in sorted(os.listdir(path)):
        if not name.lower().endswith(".jpg") or not os.path.isfile(os.path.join(path, name)):
            continue
        label = name.split("_", 1)[0].strip()
        if "_" not in name or not label.isdigit():
            raise SplitInputError(f"{os.path.join(path, name)}: HD file names must be <subject id>_<n>.jpg")
        images.setdefault(label, []).append(f"{HD_IMAGE_DIR}/{folder}/{name}")
    if not images:
        raise SplitInputError(f"no .jpg images in {path}")
    return images


def build_sets(data_dir, num_splits, seed):
    subjects = images_by_subject(data_dir, HD_SUBJECT_FOLDER)
    distractors = splits.flatten_by_id(images_by_subject(data_dir, HD_DISTRACTOR_FOLDER))
    train, test = splits.split_by_last_train_id(subjects, HD_LAST_TRAIN_ID)
    origin = os.path.join(data_dir, HD_IMAGE_DIR, HD_SUBJECT_FOLDER)
    if not train or not test:
        raise SplitInputError(f"{origin} has {len(train)} train and {len(test)} test identities "
                              f"(threshold id <= {HD_LAST_TRAIN_ID}); both must be non-empty")
    sets = splits.make_split_sets(train, test, num_splits, np.random.default_rng(seed), origin)
    for i in range(num_splits):
        sets[f"gallery{i}"] = sorted(sets[f"gallery{i}"] + splits.relabel(distractors, HD_DISTRACTOR_OFFSET))
    return sets


@interrupts.sigterm_as_ctrl_c
def main(argv=None):
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.data_dir):
            raise SplitInputError(f"--data_dir {args.data_dir} is not a folder; it must hold '{HD_IMAGE_DIR}/'")
        splits.check_split_roots_free([os.path.join(args.data_dir, SPLIT_ROOT)], args.force)
        linker = splits.FileLinker(args.link)
        sets = build_sets(args.data_dir, args.num_splits, args.seed)
        manifest = splits.split_manifest(
            sets, dataset="HD", aspect=None, seed=args.seed, num_splits=args.num_splits,
            thresholds={"last_train_id": HD_LAST_TRAIN_ID},
            distractor_offsets={HD_DISTRACTOR_FOLDER: HD_DISTRACTOR_OFFSET},
            gallery_variants=["own"], source_root="..")
        counts = {"HD": splits.split_counts(sets)}
        root, = splits.write_split_roots(args.data_dir, {SPLIT_ROOT: (manifest, {"dataset": "HD",
                                                                               "counts": counts["HD"]})},
                                         linker, args)
    except ClipFHError as e:
        raise SystemExit(f"error: {e}") from None
    print(splits.format_split_counts(counts, first_column="dataset"))
    print(f"Wrote {args.num_splits} query/gallery splits (files by {linker.mode}) to {os.path.abspath(root)}")
    return counts


if __name__ == "__main__":
    main()
