"""utils/evaluation.py: the shared query/gallery evaluation (encode -> score -> summarise -> write) on
hand-made split folders, the zero-shot evaluator end to end and the ranking figure it feeds."""
import collections
import csv
import json
import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from utils import errors, splits, data, metrics, evaluation, figures


COLOURS = {"0001": (220, 30, 30), "0002": (30, 200, 40), "0003": (40, 60, 230), "0004": (230, 220, 40),
           "9001": (200, 40, 200), "9002": (30, 210, 210)}


def save_photo(path, colour, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 12, (24, 32, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_split_root(root, num_splits=2, with_all=True, per_id=3):
    """<root>/query{i}|gallery{i}|gallery{i}_all/<id>/<file>, files copied (no manifest), so every
    image appears in several sets. Returns the number of distinct images."""
    ids, distractors = ["0001", "0002", "0003", "0004"], ["9001", "9002"]
    for ident in ids + distractors:
        for k in range(per_id):
            save_photo(os.path.join(root, "test", ident, f"img_{ident}_{k}.png"), COLOURS[ident], int(ident) * 10 + k)
    for i in range(num_splits):
        for ident in ids + distractors:
            files = sorted(os.listdir(os.path.join(root, "test", ident)))
            for k, file in enumerate(files):
                source = os.path.join(root, "test", ident, file)
                in_gallery = k == i % per_id
                sets = []
                if ident in ids:
                    sets = [f"gallery{i}"] + ([f"gallery{i}_all"] if with_all else []) if in_gallery else [f"query{i}"]
                elif with_all and in_gallery:
                    sets = [f"gallery{i}_all"]
                for name in sets:
                    os.makedirs(os.path.join(root, name, ident), exist_ok=True)
                    shutil.copy(source, os.path.join(root, name, ident, file))
    return len(ids) * per_id + (len(distractors) * min(num_splits, per_id) if with_all else 0)


def colour_encoder(calls):
    def encode(images):
        calls.append(len(images))
        return images.mean(dim=(2, 3))
    return encode


def counting_loader(monkeypatch):
    loaded = collections.Counter()
    real = data.load_image

    def spy(path, size=None, *args, **kwargs):
        loaded[os.path.realpath(path)] += 1
        return real(path, size, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", spy)
    return loaded


def test_pipeline_11k_style_encodes_each_image_once_and_writes_results(tmp_path, monkeypatch, capsys):
    root = tmp_path / "split"
    num_images = make_split_root(str(root), num_splits=3)
    loaded, calls = counting_loader(monkeypatch), []
    out = tmp_path / "out"
    results = evaluation.evaluate_query_gallery(colour_encoder(calls), str(root), str(out), input_size=(16, 16),
                                                batch_size=5, method_name="colour")
    # every distinct image (copies in several sets share label/file/size) is decoded and encoded once
    assert sum(calls) == num_images == len(loaded) == results["num_images_encoded"]
    assert set(loaded.values()) == {1}
    assert results["gallery_variants"] == ["own", "all"]
    assert [(r["split"], r["gallery"]) for r in results["rows"]] == [(i, v) for i in range(3) for v in ("own", "all")]
    for row in results["rows"]:
        assert row["rank1"] == 1.0 and row["mAP_hand"] == 1.0 and row["mINP"] == 1.0
        assert row["num_query"] == 8 and row["num_gallery"] == (4 if row["gallery"] == "own" else 6)
    assert set(os.listdir(out)) == {"results.json", "results.csv"} | {
        f"result_split{i}{s}.mat" for i in range(3) for s in ("", "_all")}

    raw = scipy.io.loadmat(str(out / "result_split1_all.mat"))
    assert raw["query_f"].shape == (8, 3) and raw["query_f"].dtype == np.float32
    assert raw["gallery_label"].shape == (1, 6) and raw["query_label"].dtype == np.int64
    mat = evaluation.load_result_mat(str(out / "result_split1_all.mat"))
    assert sorted(set(mat["gallery_label"].tolist())) == [1, 2, 3, 4, 9001, 9002]
    for feats, labels, paths in ((mat["query_f"], mat["query_label"], mat["query_path"]),
                                 (mat["gallery_f"], mat["gallery_label"], mat["gallery_path"])):
        for f, label, path in zip(feats, labels, paths):
            assert os.path.isabs(path)
            assert (os.sep + "gallery1_all" + os.sep in path) or (os.sep + "query1" + os.sep in path)
            assert int(os.path.basename(os.path.dirname(path))) == label
            x = data.eval_transform((16, 16))(data.load_image(path, (16, 16))).mean(dim=(1, 2))
            np.testing.assert_allclose(f, torch.nn.functional.normalize(x, dim=0).numpy(), atol=1e-5)

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["0", "0", "1", "1", "2", "2", "mean", "std", "mean", "std"]
    assert set(metrics.METRIC_NAMES) <= set(rows[0])
    printed = capsys.readouterr().out
    for name in ("Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP", "mAP (standard)", "mINP", "100.00 ± 0.00"):
        assert name in printed
    with pytest.raises(FileExistsError, match="--force"):
        evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(out), input_size=(16, 16))


def test_pipeline_flip_encodes_mirrors_too(tmp_path):
    root = tmp_path / "split"
    num_images = make_split_root(str(root), num_splits=1, with_all=False)
    calls = []
    results = evaluation.evaluate_query_gallery(colour_encoder(calls), str(root), str(tmp_path / "out"),
                                                input_size=(16, 16), flip=True, verbose=False)
    assert sum(calls) == 2 * num_images and results["flip"] is True


def test_pipeline_hd_style_has_only_the_own_gallery(tmp_path):
    root = tmp_path / "split"
    make_split_root(str(root), num_splits=2, with_all=False)
    layout = splits.read_split_layout(str(root))
    assert layout["num_splits"] == 2 and layout["gallery_variants"] == ["own"]
    results = evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out"),
                                                gallery="both", input_size=(16, 16), verbose=False)
    assert results["gallery_variants"] == ["own"] and len(results["rows"]) == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["result_split0.mat", "result_split1.mat", "results.csv",
                                                    "results.json"]
    with pytest.raises(ValueError, match="--gallery own"):
        evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out2"), gallery="all")
    # with re-ranking the ranking (and the .mat) use the re-ranked distance of the stored features
    rerank = {"k1": 4, "k2": 2, "lambda_value": 0.3}
    results = evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out3"),
                                                input_size=(16, 16), rerank=rerank, verbose=False)
    mat = evaluation.load_result_mat(str(tmp_path / "out3" / "result_split1.mat"))
    np.testing.assert_allclose(mat["rerank_dist"], metrics.re_ranking(mat["query_f"], mat["gallery_f"], **rerank))
    assert results["rerank"] == rerank and results["rows"][1]["rank1"] == 1.0
    with pytest.raises(ValueError, match="query0"):
        splits.read_split_layout(str(root / "query0"))


def test_a_new_metric_needs_only_metric_names(tmp_path, monkeypatch, capsys):
    # a metric computed by query_gallery_metrics and named in METRIC_NAMES reaches results.json (rows and
    # summary), results.csv and the printed tables without touching the evaluation code
    real = metrics.query_gallery_metrics

    def with_gap(sim, q_labels, g_labels, max_rank=50):
        top2 = np.sort(sim, axis=1)[:, -2:]
        return {**real(sim, q_labels, g_labels, max_rank), "top_gap": float((top2[:, 1] - top2[:, 0]).mean())}

    monkeypatch.setattr(metrics, "query_gallery_metrics", with_gap)
    monkeypatch.setattr(metrics, "METRIC_NAMES", metrics.METRIC_NAMES + ("top_gap",))
    root = tmp_path / "split"
    make_split_root(str(root), num_splits=2, with_all=False)
    results = evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out"),
                                                input_size=(16, 16))
    gaps = [r["top_gap"] for r in results["rows"]]
    assert 0 < min(gaps) and results["summary"]["own"]["mean"]["top_gap"] == pytest.approx(np.mean(gaps))
    assert results["metrics"][len(metrics.METRIC_NAMES) - 1] == "top_gap"
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[len(metrics.METRIC_NAMES) + 3] == "top_gap" and float(rows[-2]["top_gap"]) == pytest.approx(np.mean(gaps), abs=1e-6)
    assert f"{100 * np.mean(gaps):.2f} ± {100 * np.std(gaps):.2f}" in capsys.readouterr().out


def test_the_steps_score_each_split_against_its_own_gallery(tmp_path):
    root = tmp_path / "split"
    make_split_root(str(root), num_splits=2)
    encoded = evaluation.encode_split_images(colour_encoder([]), str(root), 2, ["own", "all"], size=(16, 16))
    assert len(encoded["paths"]) == len(set(encoded["paths"])) == encoded["features"].shape[0]
    np.testing.assert_allclose(np.linalg.norm(encoded["features"], axis=1), 1, atol=1e-6)
    rows, mats = evaluation.score_splits(encoded, 2, ["own", "all"], max_rank=5)
    assert sorted(mats) == ["result_split0.mat", "result_split0_all.mat", "result_split1.mat", "result_split1_all.mat"]
    for row in rows:
        mat = mats[splits.result_mat_name(row["split"], row["gallery"])]
        assert len(mat["gallery_label"]) == row["num_gallery"] and len(row["cmc"]) == 5
        expected = metrics.query_gallery_metrics(mat["query_f"] @ mat["gallery_f"].T, mat["query_label"],
                                                 mat["gallery_label"], max_rank=5)
        assert {k: row[k] for k in metrics.METRIC_NAMES} == {k: expected[k] for k in metrics.METRIC_NAMES}
    summary = evaluation.summarise(rows, ["own", "all"])
    own = [r["mAP_standard"] for r in rows if r["gallery"] == "own"]
    assert summary["own"]["mean"]["mAP_standard"] == np.mean(own)
    assert summary["own"]["std"]["mAP_standard"] == np.std(own)
    with pytest.raises(errors.EvaluationInputError, match="--gallery own"):
        evaluation.wanted_gallery_variants({"gallery_variants": ["own"]}, "all", "HD")


# ---- zero-shot evaluator and ranking figure (synthetic 11k, tiny OpenAI-format checkpoint) --------

def test_zero_shot_end_to_end_and_ranking_figure(synthetic_11k, tiny_vit_checkpoint, tmp_path, monkeypatch):
    import eval_query_gallery_clip_zeroshot as zero_shot
    import query_ranking_result_demo as demo
    test_dir = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    with open(os.path.join(test_dir, "splits.json")) as f:
        manifest = json.load(f)
    sources = {row[2] for name, rows in manifest["sets"].items() if name.startswith(("query", "gallery"))
               for row in rows}
    loaded = counting_loader(monkeypatch)
    results = zero_shot.main(["--test_dir", test_dir, "--f_name", str(tmp_path / "runs"), "--backbone_name",
                              tiny_vit_checkpoint, "--pretrained", "false", "--input_size", "64", "48",
                              "--num_workers", "0", "--device", "cpu", "--gallery", "both"])
    out_dir = tmp_path / "runs" / "clip_zero_shot" / "tiny_vit" / "dorsal_r"
    # each image is decoded twice: once by the pre-flight check, once to encode it
    assert results["num_images_encoded"] == len(sources) == len(loaded) and set(loaded.values()) == {2}
    assert results["gallery_variants"] == ["own", "all"] and results["num_splits"] == 3
    assert results["feature_dim"] == 32
    with open(out_dir / "config.json") as f:
        config = json.load(f)
    assert config["pretrained"] is False and config["args"]["input_size"] == [64, 48]
    assert zero_shot.backbone_folder_name("ViT-B/16") == "ViT-B-16"
    with pytest.raises(SystemExit, match="--force"):
        zero_shot.main(["--test_dir", test_dir, "--f_name", str(tmp_path / "runs"), "--backbone_name",
                        tiny_vit_checkpoint])

    figure = tmp_path / "fig" / "ranking.png"
    demo.main(["--mat", str(out_dir / "result_split2_all.mat"), "--query_index", "0", "3", "--top_k", "5",
               "--out", str(figure), "--pdf"])
    with Image.open(figure) as img:  # double-column width, two rows of six panels
        assert img.size[0] == 7 * figures.PNG_DPI and img.size[0] > img.size[1] > img.size[0] / 3
    assert (tmp_path / "fig" / "ranking.pdf").stat().st_size > 1000
    with pytest.raises(SystemExit, match="--force"):
        demo.main(["--mat", str(out_dir / "result_split2_all.mat"), "--out", str(figure)])
    demo.main(["--mat", str(out_dir / "result_split2_all.mat"), "--out", str(figure), "--force"])
    num_queries = results["rows"][0]["num_query"]
    with pytest.raises(SystemExit, match=f"out of range.*valid indices 0..{num_queries - 1}"):
        demo.main(["--mat", str(out_dir / "result_split0.mat"), "--query_index", str(num_queries),
                   "--out", str(tmp_path / "bad.png")])
    with pytest.raises(SystemExit, match="does not exist"):
        demo.main(["--mat", str(tmp_path / "nothing.mat"), "--out", str(tmp_path / "bad.png")])


def test_ranking_figure_reports_missing_images(tmp_path):
    import query_ranking_result_demo as demo
    root = tmp_path / "split"
    make_split_root(str(root), num_splits=1, with_all=False)
    evaluation.evaluate_query_gallery(colour_encoder([]), str(root), str(tmp_path / "out"), input_size=(16, 16),
                                      verbose=False)
    shutil.rmtree(root / "gallery0" / "0002")
    with pytest.raises(SystemExit, match="cannot be read: image file not found: .*gallery0.0002.*--image_root"):
        demo.main(["--mat", str(tmp_path / "out" / "result_split0.mat"), "--num_queries", "8",
                   "--out", str(tmp_path / "fig.png")])
