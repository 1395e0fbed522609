"""Image loading, retrieval metrics (parity with the reference vectors), the shared query/gallery
evaluation pipeline, the zero-shot evaluator and the ranking figure."""
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

from utils import errors, splits, data, metrics, evaluation
from conftest import vectors_dir


def vector_cases(name):
    with open(os.path.join(vectors_dir(name), "expected.json")) as f:
        return json.load(f)["cases"]


# ---- metrics parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["count", "bisect"])
@pytest.mark.parametrize("case", vector_cases("metrics"), ids=lambda c: c["file"])
def test_metrics_match_reference_vectors(case, method):
    vec = np.load(os.path.join(vectors_dir("metrics"), case["file"]))
    checks = {
        "market": metrics.rank_metrics(vec["dist"], vec["q_pids"], vec["g_pids"], vec["q_camids"],
                                     vec["g_camids"], max_rank=50, convention="standard", distance=True,
                                     method=method),
        "market_nocam": metrics.rank_metrics(vec["dist"], vec["q_pids"], vec["g_pids"], max_rank=50,
                                           convention="standard", distance=True, method=method),
        "hand": metrics.rank_metrics(vec["sim"], vec["q_pids"], vec["g_pids"], max_rank=50,
                                   convention="hand", method=method),
    }
    for name, got in checks.items():
        np.testing.assert_allclose(got["cmc"], case[f"{name}_cmc"], atol=1e-6, rtol=0, err_msg=name)
        assert abs(got["mAP"] - case[f"{name}_mAP"]) < 1e-6, name


@pytest.mark.parametrize("case", vector_cases("reranking"), ids=lambda c: c["file"])
def test_reranking_matches_reference_vectors(case):
    vec = np.load(os.path.join(vectors_dir("reranking"), case["file"]))
    got = metrics.re_ranking(vec["qf"], vec["gf"], k1=case["k1"], k2=case["k2"], lambda_value=case["lambda"])
    assert got.shape == vec["expected"].shape
    np.testing.assert_allclose(got, vec["expected"], atol=1e-5, rtol=0)


def stable_sort_reference(sim, q, g, convention, max_rank):
    """Per-query loop with a stable descending sort: the semantics the vectorised code must have."""
    aps, cmc, counted = [], np.zeros(max_rank), 0
    for i in range(len(q)):
        hits = np.flatnonzero(g[np.argsort(-sim[i], kind="stable")] == q[i])
        if len(hits) == 0:
            if convention == "hand":
                aps.append(0.0)
                counted += 1
            continue
        counted += 1
        cmc[hits[0]:] += 1
        k = np.arange(1, len(hits) + 1)
        precision = k / (hits + 1)
        before = np.where(hits == 0, 1.0, (k - 1) / np.maximum(hits, 1))
        aps.append(((before + precision) / 2 if convention == "hand" else precision).mean())
    return cmc / counted, float(np.mean(aps))


def test_metrics_with_ties_equal_a_stable_sort_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        num_q, num_g = rng.integers(2, 25), rng.integers(2, 40)
        sim = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float32)  # many ties
        q, g = rng.integers(0, 5, num_q), rng.integers(0, 5, num_g)
        if not np.isin(q, g).any():
            continue
        for convention in ("hand", "standard"):
            want_cmc, want_map = stable_sort_reference(sim, q, g, convention, num_g + 2)
            for method in ("count", "bisect"):
                got = metrics.rank_metrics(sim, q, g, max_rank=num_g + 2, convention=convention, method=method)
                np.testing.assert_allclose(got["cmc"], want_cmc, atol=1e-12)
                assert abs(got["mAP"] - want_map) < 1e-12


def test_metric_conventions_on_a_hand_made_ranking():
    # query 0: true matches at ranks 1 and 3; query 1: no match in the gallery
    sim = np.array([[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]])
    q, g = np.array([1, 5]), np.array([0, 1, 2, 1])
    hand = metrics.rank_metrics(sim, q, g, max_rank=4, convention="hand")
    standard = metrics.rank_metrics(sim, q, g, max_rank=4, convention="standard")
    # trapezoid AP = ((1/1 + 1/2)/2 ... ) : hits at 0-based ranks 1, 3 -> ((0+1/2)/2 + (1/1... see spec
    ap_hand = ((0 / 1 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert hand["mAP"] == pytest.approx(ap_hand / 2)  # the unmatched query counts 0
    assert standard["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # the unmatched query is skipped
    assert hand["cmc"].tolist() == [0, 0.5, 0.5, 0.5]
    assert standard["cmc"].tolist() == [0, 1, 1, 1]
    assert hand["mINP"] == pytest.approx(2 / 4 / 2)
    assert hand["first_rank"].tolist() == [1, -1]
    with pytest.raises(ValueError, match="camera"):
        metrics.rank_metrics(sim, q, g, [0, 0], [1, 1, 1, 1], convention="hand")
    with pytest.raises(ValueError, match="no query has a true match"):
        metrics.rank_metrics(sim, np.array([7, 8]), g, convention="standard")


# ---- image loading ----------------------------------------------------------------------------

def test_load_image_decodes_jpeg_draft_to_the_exact_size(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 600 x 800
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    with Image.open(path) as img:
        img.draft("RGB", (90, 120))
        assert img.size == (200, 150)  # 1/4 scale: the smallest that is still >= 90 x 120
    img = data.load_image(path, (120, 90))
    assert img.mode == "RGB" and img.size == (90, 120)  # (W, H): squashed, not cropped
    with Image.open(path) as full:
        reference = np.asarray(full.convert("RGB").resize((90, 120), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(img, dtype=np.float32) - reference).mean() < 8
    gray = tmp_path / "gray.png"
    Image.fromarray(pixels[..., 0]).save(gray)
    assert data.load_image(gray, (32, 48)).size == (48, 32) and data.load_image(gray).size == (800, 600)


def broken_images(folder):
    good = folder / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    not_image = folder / "not_an_image.jpg"
    not_image.write_bytes(b"this is text, not a JPEG")
    truncated = folder / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    return good, [not_image, truncated, folder / "missing.jpg"]


def test_loader_errors_name_the_file(tmp_path):
    good, broken = broken_images(tmp_path)
    for path in broken:
        with pytest.raises(errors.ImageLoadError, match=str(path.name)):
            data.load_image(path, (32, 32))
    # inside a DataLoader worker process the error still names the file
    dataset = data.ImageListDataset([good, broken[1]], size=(32, 32))
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    try:
        with pytest.raises(errors.ImageLoadError, match="truncated.jpg"):
            next(batches)
    finally:
        batches._shutdown_workers()  # else the worker lingers until garbage collection


# ---- the shared evaluation pipeline on hand-made split folders --------------------------------

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

    def spy(path, size=None):
        loaded[os.path.realpath(path)] += 1
        return real(path, size)

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
                              "--num_workers", "0", "--device", "cpu"])
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
               "--out", str(figure)])
    with Image.open(figure) as img:
        assert img.size[0] > 2 * img.size[1] > 0  # two rows of six panels
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
