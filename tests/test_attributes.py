"""Soft-biometric attributes (utils/attributes.py, eval_attributes_clip_zeroshot.py) on the real
11k HandInfo.csv columns and on synthetic 11k data with a tiny random CLIP."""
import collections
import csv
import json
import os

import numpy as np
import pytest
import torch

import eval_attributes_clip_zeroshot as attribute_eval
import train_finetune
from utils import attributes, splits
from utils.errors import AttributeInputError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REAL_HAND_INFO = os.path.join(TESTS_DIR, "data", "HandInfo.csv")
REPO = os.path.dirname(TESTS_DIR)
QUIET = ["--num_workers", "0", "--device", "cpu", "--input_size", "64", "64"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def real_rows():
    with open(REAL_HAND_INFO, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def real_labels():
    """Class labels, ids and train/test side of every row of the real HandInfo.csv."""
    rows = real_rows()
    classes = [attributes.row_classes(row, f"row {k}") for k, row in enumerate(rows)]
    ids = [row["id"].strip() for row in rows]
    aspects = [row["aspectOfHand"] for row in rows]
    train_ids = attributes.train_identities_11k(ids, aspects, splits.LAST_TRAIN_ID_11K)
    return {"labels": attributes.label_arrays(classes), "ids": ids, "aspects": aspects, "train_ids": train_ids,
            "train": np.array([i in train_ids for i in ids])}


def test_real_hand_info_classes_match_its_columns(real_labels):
    rows = real_rows()
    labels = real_labels["labels"]
    assert all(len(v) == len(rows) == 11076 for v in labels.values())

    def counts(attribute):
        names = attributes.ATTRIBUTES[attribute]
        return {names[k]: n for k, n in collections.Counter(labels[attribute].tolist()).items()}

    assert counts("gender") == collections.Counter(r["gender"] for r in rows) == {"female": 7109, "male": 3967}
    assert counts("skin_color") == collections.Counter(r["skinColor"] for r in rows)
    assert counts("nail_polish") == {"no": 10009, "yes": 1067}
    assert counts("accessories") == {"no": 7865, "yes": 3211}
    assert counts("palmar_dorsal")["palmar"] == sum(r["aspectOfHand"].startswith("palmar") for r in rows)
    assert counts("left_right")["left"] == sum(r["aspectOfHand"].endswith("left") for r in rows)
    ages = np.array([int(r["age"]) for r in rows])
    assert counts("age") == {"18-21": int((ages <= 21).sum()), "22-30": int(((ages > 21) & (ages <= 30)).sum()),
                             "31+": int((ages > 30).sum())}


def test_real_ids_split_by_person_with_the_mba_net_thresholds(real_labels):
    ids, aspects, train_ids = real_labels["ids"], real_labels["aspects"], real_labels["train_ids"]
    test_ids = set(ids) - train_ids
    assert train_ids and test_ids and not train_ids & test_ids
    for label, aspect in zip(ids, aspects):
        if int(label) > splits.LAST_TRAIN_ID_11K[aspect]:  # every MBA-Net test image stays on the test side
            assert label in test_ids
        if label in train_ids:
            assert int(label) <= splits.LAST_TRAIN_ID_11K[aspect]
    # a person between the thresholds (train for dorsal right, test for dorsal left) is a test person
    assert "0001041" in test_ids and "0001037" in train_ids
    assert attributes.check_disjoint(train_ids, test_ids, "x")["shared"] == 0
    with pytest.raises(AttributeInputError, match="both the train and the test side"):
        attributes.check_disjoint({"1", "2"}, {"2", "3"}, "x")


def test_confusion_accuracy_and_balanced_accuracy_on_real_labels(real_labels):
    rng = np.random.default_rng(0)
    for name, classes in attributes.ATTRIBUTES.items():
        true = real_labels["labels"][name]
        predicted = np.where(rng.random(len(true)) < 0.7, true, rng.integers(len(classes), size=len(true)))
        confusion = attributes.confusion_matrix(true, predicted, len(classes))
        assert confusion.sum() == len(true)
        assert attributes.accuracy(confusion) == pytest.approx(np.trace(confusion) / confusion.sum())
        assert attributes.accuracy(confusion) == pytest.approx((predicted == true).mean())
        recalls = [(predicted[true == k] == k).mean() for k in range(len(classes)) if (true == k).any()]
        assert attributes.balanced_accuracy(confusion) == pytest.approx(np.mean(recalls))
        assert attributes.majority_rate(confusion) == pytest.approx(np.bincount(true).max() / len(true))
        for k in range(len(classes)):
            assert confusion[k].sum() == (true == k).sum() and confusion[:, k].sum() == (predicted == k).sum()


def test_probe_reads_an_attribute_the_features_carry_and_not_one_they_lack(real_labels):
    train = real_labels["train"]
    rng = np.random.default_rng(1)
    for name in ("skin_color", "nail_polish", "age"):
        y = real_labels["labels"][name]
        num_classes = len(attributes.ATTRIBUTES[name])
        directions = rng.normal(size=(num_classes, 24))
        carrying = torch.tensor(rng.normal(size=(len(y), 24)) * 0.5 + 2 * directions[y], dtype=torch.float32)
        probe = attributes.train_probe(carrying[train], y[train], num_classes)
        confusion = attributes.confusion_matrix(y[~train], probe.predict(carrying[~train]), num_classes)
        assert attributes.accuracy(confusion) > 0.97 and attributes.balanced_accuracy(confusion) > 0.97, name
        noise = torch.tensor(rng.normal(size=(len(y), 24)), dtype=torch.float32)
        probe = attributes.train_probe(noise[train], y[train], num_classes)
        confusion = attributes.confusion_matrix(y[~train], probe.predict(noise[~train]), num_classes)
        assert attributes.balanced_accuracy(confusion) < 0.6, name
    with pytest.raises(AttributeInputError, match="fewer than two classes"):
        attributes.train_probe(torch.zeros(4, 3), np.zeros(4, dtype=np.int64), 2)


def test_text_ensembles_average_normalised_prompt_features():
    prompts = {"gender": {"male": ["b"], "female": ["a", "c"]}}  # any key order; rows follow ATTRIBUTES
    vectors = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 5.0]), "c": torch.tensor([0.0, 0.1])}
    features = attributes.class_text_features(lambda texts: torch.stack([vectors[t] for t in texts]), prompts)
    expected_female = torch.nn.functional.normalize(torch.tensor([0.5, 0.5]), dim=0)
    torch.testing.assert_close(features["gender"], torch.stack([expected_female, torch.tensor([0.0, 1.0])]))


def test_readme_lists_the_bins_and_every_default_prompt():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for label, _ in attributes.AGE_GROUPS:
        assert label.replace("-", "–") in readme or label in readme
    for by_class in attributes.DEFAULT_PROMPTS.values():
        for texts in by_class.values():
            for text in texts:
                assert text in readme, text


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('["a photo"]', "must hold a JSON object"),
    ('{"shoe_size": {}}', "unknown attribute 'shoe_size'"),
    ('{"gender": {"female": ["a woman"]}}', "must map each of its classes"),
    ('{"gender": {"female": [], "male": ["a man"]}}', "needs a non-empty list"),
    ('{"gender": {"female": "a woman", "male": ["a man"]}}', "needs a non-empty list"),
])
def test_bad_prompt_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(AttributeInputError, match=message) as info:
        attributes.load_prompts(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(SystemExit, match=message):
        attribute_eval.main(["--data_dir", "/nonexistent", "--prompts", str(path), "--out_dir", str(tmp_path / "o")])


def run_eval(data_dir, out_dir, checkpoint, *extra):
    result = attribute_eval.main(["--data_dir", data_dir, "--backbone_name", checkpoint, "--out_dir", str(out_dir),
                                  *QUIET, *extra])
    with open(os.path.join(out_dir, "attributes.json")) as f:
        return result, json.load(f)


def check_scores(saved, num_test):
    for name, entry in saved["attributes"].items():
        for method in ("zero_shot", "probe"):
            summary = entry[method]
            if "skipped" in summary:
                continue
            confusion = np.array(summary["confusion"])
            assert confusion.sum() == summary["num_images"] == num_test, (name, method)
            assert summary["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
            counts = [summary["counts"][c] for c in attributes.ATTRIBUTES[name]]  # JSON sorts the keys
            assert counts == confusion.sum(axis=1).tolist()


@pytest.fixture(scope="module")
def root_run(synthetic_11k, tiny_vit_checkpoint, tmp_path_factory):
    """The evaluation of the synthetic 11k root, with the number of rows every probe was fitted on."""
    seen = []
    train_probe = attributes.train_probe

    def spy(features, labels, *args, **kwargs):
        seen.append(len(labels))
        return train_probe(features, labels, *args, **kwargs)

    out_dir = tmp_path_factory.mktemp("attr") / "root"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attributes, "train_probe", spy)
        result, saved = run_eval(synthetic_11k, out_dir, tiny_vit_checkpoint)
    return {"result": result, "saved": saved, "out_dir": out_dir, "probe_rows": seen}


def test_synthetic_root_scores_every_attribute_on_test_people(root_run, synthetic_11k):
    saved = root_run["saved"]
    with open(os.path.join(synthetic_11k, "HandInfo.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    train_ids = attributes.train_identities_11k([r["id"].strip() for r in rows], [r["aspectOfHand"] for r in rows],
                                                splits.LAST_TRAIN_ID_11K)
    test_rows = [r for r in rows if r["id"].strip() not in train_ids]
    assert saved["identities"]["shared"] == 0 and saved["identities"]["train"] == len(train_ids)
    check_scores(saved, len(test_rows))
    # the probe of every attribute is fitted on the training people's images only
    assert root_run["probe_rows"] and set(root_run["probe_rows"]) == {len(rows) - len(test_rows)}
    # the generator's attributes come back as the test counts
    gender = collections.Counter(r["gender"] for r in test_rows)
    assert saved["attributes"]["gender"]["zero_shot"]["counts"] == {c: gender[c] for c in ("female", "male")}
    polish = sum(r["nailPolish"] == "1" for r in test_rows)
    assert saved["attributes"]["nail_polish"]["probe"]["counts"]["yes"] == polish
    assert saved["attributes"]["accessories"]["zero_shot"]["counts"]["yes"] == sum(r["accessories"] == "1"
                                                                                   for r in test_rows)
    out_dir = root_run["out_dir"]
    for name in attributes.ATTRIBUTES:
        assert os.path.getsize(out_dir / f"confusion_{name}.png") > 0 and os.path.getsize(out_dir / f"confusion_{name}.pdf") > 0
    with open(out_dir / "attributes.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["attribute"] for r in table] == list(attributes.ATTRIBUTES)
    assert float(table[0]["zero_shot_accuracy"]) == pytest.approx(saved["attributes"]["gender"]["zero_shot"]["accuracy"])
    with open(out_dir / "config.json") as f:
        config = json.load(f)
    assert config["args"]["seed"] == 0 and config["git_commit"] and config["pretrained"] is None
    with pytest.raises(SystemExit, match="already holds results; pass --force"):
        run_eval(synthetic_11k, out_dir, "unused")


def test_prompt_override_replaces_the_ensemble(root_run, synthetic_11k, tiny_vit_checkpoint, tmp_path):
    # the gender prompts swapped: every zero-shot gender answer flips, the other attributes stay
    swapped = {"gender": {"female": attributes.DEFAULT_PROMPTS["gender"]["male"],
                          "male": attributes.DEFAULT_PROMPTS["gender"]["female"]}}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(swapped))
    _, saved = run_eval(synthetic_11k, tmp_path / "out", tiny_vit_checkpoint, "--prompts", str(path))
    assert saved["prompts"]["gender"] == swapped["gender"]
    before = np.array(root_run["saved"]["attributes"]["gender"]["zero_shot"]["confusion"])
    after = np.array(saved["attributes"]["gender"]["zero_shot"]["confusion"])
    np.testing.assert_array_equal(after, before[:, ::-1])
    for name in ("skin_color", "left_right"):
        assert saved["attributes"][name] == root_run["saved"]["attributes"][name]


def test_split_root_reads_its_hand_info_and_skips_single_class_probes(synthetic_11k, tiny_vit_checkpoint, tmp_path):
    split_root = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    _, saved = run_eval(split_root, tmp_path / "out", tiny_vit_checkpoint)
    sets = splits.read_split_sets(split_root, ["train_all", "test"])
    assert saved["hand_info"] == os.path.abspath(os.path.join(synthetic_11k, "HandInfo.csv"))
    assert saved["identities"] == {"train": len({s[1] for s in sets["train_all"]}),
                                   "test": len({s[1] for s in sets["test"]}), "shared": 0}
    check_scores(saved, len(sets["test"]))
    for name in ("accessories", "palmar_dorsal", "left_right"):  # a dorsal-right root without accessories
        assert saved["attributes"][name]["probe"] == {"skipped": "the training images hold a single class"}
    assert saved["attributes"]["left_right"]["zero_shot"]["counts"] == {"left": 0, "right": len(sets["test"])}
    other = tmp_path / "HandInfo.csv"
    with open(os.path.join(synthetic_11k, "HandInfo.csv")) as f:
        other.write_text("\n".join(f.read().splitlines()[:5]) + "\n")
    with pytest.raises(SystemExit, match="is not listed in .*HandInfo.csv; pass the HandInfo.csv"):
        run_eval(split_root, tmp_path / "out2", tiny_vit_checkpoint, "--hand_info", str(other))


def test_model_run_dir_pairs_the_trained_encoder_with_the_frozen_text_tower(synthetic_11k, tiny_vit_checkpoint,
                                                                             tmp_path):
    split_root = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    train_finetune.main(["--data_dir", split_root, "--f_name", str(tmp_path), "--m_name", "ft", "--backbone_name",
                         tiny_vit_checkpoint, "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "8",
                         "--no-final_test", "--no-progress", *QUIET])
    run_dir = str(tmp_path / "ft")
    result = attribute_eval.main(["--data_dir", split_root, "--model", run_dir, "--which_epoch", "last",
                                  "--num_workers", "0", "--device", "cpu"])
    assert result["text_tower"] == tiny_vit_checkpoint and result["model_kind"] == "finetune"
    assert result["input_size"] == [64, 64]
    assert os.path.isfile(os.path.join(run_dir, "attributes_last", "attributes.json"))
    sets = splits.read_split_sets(split_root, ["test"])
    check_scores({"attributes": result["attributes"]}, len(sets["test"]))
    with pytest.raises(SystemExit, match="net_7.pth does not exist"):
        attribute_eval.main(["--data_dir", split_root, "--model", run_dir, "--which_epoch", "7", "--device", "cpu"])
