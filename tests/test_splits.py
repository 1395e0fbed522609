"""Split preparation (MBA-Net protocol) and the synthetic hand generators.

The real-CSV tests run on tests/data/HandInfo.csv with empty image files, so they check the exact
protocol counts without the 11k images."""
import csv
import errno
import filecmp
import json
import os
import re
import shutil

import pytest

import prepare_train_val_test_11k_r_l as prep11k
import prepare_train_val_test_hd as prephd
from utils import splits, synthetic

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REAL_CSV = os.path.join(TESTS_DIR, "data", "HandInfo.csv")
ROOTS_11K = {aspect: f"train_val_test_split_{folder}" for aspect, folder in splits.ASPECT_FOLDERS_11K.items()}

# The reference script's counts on the real HandInfo.csv (issue 2):
# train ids, train_all, train, val, test ids, test, query{i}, gallery{i}, gallery{i}_all.
EXPECTED_11K = {
    "dorsal right": (72, 962, 890, 72, 71, 1042, 971, 71, 290),
    "dorsal left": (73, 808, 735, 73, 73, 1061, 988, 73, 290),
    "palmar right": (72, 977, 905, 72, 71, 988, 917, 71, 290),
    "palmar left": (76, 1004, 928, 76, 75, 1023, 948, 75, 290),
}
NUM_SPLITS = 2


def load_manifest(root):
    with open(os.path.join(root, splits.SPLITS_MANIFEST)) as f:
        return json.load(f)


def by_label(rows):
    out = {}
    for _, label, source in rows:
        out.setdefault(label, []).append(source)
    return out


def files_on_disk(root):
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if "/" in rel:
                found.add(rel)
    return found


def leftovers(data_dir):
    return [n for n in os.listdir(data_dir) if n.startswith(".train_val_test_split")]


@pytest.fixture(scope="module")
def real_11k(tmp_path_factory):
    """The real HandInfo.csv with an empty file per image the protocol uses, prepared with NUM_SPLITS splits."""
    data_dir = tmp_path_factory.mktemp("real") / "11k"
    (data_dir / "Hands").mkdir(parents=True)
    shutil.copyfile(REAL_CSV, data_dir / "HandInfo.csv")
    with open(REAL_CSV, newline="") as f:
        for row in csv.DictReader(f):
            if row["accessories"] == "0":
                (data_dir / "Hands" / row["imageName"]).touch()
    counts = prep11k.main(["--data_dir", str(data_dir), "--num_splits", str(NUM_SPLITS), "--link", "hardlink"])
    manifests = {aspect: load_manifest(data_dir / root) for aspect, root in ROOTS_11K.items()}
    return str(data_dir), counts, manifests


@pytest.fixture(scope="module")
def synthetic_11k_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "11k"
    synthetic.make_synthetic_11k(str(root), num_ids_per_aspect=8, images_per_id=(2, 4), seed=0)
    return str(root)


def fresh_copy(source, folder):
    """A copy of a module's synthetic dataset that a test may change."""
    shutil.copytree(source, str(folder))
    return str(folder)


@pytest.fixture
def synth11k(tmp_path, synthetic_11k_source):
    return fresh_copy(synthetic_11k_source, tmp_path / "11k")


@pytest.fixture(scope="module")
def synthetic_hd_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "HD"
    synthetic.make_synthetic_hd(str(root), num_train_ids=5, num_test_ids=4, num_distractor_ids=3,
                            images_per_id=(2, 4), seed=0)
    return str(root)


@pytest.fixture
def synth_hd(tmp_path, synthetic_hd_source):
    return fresh_copy(synthetic_hd_source, tmp_path / "HD")


# ---- the protocol on the real CSV ----

def test_counts_on_real_csv_match_reference(real_11k, capsys):
    _, counts, _ = real_11k
    for aspect, expected in EXPECTED_11K.items():
        assert tuple(counts[aspect].values()) == expected, aspect
    table = splits.format_split_counts(counts)
    assert "gallery{i}_all" in table.splitlines()[0]
    assert "dorsal right | 72" in table


def test_folders_match_manifest(real_11k):
    data_dir, _, manifests = real_11k
    for aspect in ("dorsal right", "palmar left"):
        root = os.path.join(data_dir, ROOTS_11K[aspect])
        manifest = manifests[aspect]
        listed = {row[0] for rows in manifest["sets"].values() for row in rows}
        assert files_on_disk(root) == listed
        for relpath, label, source in manifest["sets"]["gallery0_all"][:20]:
            assert relpath.split("/")[1] == label
            assert os.path.samefile(os.path.join(root, relpath), os.path.join(data_dir, source))
    assert leftovers(data_dir) == []


def test_manifest_header(real_11k):
    _, _, manifests = real_11k
    manifest = manifests["palmar right"]
    assert manifest["dataset"] == "11k" and manifest["aspect"] == "palmar right"
    assert manifest["seed"] == 0 and manifest["num_splits"] == NUM_SPLITS
    assert manifest["gallery_variants"] == ["own", "all"]
    assert manifest["thresholds"]["last_train_id"]["palmar right"] == 1051
    expected_sets = {"train_all", "train", "val", "test"} | {
        f"{kind}{i}" for i in range(NUM_SPLITS) for kind in ("query", "gallery")} | {
        f"gallery{i}_all" for i in range(NUM_SPLITS)}
    assert set(manifest["sets"]) == expected_sets


def test_train_val_test_structure(real_11k):
    _, _, manifests = real_11k
    with open(REAL_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    with_accessories = {"Hands/" + r["imageName"] for r in rows if r["accessories"] != "0"}
    for aspect, manifest in manifests.items():
        sets = manifest["sets"]
        train_all, train, val, test = (by_label(sets[n]) for n in ("train_all", "train", "val", "test"))
        last = splits.LAST_TRAIN_ID_11K[aspect]
        assert all(int(label) <= last for label in train_all)
        assert all(int(label) > last for label in test)
        assert not set(train_all) & set(test)
        assert set(train) == set(val) == set(train_all)
        for label, files in val.items():
            assert len(files) == 1 and files[0] not in train[label]
            assert sorted(train[label] + files) == sorted(train_all[label])
        for rows_ in sets.values():
            for _, label, source in rows_:
                assert label == label.strip() and source not in with_accessories
        for i in range(NUM_SPLITS):
            query, gallery = by_label(sets[f"query{i}"]), by_label(sets[f"gallery{i}"])
            assert set(gallery) == set(query) == set(test)
            for label, files in gallery.items():
                assert len(files) == 1 and files[0] not in query[label]
                assert sorted(query[label] + files) == sorted(test[label])


def test_trailing_space_id_is_one_identity(real_11k):
    _, _, manifests = real_11k
    test = by_label(manifests["dorsal right"]["sets"]["test"])
    assert "1200000" in test and "Hands/Hand_0009853.jpg" in test["1200000"]  # the row written "1200000 "


def test_gallery_all_composition(real_11k):
    _, _, manifests = real_11k
    for aspect, manifest in manifests.items():
        for i in range(NUM_SPLITS):
            gallery_all = manifest["sets"][f"gallery{i}_all"]
            expected = {(label, source) for _, label, source in manifest["sets"][f"gallery{i}"]}
            for other, offset in splits.DISTRACTOR_OFFSETS_11K[aspect].items():
                expected |= {(str(int(label) + offset), source)
                             for _, label, source in manifests[other]["sets"][f"gallery{i}"]}
            assert {(label, source) for _, label, source in gallery_all} == expected
            assert len(gallery_all) == 290
            own = {label for _, label, _ in manifest["sets"][f"query{i}"]}
            distractor_labels = {label for _, label, _ in gallery_all} - own
            assert all(int(label) >= 11_000_000 for label in distractor_labels)
    assert sorted(splits.DISTRACTOR_OFFSETS_11K["palmar right"].items(), key=lambda kv: kv[1]) == [
        ("dorsal left", 11_000_000), ("dorsal right", 21_000_000), ("palmar left", 31_000_000)]


def test_splits_differ_between_monte_carlo_runs(real_11k):
    _, _, manifests = real_11k
    sets = manifests["dorsal left"]["sets"]
    assert sets["gallery0"] != sets["gallery1"] and sets["query0"] != sets["query1"]


# ---- determinism, --force and link modes (small synthetic data) ----

def test_same_seed_byte_identical_and_other_seed_differs(synth11k):
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2", "--seed", "5"])
    paths = [os.path.join(synth11k, root, splits.SPLITS_MANIFEST) for root in ROOTS_11K.values()]
    first = [open(p, "rb").read() for p in paths]
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2", "--seed", "5", "--force", "--link", "copy"])
    assert [open(p, "rb").read() for p in paths] == first
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2", "--seed", "6", "--force"])
    assert [open(p, "rb").read() for p in paths] != first
    config = json.load(open(os.path.join(synth11k, ROOTS_11K["dorsal right"], splits.PREPARE_CONFIG)))
    assert config["args"]["seed"] == 6 and config["link_used"] == "hardlink" and "git_commit" in config


def test_more_splits_keep_the_first_ones(synth11k):
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2"])
    two = load_manifest(os.path.join(synth11k, ROOTS_11K["palmar left"]))["sets"]
    prep11k.main(["--data_dir", synth11k, "--num_splits", "3", "--force"])
    three = load_manifest(os.path.join(synth11k, ROOTS_11K["palmar left"]))["sets"]
    for name in ("val", "query0", "gallery0", "gallery1_all"):
        assert two[name] == three[name]


def test_existing_output_needs_force(synth11k):
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2"])
    root = os.path.join(synth11k, ROOTS_11K["dorsal left"])
    keep = os.path.join(root, "user_note.txt")
    open(keep, "w").close()
    with pytest.raises(SystemExit, match=r"train_val_test_split_\w+ already exists; pass --force"):
        prep11k.main(["--data_dir", synth11k, "--num_splits", "2"])
    assert os.path.exists(keep)
    prep11k.main(["--data_dir", synth11k, "--num_splits", "2", "--force"])
    assert not os.path.exists(keep) and os.path.isfile(os.path.join(root, splits.SPLITS_MANIFEST))
    assert leftovers(synth11k) == []


def test_failure_midway_leaves_no_partial_output(synth11k, monkeypatch):
    calls = []

    def failing_link(self, src, dst):
        calls.append(dst)
        if len(calls) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        shutil.copyfile(src, dst)

    monkeypatch.setattr(splits.FileLinker, "__call__", failing_link)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*: no space left on the device; free some space") as info:
        prep11k.main(["--data_dir", synth11k, "--num_splits", "2"])
    assert "\n" not in str(info.value)
    assert leftovers(synth11k) == [] and not any(n.startswith("train_val") for n in os.listdir(synth11k))


def test_link_modes(synth_hd, monkeypatch, capsys):
    root = os.path.join(synth_hd, prephd.SPLIT_ROOT)
    prephd.main(["--data_dir", synth_hd, "--num_splits", "1", "--link", "symlink"])
    relpath, _, source = load_manifest(root)["sets"]["gallery0"][0]
    assert os.path.islink(os.path.join(root, relpath))
    assert os.path.samefile(os.path.join(root, relpath), os.path.join(synth_hd, source))
    prephd.main(["--data_dir", synth_hd, "--num_splits", "1", "--link", "copy", "--force"])
    copied = os.path.join(root, relpath)
    assert not os.path.islink(copied) and not os.path.samefile(copied, os.path.join(synth_hd, source))
    assert filecmp.cmp(copied, os.path.join(synth_hd, source), shallow=False)

    def refuse(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    capsys.readouterr()
    prephd.main(["--data_dir", synth_hd, "--num_splits", "1", "--force"])
    err = capsys.readouterr().err
    assert err.count("copying files instead") == 1
    config = json.load(open(os.path.join(root, splits.PREPARE_CONFIG)))
    assert config["args"]["link"] == "hardlink" and config["link_used"] == "copy"


# ---- HD ----

def test_hd_splits_on_synthetic_data(synth_hd, capsys):
    counts = prephd.main(["--data_dir", synth_hd, "--num_splits", "3", "--seed", "1"])
    assert "Wrote 3 query/gallery splits" in capsys.readouterr().out
    manifest = load_manifest(os.path.join(synth_hd, prephd.SPLIT_ROOT))
    sets = manifest["sets"]
    assert manifest["dataset"] == "HD" and manifest["gallery_variants"] == ["own"]
    assert not any(re.fullmatch(r"gallery\d+_all", name) for name in sets)
    info = json.load(open(os.path.join(synth_hd, synthetic.SYNTHETIC_MARKER)))
    distractors = {(str(int(name.split("_")[0]) + 1000), f"Original Images/502-712/{name}")
                   for name in os.listdir(os.path.join(synth_hd, "Original Images", "502-712"))}
    assert len({label for label, _ in distractors}) == len(info["ids"]["502-712"]) == 3
    train_all, test = by_label(sets["train_all"]), by_label(sets["test"])
    assert len(train_all) == 5 and all(int(label) <= 447 for label in train_all)
    assert len(test) == 4 and all(447 < int(label) <= 501 for label in test)
    for i in range(3):
        gallery = {(label, source) for _, label, source in sets[f"gallery{i}"]}
        assert distractors <= gallery
        own = by_label([row for row in sets[f"gallery{i}"] if (row[1], row[2]) not in distractors])
        query = by_label(sets[f"query{i}"])
        assert set(own) == set(query) == set(test)
        for label, files in own.items():
            assert len(files) == 1 and sorted(query[label] + files) == sorted(test[label])
    assert counts["HD"]["gallery{i}"] == 4 + len(distractors)
    assert counts["HD"]["val imgs"] == 5


def test_hd_errors(synth_hd):
    shutil.rmtree(os.path.join(synth_hd, "Original Images", "502-712"))
    with pytest.raises(SystemExit, match="502-712"):
        prephd.main(["--data_dir", synth_hd])
    os.makedirs(os.path.join(synth_hd, "Original Images", "502-712"))
    open(os.path.join(synth_hd, "Original Images", "502-712", "photo.jpg"), "w").close()
    with pytest.raises(SystemExit, match=r"photo\.jpg: HD file names must be"):
        prephd.main(["--data_dir", synth_hd])
    with pytest.raises(SystemExit, match="--data_dir"):
        prephd.main(["--data_dir", os.path.join(synth_hd, "nowhere")])


# ---- bad 11k input ----

def rewrite_csv(data_dir, keep_row=lambda row: True, drop_column=None):
    path = os.path.join(data_dir, "HandInfo.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in splits.HAND_INFO_COLUMNS if c != drop_column]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in rows if keep_row(row))
    return rows


def test_missing_folder_csv_and_column(synth11k, synthetic_11k_source, tmp_path):
    with pytest.raises(SystemExit, match="--data_dir .*nowhere"):
        prep11k.main(["--data_dir", str(tmp_path / "nowhere")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="HandInfo.csv not found"):
        prep11k.main(["--data_dir", str(empty)])
    rewrite_csv(synth11k, drop_column="aspectOfHand")
    with pytest.raises(SystemExit, match=r"HandInfo\.csv lacks column\(s\) aspectOfHand"):
        prep11k.main(["--data_dir", synth11k])
    shutil.copyfile(os.path.join(synthetic_11k_source, "HandInfo.csv"), os.path.join(synth11k, "HandInfo.csv"))
    shutil.rmtree(os.path.join(synth11k, "Hands"))
    with pytest.raises(SystemExit, match=r"image folder .*Hands not found"):
        prep11k.main(["--data_dir", synth11k])


def test_missing_image_errors_or_is_skipped(synth11k, capsys):
    with open(os.path.join(synth11k, "HandInfo.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["accessories"] == "0"]
    # an image of an identity with plenty left, so skipping it keeps the protocol possible
    def images_of(r):
        return sum(x["id"].strip() == r["id"].strip() and x["aspectOfHand"] == r["aspectOfHand"] for x in rows)

    victim = max(rows, key=images_of)
    os.remove(os.path.join(synth11k, "Hands", victim["imageName"]))
    expected = rf"1 image\(s\) listed in .*HandInfo\.csv are missing .*{victim['imageName']}.*--skip_missing"
    with pytest.raises(SystemExit, match=expected):
        prep11k.main(["--data_dir", synth11k, "--num_splits", "1"])
    assert leftovers(synth11k) == []
    counts = prep11k.main(["--data_dir", synth11k, "--num_splits", "1", "--skip_missing"])
    assert "skipped 1 image(s)" in capsys.readouterr().err
    manifest = load_manifest(os.path.join(synth11k, ROOTS_11K[victim["aspectOfHand"]]))
    kept = manifest["sets"]["train_all"] + manifest["sets"]["test"]
    assert all(row[2] != "Hands/" + victim["imageName"] for row in kept)
    assert len(kept) == sum(r["aspectOfHand"] == victim["aspectOfHand"] for r in rows) - 1
    assert counts[victim["aspectOfHand"]]["train_all imgs"] + counts[victim["aspectOfHand"]]["test imgs"] == len(kept)


def test_single_test_image_identity_is_an_error(synth11k):
    info = json.load(open(os.path.join(synth11k, synthetic.SYNTHETIC_MARKER)))
    lonely = info["ids"]["palmar right"][-1]  # a test id (above the threshold)
    assert int(lonely) > splits.LAST_TRAIN_ID_11K["palmar right"]
    seen = []

    def keep(row):
        if row["id"].strip() == lonely and row["aspectOfHand"] == "palmar right" and row["accessories"] == "0":
            seen.append(row)
            return len(seen) == 1
        return True

    rewrite_csv(synth11k, keep)
    with pytest.raises(SystemExit, match=rf"identity '{lonely}' has a single test image .*HandInfo\.csv"):
        prep11k.main(["--data_dir", synth11k])


def test_bad_values_name_the_line(synth11k):
    rows = rewrite_csv(synth11k)
    rows[3]["accessories"] = "yes"
    with open(os.path.join(synth11k, "HandInfo.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, splits.HAND_INFO_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match=r"HandInfo\.csv line 5"):
        prep11k.main(["--data_dir", synth11k])


# ---- synthetic generators ----

def test_synthetic_11k_format(synthetic_11k_source):
    with open(os.path.join(synthetic_11k_source, "HandInfo.csv"), newline="") as f:
        header = f.readline().strip()
        rows = list(csv.DictReader(f, fieldnames=header.split(",")))
    with open(REAL_CSV, newline="") as f:
        assert header == f.readline().strip()
    assert {r["aspectOfHand"] for r in rows} == set(splits.ASPECTS_11K)
    assert {r["accessories"] for r in rows} == {"0", "1"}
    assert sum(r["accessories"] == "1" for r in rows) < sum(r["accessories"] == "0" for r in rows) / 3
    assert sum(r["id"] != r["id"].strip() for r in rows) == 1
    for aspect, last in splits.LAST_TRAIN_ID_11K.items():
        ids = {int(r["id"]) for r in rows if r["aspectOfHand"] == aspect}
        assert min(ids) <= last < max(ids)
    assert sorted(os.listdir(os.path.join(synthetic_11k_source, "Hands"))) == sorted(r["imageName"] for r in rows)


def test_synthetic_11k_is_deterministic(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for root in (first, second):
        synthetic.make_synthetic_11k(root, num_ids_per_aspect=4, images_per_id=(2, 2), seed=3)
    names = ["HandInfo.csv"] + [f"Hands/{n}" for n in sorted(os.listdir(os.path.join(first, "Hands")))]
    match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    assert len(match) == len(names) > 30 and not mismatch and not errors
    synthetic.make_synthetic_11k(second, num_ids_per_aspect=4, images_per_id=(2, 2), seed=4)  # replaces its own output
    assert not filecmp.cmp(os.path.join(first, "HandInfo.csv"), os.path.join(second, "HandInfo.csv"), shallow=False)


def test_synthetic_hd_tree(synthetic_hd_source):
    for folder, low, high in (("1-501", 1, 501), ("502-712", 502, 712)):
        names = os.listdir(os.path.join(synthetic_hd_source, "Original Images", folder))
        assert names and all(n.endswith(".jpg") and low <= int(n.split("_")[0]) <= high for n in names)


def test_synthetic_images_vary_within_and_between_identities(synthetic_11k_source):
    import numpy as np
    from PIL import Image
    info = json.load(open(os.path.join(synthetic_11k_source, synthetic.SYNTHETIC_MARKER)))
    assert info["image_size"] == [160, 120]
    with open(os.path.join(synthetic_11k_source, "HandInfo.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["aspectOfHand"] == "dorsal right"]
    images = [np.asarray(Image.open(os.path.join(synthetic_11k_source, "Hands", r["imageName"])), dtype=np.float32)
              for r in rows[:2]]
    assert images[0].shape == (120, 160, 3)
    assert np.abs(images[0] - images[1]).mean() > 3  # pose/lighting change between photos of one hand


def test_synthetic_refuses_real_data(tmp_path):
    real = tmp_path / "11k"
    real.mkdir()
    shutil.copyfile(REAL_CSV, real / "HandInfo.csv")
    with pytest.raises(FileExistsError, match="real data"):
        synthetic.make_synthetic_11k(str(real), num_ids_per_aspect=4)
    assert filecmp.cmp(real / "HandInfo.csv", REAL_CSV, shallow=False)


@pytest.mark.parametrize("script", ["prepare_train_val_test_11k_r_l", "prepare_train_val_test_hd"])
def test_num_splits_is_checked_before_the_data(script, tmp_path, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.main(["--data_dir", str(tmp_path / "missing"), "--num_splits", "0"])
    assert info.value.code == 2 and capsys.readouterr().err == "error: --num_splits must be at least 1, got 0\n"
