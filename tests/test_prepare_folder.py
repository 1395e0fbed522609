"""prepare_train_val_test_folder.py: MBA-Net splits of any <identity>/<photo> data set, read unchanged by
every trainer and evaluator."""
import json
import os

import pytest

import eval_query_gallery_clip_zeroshot
import eval_query_gallery_finetune
import prepare_train_val_test_folder as prepare
import train_clipreid
import train_handid
import train_promptsg
from conftest import FOLDER_TRAINING
from utils import splits, synthetic

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def manifest_of(split_root):
    with open(os.path.join(split_root, splits.SPLITS_MANIFEST)) as f:
        return json.load(f)


def labels_of(entries):
    return {label for _, label, _ in entries}


def test_layout_and_manifest_follow_the_protocol(folder_split):
    manifest = manifest_of(folder_split)
    sets = manifest["sets"]
    assert manifest["dataset"] == "folder" and manifest["gallery_variants"] == ["own"] and manifest["seed"] == 0
    assert manifest["skipped_identities"] == ["person_012"]  # its single photo gives no pair
    train, test = labels_of(sets["train_all"]), labels_of(sets["test"])
    assert len(train) == len(test) == 6 and not train & test  # --train_fraction 0.5 of 12, disjoint people
    assert labels_of(sets["val"]) == train and len(sets["val"]) == 6
    assert len(sets["train"]) + len(sets["val"]) == len(sets["train_all"])
    distractors = {label for label in labels_of(sets["gallery0"]) if label.startswith("distractor_")}
    assert distractors == {"distractor_stranger_0", "distractor_stranger_1", "distractor_stranger_2"}
    for i in range(2):
        own = [e for e in sets[f"gallery{i}"] if not e[1].startswith("distractor_")]
        assert sorted(label for _, label, _ in own) == sorted(test)  # one gallery photo per test identity
        assert labels_of(sets[f"query{i}"]) == test
        assert not labels_of(sets[f"query{i}"]) & distractors  # distractor labels never match a query
        assert {e[2] for e in sets[f"query{i}"]} | {e[2] for e in own} == {e[2] for e in sets["test"]}
        assert all(e[2].startswith("../strangers/") for e in sets[f"gallery{i}"] if e[1] in distractors)
    layout = splits.read_split_layout(folder_split)
    assert layout == {"dataset": "folder", "num_splits": 2, "gallery_variants": ["own"], "manifest": True}
    assert splits.test_set_name(folder_split) == "hands"
    for relpath, _, _ in sets["gallery1"]:
        assert os.path.isfile(os.path.join(folder_split, relpath))


def make_data(root, **kwargs):
    synthetic.make_synthetic_folder(str(root), num_ids=6, images_per_id=(3, 3), image_size=(24, 18), **kwargs)
    return str(root)


def run(data_dir, *extra):
    return prepare.main(["--data_dir", data_dir, "--num_splits", "2", "--num_workers", "0", *extra])


def test_manifest_is_byte_identical_for_one_seed(tmp_path):
    data_dir = make_data(tmp_path / "hands")
    path = os.path.join(data_dir, prepare.SPLIT_ROOT, splits.SPLITS_MANIFEST)
    run(data_dir, "--seed", "3")
    first = open(path, "rb").read()
    run(data_dir, "--seed", "3", "--force")
    assert open(path, "rb").read() == first
    run(data_dir, "--seed", "4", "--force")
    assert open(path, "rb").read() != first


def test_train_ids_file_and_numeric_distractor_labels(tmp_path):
    data_dir = make_data(tmp_path / "hands", distractor_dir=str(tmp_path / "hands" / "strangers"), num_distractors=2)
    for k in range(6):  # numeric identities: distractors get numbers above all of them
        os.rename(os.path.join(data_dir, f"person_{k:03d}"), os.path.join(data_dir, str(40 + k)))
    (tmp_path / "train.txt").write_text("# people who train\n40\n42\n\n44  # the last one\n")
    run(data_dir, "--train_ids", str(tmp_path / "train.txt"), "--distractors", os.path.join(data_dir, "strangers"))
    manifest = manifest_of(os.path.join(data_dir, prepare.SPLIT_ROOT))
    assert labels_of(manifest["sets"]["train_all"]) == {"40", "42", "44"}
    assert labels_of(manifest["sets"]["test"]) == {"41", "43", "45"}
    assert manifest["distractors"]["labels"] == {"offset": 100}
    assert labels_of(manifest["sets"]["gallery0"]) == {"41", "43", "45", "101", "102"}
    assert "strangers" not in labels_of(manifest["sets"]["train_all"])  # the distractor folder is no identity


@pytest.mark.parametrize("extra, message", [
    (["--train_fraction", "1.5"], "--train_fraction"),
    (["--train_fraction", "0.01"], "0 train and 6 test"),
    (["--train_ids", "missing.txt"], "cannot read --train_ids"),
    (["--distractors", "nowhere"], "--distractors nowhere is not a folder"),
])
def test_bad_flags_stop_with_one_line(tmp_path, extra, message, capsys):
    data_dir = make_data(tmp_path / "hands")
    with pytest.raises(SystemExit) as stop:
        run(data_dir, *extra)
    assert message in str(stop.value) + capsys.readouterr().err
    assert not os.path.exists(os.path.join(data_dir, prepare.SPLIT_ROOT))


def test_all_or_nothing_and_no_replacement_without_force(tmp_path):
    data_dir = make_data(tmp_path / "hands")
    run(data_dir)
    path = os.path.join(data_dir, prepare.SPLIT_ROOT, splits.SPLITS_MANIFEST)
    before = open(path, "rb").read()
    with pytest.raises(SystemExit, match="--force"):
        run(data_dir, "--seed", "1")
    with open(os.path.join(data_dir, "person_002", "2.jpg"), "wb") as f:
        f.write(b"not a photo")
    with pytest.raises(SystemExit, match=r"1 of \d+ photos .* cannot be read.*person_002"):
        run(data_dir, "--seed", "1", "--force")  # the pre-flight check, before anything is replaced
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(data_dir)) == sorted([f"person_{k:03d}" for k in range(6)] + [
        prepare.SPLIT_ROOT, synthetic.SYNTHETIC_MARKER])  # no temporary folders left


def test_every_trainer_and_evaluator_runs_on_the_output(folder_split, folder_finetune_run, tiny_vit_checkpoint,
                                                        tmp_path):
    out_root = os.path.dirname(folder_finetune_run)
    common = ["--data_dir", folder_split, "--f_name", out_root, "--backbone_name", tiny_vit_checkpoint,
              *FOLDER_TRAINING]
    train_clipreid.main([*common, "--m_name", "clipreid", "--stage1_epochs", "1", "--stage1_batch_size", "8"])
    train_promptsg.main([*common, "--m_name", "promptsg"])
    train_handid.main([*common, "--m_name", "handid"])
    for name in ("finetune", "clipreid", "promptsg", "handid"):
        with open(os.path.join(out_root, name, "config.json")) as f:
            assert json.load(f)["args"]["data_type"] == "folder", name
        results = eval_query_gallery_finetune.main(["--test_dir", folder_split, "--f_name", out_root, "--m_name", name,
                                                    "--out_dir", str(tmp_path / name), "--device", "cpu",
                                                    "--num_workers", "0"])
        assert results["dataset"] == "folder" and results["gallery_variants"] == ["own"], name
        assert results["num_splits"] == 2 and results["rows"][0]["num_gallery"] == 6 + 3, name
    zero_shot = eval_query_gallery_clip_zeroshot.main(["--test_dir", folder_split, "--f_name", str(tmp_path / "zs"),
                                                       "--backbone_name", tiny_vit_checkpoint, "--input_size", "32",
                                                       "32", "--device", "cpu", "--num_workers", "0"])
    assert os.path.isfile(tmp_path / "zs" / "clip_zero_shot" / "tiny_vit" / "hands" / "result_split1.mat")
    assert zero_shot["rows"][1]["num_query"] == len(manifest_of(folder_split)["sets"]["query1"])


def refusal(data_dir, capsys, *extra):
    """The one line a refused run prints (SystemExit's message or stderr), after checking it wrote nothing."""
    before = sorted(os.listdir(data_dir))
    with pytest.raises(SystemExit) as stop:
        run(data_dir, *extra)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    lines = [line for line in [str(stop.value)] + err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    assert sorted(os.listdir(data_dir)) == before  # nothing written, nothing removed
    return lines[0]


@pytest.mark.parametrize("content", ["José\nperson_000\n".encode("latin-1"), b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x01"],
                         ids=["latin-1", "binary"])
def test_train_ids_not_utf8_is_one_line(tmp_path, capsys, content):
    data_dir = make_data(tmp_path / "hands")
    (tmp_path / "ids.txt").write_bytes(content)
    line = refusal(data_dir, capsys, "--train_ids", str(tmp_path / "ids.txt"))
    assert f"--train_ids {tmp_path / 'ids.txt'} is not UTF-8 text" in line and "save it as UTF-8" in line
    (tmp_path / "ids.txt").write_bytes("\ufeffperson_000  # José\nperson_001\n".encode("utf-8"))  # a BOM is fine
    run(data_dir, "--train_ids", str(tmp_path / "ids.txt"))
    manifest = manifest_of(os.path.join(data_dir, prepare.SPLIT_ROOT))
    assert labels_of(manifest["sets"]["train_all"]) == {"person_000", "person_001"}


def test_distractors_overlapping_the_data_set_are_refused(tmp_path, capsys):
    data_dir = make_data(tmp_path / "hands", distractor_dir=str(tmp_path / "strangers"), num_distractors=1)
    run(data_dir)
    root = os.path.join(data_dir, prepare.SPLIT_ROOT)
    before = open(os.path.join(root, splits.SPLITS_MANIFEST), "rb").read()
    line = refusal(data_dir, capsys, "--distractors", data_dir, "--force")
    assert f"--distractors {data_dir} is --data_dir itself" in line
    gallery = os.path.join(root, "gallery0")
    line = refusal(data_dir, capsys, "--distractors", gallery, "--force")
    assert f"--distractors {gallery} lies inside {root}, the split root this run writes" in line
    line = refusal(data_dir, capsys, "--distractors", str(tmp_path), "--force")
    assert f"--distractors {tmp_path} holds " in line and "an identity folder of --data_dir" in line
    inner = os.path.join(data_dir, "person_001", ".more")  # a hidden folder: not a nested identity
    os.makedirs(inner)
    os.rename(str(tmp_path / "strangers" / "stranger_0.jpg"), os.path.join(inner, "x.jpg"))
    line = refusal(data_dir, capsys, "--distractors", inner, "--force")
    assert f"--distractors {inner} lies inside {os.path.join(data_dir, 'person_001')}, an identity folder" in line
    copies = tmp_path / "copies"
    copies.mkdir()
    with open(os.path.join(data_dir, "person_003", "2.jpg"), "rb") as f:
        (copies / "new_name.jpg").write_bytes(f.read())
    line = refusal(data_dir, capsys, "--distractors", str(copies), "--force")
    assert "--distractors: 1 photo(s) are byte-identical copies" in line
    assert f"{copies / 'new_name.jpg'} = {os.path.join(data_dir, 'person_003', '2.jpg')}" in line
    assert open(os.path.join(root, splits.SPLITS_MANIFEST), "rb").read() == before  # the old split untouched


def test_distractor_copies_are_found_by_bytes_not_size(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"0123456789")
    (tmp_path / "same_size.jpg").write_bytes(b"9876543210")
    (tmp_path / "other_size.jpg").write_bytes(b"0123")
    prepare.check_distractor_copies([str(tmp_path / "same_size.jpg"), str(tmp_path / "other_size.jpg")],
                                    [str(tmp_path / "a.jpg")])
    (tmp_path / "copy.jpg").write_bytes(b"0123456789")
    with pytest.raises(prepare.SplitInputError, match="1 photo.* byte-identical.*copy.jpg = .*a.jpg"):
        prepare.check_distractor_copies([str(tmp_path / "same_size.jpg"), str(tmp_path / "copy.jpg")],
                                        [str(tmp_path / "a.jpg")])


def test_photos_in_sub_folders_of_an_identity_are_refused(tmp_path, capsys):
    data_dir = make_data(tmp_path / "hands")
    for session in ("s1", "s2"):
        os.makedirs(os.path.join(data_dir, "person_100", session))
        for n in range(1, 5):
            with open(os.path.join(data_dir, "person_000", f"{n % 3 + 1}.jpg"), "rb") as src, \
                    open(os.path.join(data_dir, "person_100", session, f"{n}.jpg"), "wb") as dst:
                dst.write(src.read())
    line = refusal(data_dir, capsys)
    assert f"--data_dir {data_dir}: person_100/s1/ holds photos" in line
    assert "must sit directly in <identity>/" in line


def test_train_ids_and_train_fraction_exclude_each_other_and_the_record_says_what_ran(tmp_path, capsys):
    data_dir = make_data(tmp_path / "hands")
    (tmp_path / "ids.txt").write_text("person_000\nperson_001\n")
    line = refusal(data_dir, capsys, "--train_ids", str(tmp_path / "ids.txt"), "--train_fraction", "0.9")
    assert line == ("error: --train_ids and --train_fraction exclude each other: give the list of train identities "
                    "or the share to draw, not both")
    config_path = os.path.join(data_dir, prepare.SPLIT_ROOT, splits.PREPARE_CONFIG)
    run(data_dir, "--train_ids", str(tmp_path / "ids.txt"))
    with open(config_path) as f:
        assert json.load(f)["args"]["train_fraction"] is None  # the list chose the train people
    run(data_dir, "--force")
    with open(config_path) as f:
        assert json.load(f)["args"]["train_fraction"] == 0.5
    assert manifest_of(os.path.dirname(config_path))["train_split"] == {"train_fraction": 0.5}


def test_split_root_that_is_a_file_says_so_with_and_without_force(tmp_path, capsys):
    data_dir = make_data(tmp_path / "hands")
    path = os.path.join(data_dir, prepare.SPLIT_ROOT)
    with open(path, "w") as f:
        f.write("notes")
    for extra in ([], ["--force"]):
        assert refusal(data_dir, capsys, *extra) == f"error: {path} exists and is not a folder; remove it by hand"
    assert open(path).read() == "notes"


def test_train_ids_naming_a_single_photo_identity_says_why(tmp_path, capsys):
    data_dir = make_data(tmp_path / "hands", single_image_ids=1)
    (tmp_path / "ids.txt").write_text("person_000\nperson_006\n")
    line = refusal(data_dir, capsys, "--train_ids", str(tmp_path / "ids.txt"))
    assert "names 1 identity with a single photo, left out" in line and "'person_006'" in line
    assert "without photos" not in line


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan", "inf"])
def test_train_fraction_out_of_range_is_one_line_without_usage(tmp_path, capsys, value):
    data_dir = make_data(tmp_path / "hands")
    with pytest.raises(SystemExit) as stop:
        run(data_dir, "--train_fraction", value)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --train_fraction must be between 0 and 1, got {float(value)}\n"
