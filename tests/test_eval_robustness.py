"""eval_robustness.py on the synthetic hands with a tiny fine-tuned run and a tiny zero-shot
checkpoint: severity 0 is the plain evaluation, the degraded side is the one asked for, the CSV
equals the JSON, and the output folder follows the project's rules."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

import eval_query_gallery_clip_zeroshot
import eval_query_gallery_finetune
import eval_robustness
import train_finetune
from utils import corruptions, evaluation, splits

pytestmark = pytest.mark.usefixtures("single_torch_thread")
QUIET = ["--num_workers", "0", "--device", "cpu"]
FAST = ["--families", "gaussian_noise", "occlusion", "--severities", "1", "5"]


@pytest.fixture(scope="module")
def run_dir(hand_data, tiny_vit_checkpoint, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("robust_runs")
    result = train_finetune.main(["--data_dir", hand_data, "--f_name", str(out_root), "--m_name", "vit",
                                  "--backbone_name", tiny_vit_checkpoint, "--no-progress", *QUIET,
                                  "--input_size", "64", "64", "--stride", "8", "--epochs", "2", "--warmup_epochs", "1",
                                  "--eval_every", "2", "--batch_size", "16", "--lr", "3e-4", "--no-final_test"])
    return result["out_dir"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def same(a, b):
    return (a is None or (isinstance(a, float) and math.isnan(a))) if b is None else a == b


def test_clean_row_is_the_plain_evaluation(run_dir, hand_data, tmp_path):
    plain = eval_query_gallery_finetune.main(["--f_name", os.path.dirname(run_dir),
                                              "--m_name", "vit", "--test_dir", hand_data, "--out_dir",
                                              str(tmp_path / "plain"), *QUIET])
    results = eval_robustness.main(["--run_dir", run_dir, "--test_dir", hand_data, "--out_dir",
                                    str(tmp_path / "robust"), *FAST, *QUIET])
    assert results["gallery_variants"] == plain["gallery_variants"]
    for variant in plain["gallery_variants"]:
        clean = next(r for r in results["rows"] if r["gallery"] == variant and r["family"] == "clean")
        for name in evaluation.metric_names():  # the same features give the same numbers, exactly
            assert same(clean[f"{name}_mean"], plain["summary"][variant]["mean"][name]), name
            assert same(clean[f"{name}_std"], plain["summary"][variant]["std"][name]), name
    clean_splits = [r for r in results["splits"] if r["family"] == "clean"]
    for row in plain["rows"]:
        mine = next(r for r in clean_splits if r["split"] == row["split"] and r["gallery"] == row["gallery"])
        assert all(same(mine[name], row[name]) for name in evaluation.metric_names())
    # the degraded evaluations differ from clean, and noise at severity 5 hurts
    headline = [r for r in results["rows"] if r["gallery"] == results["headline_gallery"]]
    noisy = next(r for r in headline if r["family"] == "gaussian_noise" and r["severity"] == 5)
    assert noisy["mAP_hand_mean"] < headline[0]["mAP_hand_mean"]
    assert results["num_degraded_images"] == len({key for i in range(results["num_splits"]) for _, _, key in
                                                  splits.read_split_sets(hand_data, [f"query{i}"])[f"query{i}"]})
    assert results["most_damaging"]["family"] in ("gaussian_noise", "occlusion")


def test_zero_shot_clean_row_is_the_zero_shot_evaluation(tiny_vit_checkpoint, hand_data, tmp_path):
    common = ["--backbone_name", tiny_vit_checkpoint, "--input_size", "64", "64", "--test_dir", hand_data,
              "--f_name", str(tmp_path), *QUIET]
    plain = eval_query_gallery_clip_zeroshot.main(common)
    results = eval_robustness.main([*common, "--families", "jpeg", "--severities", "3"])
    assert os.path.isdir(os.path.join(tmp_path, "clip_zero_shot", "tiny_vit", "robustness_dorsal_r"))
    variant = results["headline_gallery"]
    clean = next(r for r in results["rows"] if r["gallery"] == variant and r["family"] == "clean")
    for name in evaluation.metric_names():
        assert same(clean[f"{name}_mean"], plain["summary"][variant]["mean"][name]), name


def test_outputs_csv_equals_json_and_figures(run_dir, hand_data, tmp_path, capsys, monkeypatch):
    counts = {}
    original = corruptions.corrupt

    def counting(images, family, severity, identities, seed=0):
        counts.setdefault((family, severity), []).extend(identities)
        return original(images, family, severity, identities, seed)
    monkeypatch.setattr(corruptions, "corrupt", counting)
    out = tmp_path / "robust"
    eval_robustness.main(["--run_dir", run_dir, "--test_dir", hand_data, "--out_dir", str(out), "--batch_size", "16",
                          *FAST, *QUIET])
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith("Wrote robustness.json") and "most damaging: " in closing and "least damaging" in closing
    for name in ("robustness.json", "robustness.csv", "robustness_mAP.png", "corruptions.png", "config.json"):
        assert os.path.getsize(out / name) > 0
    results = read_json(out / "robustness.json")
    table = pd.read_csv(out / "robustness.csv")
    assert len(table) == len(results["rows"])
    # per gallery: clean, 2 families x (2 severities + their mean)
    assert len(results["rows"]) == len(results["gallery_variants"]) * (1 + 2 * 3)
    for (_, csv_row), row in zip(table.iterrows(), results["rows"]):
        for column, value in row.items():
            found = csv_row[column]
            if isinstance(value, float):
                assert found == pytest.approx(value, abs=1e-6), column
            elif value is None:
                assert pd.isna(found), column
            else:
                assert str(found) == str(value), column
    # each family's mean relative to clean: the mean over its severities over the clean value
    headline = [r for r in results["rows"] if r["gallery"] == results["headline_gallery"]]
    clean = next(r for r in headline if r["family"] == "clean")
    occlusion = {r["severity"]: r for r in headline if r["family"] == "occlusion"}
    relative = results["relative"][results["headline_gallery"]]["occlusion"]["mAP_hand"]
    assert occlusion["mean"]["mAP_hand_relative"] == relative
    assert relative == pytest.approx((occlusion[1]["mAP_hand_mean"] + occlusion[5]["mAP_hand_mean"]) / 2
                                     / clean["mAP_hand_mean"])
    # each degraded image corrupted once per family and severity (plus the grid figure's example hand)
    for family in ("gaussian_noise", "occlusion"):
        for severity in (1, 5):
            names = counts[(family, severity)]
            assert len(names) == results["num_degraded_images"] + 1
            assert len(set(names)) == results["num_degraded_images"]
    config = read_json(out / "config.json")
    assert config["args"]["families"] == ["gaussian_noise", "occlusion"] and config["git_commit"]


def captured_scoring(monkeypatch):
    calls = []
    original = evaluation.score_splits

    def spy(encoded, *args, **kwargs):
        calls.append(encoded)
        return original(encoded, *args, **kwargs)
    monkeypatch.setattr(evaluation, "score_splits", spy)
    return calls


@pytest.mark.parametrize("degrade", ["query", "gallery", "both"])
def test_only_the_degraded_side_changes(run_dir, hand_data, tmp_path, monkeypatch, degrade):
    calls = captured_scoring(monkeypatch)
    results = eval_robustness.main(["--run_dir", run_dir, "--test_dir", hand_data, "--out_dir", str(tmp_path / "r"),
                                    "--families", "occlusion", "--severities", "4", "--degrade", degrade, *QUIET])
    clean, degraded = calls
    assert "query_features" not in clean and "gallery_features" not in clean
    sets, rows = clean["sets"], clean["row_of_key"]
    for role in ("query", "gallery"):
        names = [n for n in sets if n.startswith(role)]
        keys = {key for n in names for _, _, key in sets[n]}
        used = degraded.get(f"{role}_features", degraded["features"])[[rows[k] for k in keys]]
        unchanged = np.array_equal(used, clean["features"][[rows[k] for k in keys]])
        assert unchanged == (degrade not in (role, "both")), (role, degrade)
    assert results["degrade"] == degrade


def test_degraded_path_at_severity_zero_gives_the_clean_features(run_dir, hand_data):
    """The uint8 path (decode, corrupt, to_model_input) with nothing corrupted encodes as the evaluators do."""
    args = eval_robustness.parse_args(["--run_dir", run_dir, "--test_dir", hand_data, "--batch_size", "7", *QUIET])
    layout = splits.read_split_layout(hand_data)
    model = eval_robustness.load_model(args, layout)
    rec = model["setting"]["preprocessing"]
    paths = splits.query_gallery_paths(hand_data)[:20]
    clean = evaluation.encode_images(model["encode"], paths, flip=model["setting"]["flip"], preprocessing=rec)
    images = eval_robustness.decode_all(paths, rec, 0)
    degraded = eval_robustness.encode_degraded(model["encode"], images, paths, "jpeg", 0, args, model["setting"])
    np.testing.assert_allclose(degraded, clean, atol=1e-5)


def test_refusals(run_dir, hand_data, tmp_path, tiny_vit_checkpoint):
    base = ["--run_dir", run_dir, "--test_dir", hand_data, *QUIET]
    for bad in (["--severities", "0"], ["--severities", "6"], ["--severities", "2", "2"], ["--families", "fog"],
                ["--backbone_name", tiny_vit_checkpoint], ["--input_size", "32", "32"], ["--f_name", str(tmp_path)]):
        with pytest.raises(SystemExit) as err:
            eval_robustness.main(base + bad)
        assert err.value.code == 2, bad
    out = tmp_path / "r"
    eval_robustness.main(base + ["--out_dir", str(out), "--families", "contrast", "--severities", "1"])
    before = (out / "robustness.json").read_bytes()
    with pytest.raises(SystemExit, match="already holds results; pass --force"):
        eval_robustness.main(base + ["--out_dir", str(out), "--families", "rotation", "--severities", "1"])
    assert (out / "robustness.json").read_bytes() == before
    eval_robustness.main(base + ["--out_dir", str(out), "--families", "rotation", "--severities", "1", "--force"])
    assert read_json(out / "robustness.json")["families"] == ["rotation"]
    with pytest.raises(SystemExit, match="is not a folder"):
        eval_robustness.main(["--run_dir", run_dir, "--test_dir", str(tmp_path / "missing"), *QUIET])
    one = ["--families", "contrast", "--severities", "1", "--force"]
    for out_dir, flag in ((run_dir, "--run_dir"), (hand_data, "--test_dir"), (os.path.join(hand_data, "x"), "--test_dir")):
        with pytest.raises(SystemExit, match=f"--out_dir .* overlaps {flag}"):
            eval_robustness.main(base + ["--out_dir", out_dir, *one])
    assert os.path.isfile(os.path.join(run_dir, "config.json"))
    (out / "my_notes.txt").write_text("mine")  # --force replaces our files, never a user's
    with pytest.raises(SystemExit, match="holds files this program did not write"):
        eval_robustness.main(base + ["--out_dir", str(out), *one])
    assert (out / "my_notes.txt").read_text() == "mine"
    lone = tmp_path / "cfgonly"
    lone.mkdir()
    (lone / "config.json").write_text('{"mine": 1}')  # a user's own config.json, no robustness.json beside it
    with pytest.raises(SystemExit, match="holds files this program did not write"):
        eval_robustness.main(base + ["--out_dir", str(lone), *one])
    assert (lone / "config.json").read_text() == '{"mine": 1}'
