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
query; it must lie outside the identity folders and the split root and repeat no photo of the data
set. An identity with a single photo can give neither a val nor a query/gallery pair: it is left
out, and the manifest lists it. Photos in sub-folders of an identity folder are refused, not dropped.

    python prepare_train_val_test_folder.py --data_dir ./my_dataset --train_fraction 0.5 --seed 0
"""
import codecs
import os
import sys

import numpy as np

from utils import data, flags, interrupts, io, splits
from utils.errors import ClipFHError, SplitInputError

SPLIT_ROOT = "train_val_test_split"
DATASET = "folder"


def parse_args(argv=None):
    parser = splits.split_script_parser(__doc__, "./my_dataset", "folder of <identity>/<photo> sub-folders",
                                       "replace an existing split folder")
    parser.add_argument("--train_fraction", type=float, default=None,
                        help="share of the identities that train, drawn with --seed (default 0.5, about the "
                             "11k protocol's half; not with --train_ids)")
    parser.add_argument("--train_ids", default=None,
                        help="UTF-8 file of train identities, one per line ('#' comments); the others are test "
                             "identities")
    parser.add_argument("--distractors", default=None,
                        help="folder of photos added to every gallery{i} with labels that never match a query")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of the pre-flight check that decodes every photo")
    args = parser.parse_args(argv)
    problems = flags.bound_problems(args, at_least={"num_workers": 0, "num_splits": 1})
    if args.train_ids is not None and args.train_fraction is not None:
        problems.append("--train_ids and --train_fraction exclude each other: give the list of train identities "
                        "or the share to draw, not both")
    elif args.train_fraction is not None and not 0 < args.train_fraction < 1:  # also refuses nan
        problems.append(f"--train_fraction must be between 0 and 1, got {args.train_fraction}")
    flags.exit_on_problems(problems)
    if args.train_ids is None and args.train_fraction is None:
        args.train_fraction = 0.5  # recorded as what ran; stays None (null) when --train_ids chose the people
    return args


def photos_by_identity(folder, flag, skip=()):
    """{identity: [photo file name, ...]} of <folder>/<identity>/<photo>, and the flat photos of `folder`.
    Photos further down (<identity>/<sub-folder>/<photo>) are refused rather than dropped; `flag` names
    the folder in that message."""
    by_id, flat = {}, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.abspath(path) in skip:
            continue
        if os.path.isdir(path):
            with os.scandir(path) as found:  # scandir: telling files from folders costs no stat per photo
                entries = sorted((e for e in found if not e.name.startswith(".")), key=lambda e: e.name)
            nested = [e.name for e in entries if e.is_dir() and holds_photos(e.path, skip)]
            if nested:
                raise SplitInputError(f"{flag} {folder}: {name}/{nested[0]}/ holds photos, but photos must sit "
                                      f"directly in <identity>/ ({name}/<photo>); move them up into {name}/, or make "
                                      f"each sub-folder an identity folder of its own")
            files = [e.name for e in entries if e.name.lower().endswith(splits.IMAGE_EXTENSIONS) and e.is_file()]
            if files:
                by_id[name] = files
        elif name.lower().endswith(splits.IMAGE_EXTENSIONS):
            flat.append(name)
    return by_id, flat


def holds_photos(folder, skip=()):
    """Whether `folder` is a folder with a photo somewhere below it (outside the folders of `skip`)."""
    if os.path.abspath(folder) in skip:
        return False
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.abspath(os.path.join(top, d)) not in skip]
        if any(f.lower().endswith(splits.IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def read_train_ids(path, identities, single=()):
    """The identities a --train_ids file names; each must be one of `identities` (those with two or more
    photos; `single`: those left out for having one)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise SplitInputError(f"cannot read --train_ids {path}: {err.strerror}") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SplitInputError(f"--train_ids {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); "
                              f"save it as UTF-8") from None
    wanted = sorted({w for w in (line.split("#", 1)[0].strip() for line in text.splitlines()) if w})
    left_out = {"with a single photo, left out (it gives no val or query/gallery pair)":
                [w for w in wanted if w in single],
                "without photos in --data_dir": [w for w in wanted if w not in identities and w not in single]}
    problems = [f"names {len(names)} {'identity' if len(names) == 1 else 'identities'} {kind}, e.g. {names[0]!r}"
                for kind, names in left_out.items() if names]
    if problems:
        them = "it" if sum(map(len, left_out.values())) == 1 else "them"
        raise SplitInputError(f"--train_ids {path} " + "; it ".join(problems) + f"; drop {them} from the list")
    return wanted


def split_identities(identities, args, single=()):
    """(train identities, test identities): from --train_ids, or a seeded draw of --train_fraction."""
    if args.train_ids is not None:
        train = read_train_ids(args.train_ids, identities, single)
    else:
        count = int(round(args.train_fraction * len(identities)))
        order = np.random.default_rng([args.seed, 1]).permutation(len(identities))  # not the sets' stream
        train = sorted(identities[i] for i in order[:count])
    test = sorted(set(identities) - set(train))
    if not train or not test:
        raise SplitInputError(f"{len(train)} train and {len(test)} test identities of {len(identities)}; both must "
                              f"be non-empty (--train_fraction / --train_ids)")
    return train, test


def within(path, folder):
    """Whether `path` is `folder` or lies inside it (both already real paths)."""
    return os.path.commonpath([path, folder]) == folder


def check_distractors_folder(folder, data_dir, identity_folders, split_root):
    """Refuse a --distractors folder that is missing, or is, lies in or holds an identity folder of --data_dir
    or the split root this run writes: its photos would come back as distractors of their own people, or
    from the very folder being replaced."""
    if not os.path.isdir(folder):
        raise SplitInputError(f"--distractors {folder} is not a folder")
    where = os.path.realpath(folder)
    if where == os.path.realpath(data_dir):
        raise SplitInputError(f"--distractors {folder} is --data_dir itself; give a folder of other people's photos")
    for path, what in [(p, "an identity folder of --data_dir") for p in identity_folders] + [
            (split_root, "the split root this run writes")]:
        real = os.path.realpath(path)
        relation = "lies inside" if within(where, real) else "holds" if within(real, where) else None
        if relation:
            raise SplitInputError(f"--distractors {folder} {relation} {path}, {what}; give a folder of other "
                                  f"people's photos outside --data_dir's identity folders and its {SPLIT_ROOT}")


def check_distractor_copies(distractor_paths, data_paths):
    """Refuse distractor photos whose bytes equal a photo of the data set (a person's own photo returning as
    a distractor). Files are hashed only where a size matches, so a data set and distractors of different
    photos cost one stat per file."""
    by_size = {}
    for path in data_paths:
        by_size.setdefault(os.path.getsize(path), []).append(path)
    digests, copies = {}, []
    for path in distractor_paths:
        same_size = by_size.get(os.path.getsize(path), [])
        if not same_size:
            continue
        digest = io.file_sha256(path)
        for other in same_size:
            if other not in digests:
                digests[other] = io.file_sha256(other)
            if digests[other] == digest:
                copies.append((path, other))
                break
    if copies:
        path, other = copies[0]
        raise SplitInputError(f"--distractors: {len(copies)} photo(s) are byte-identical copies of photos of "
                              f"--data_dir, e.g. {path} = {other}; remove them from the distractors")


def distractor_entries(folder, data_dir, identities):
    """[(label, source relative to data_dir)] of --distractors, and how the labels were made: numbers above
    every identity when the identities are numbers (offset = the next power of ten), else 'distractor_<name>'."""
    by_id, flat = photos_by_identity(folder, "--distractors")
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
    skip = {root} if args.distractors is None else {root, os.path.abspath(args.distractors)}
    by_id, flat = photos_by_identity(args.data_dir, "--data_dir", skip)
    if args.distractors is not None:
        check_distractors_folder(args.distractors, args.data_dir, [os.path.join(args.data_dir, i) for i in by_id], root)
        if os.path.dirname(os.path.abspath(args.distractors)) == os.path.abspath(args.data_dir):
            print(f"note: --distractors {args.distractors} sits in --data_dir; its photos are distractors, not an "
                  f"identity", file=sys.stderr)
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
    train, test = split_identities(identities, args, single)
    origin = os.path.abspath(args.data_dir)
    sets = splits.make_split_sets({i: images[i] for i in train}, {i: images[i] for i in test}, args.num_splits,
                                  np.random.default_rng(args.seed), origin)
    header = {"identities": {"train": len(train), "test": len(test)}, "skipped_identities": single,
              "train_split": {"train_ids": os.path.abspath(args.train_ids)} if args.train_ids is not None
              else {"train_fraction": args.train_fraction}, "name": os.path.basename(origin)}
    if args.distractors is not None:
        entries, rule = distractor_entries(args.distractors, args.data_dir, identities)
        check_distractor_copies([os.path.normpath(os.path.join(args.data_dir, source)) for _, source in entries],
                                [os.path.join(args.data_dir, i, f) for i, files in by_id.items() for f in files])
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
