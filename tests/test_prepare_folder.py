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
