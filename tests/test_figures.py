"""Paper-ready figures: the ranking figure's captions, title and --pdf; the training curves' panels."""
import json

import numpy as np
import pytest
from PIL import Image

import query_ranking_result_demo as ranking
from utils import io, runs


@pytest.fixture
def result_mat(tmp_path):
    """A result_split1_all.mat over six small images (identities 0, 1, 2 twice) with results.json and
    config.json next to it, as the evaluators write them."""
    paths = []
    for i in range(6):
        path = tmp_path / "images" / f"Hand_{i:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 100, 200 - 30 * i)).save(path)
        paths.append(str(path))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    folder = tmp_path / "eval"
    folder.mkdir()
    io.atomic_savemat(str(folder / "result_split1_all.mat"), {
        "query_f": features[:2], "query_label": np.array([0, 1]), "query_path": np.array(paths[:2], dtype=object),
        "gallery_f": features[2:], "gallery_label": np.array([0, 1, 2, 2]),
        "gallery_path": np.array(paths[2:], dtype=object)})
    (folder / "results.json").write_text(json.dumps({"method": "CLIP zero-shot (ViT-B/16)", "backbone": "ViT-B/16"}))
    (folder / "config.json").write_text(json.dumps({"method": "ignored: results.json wins"}))
    return folder / "result_split1_all.mat", features


def test_ranking_figure_title_scores_and_pdf(result_mat, tmp_path):
    mat, features = result_mat
    assert ranking.default_title(str(mat)) == ("CLIP zero-shot (ViT-B/16), backbone ViT-B/16, split 1, "
                                               "gallery all (with distractors)")
    from utils import evaluation
    order, is_match, scores = ranking.rank_gallery(evaluation.load_result_mat(str(mat)), 1)
    expected = features[2:] @ features[1]
    np.testing.assert_allclose(scores, np.sort(expected)[::-1], rtol=1e-6)
    assert list(is_match) == list(np.array([0, 1, 2, 2])[order] == 1)
    png = tmp_path / "fig" / "ranking.png"
    assert ranking.main(["--mat", str(mat), "--num_queries", "2", "--top_k", "3", "--out", str(png)]) == [str(png)]
    assert png.stat().st_size > 0 and not (tmp_path / "fig" / "ranking.pdf").exists()
    paths = ranking.main(["--mat", str(mat), "--top_k", "3", "--out", str(png), "--pdf", "--force"])
    assert (tmp_path / "fig" / "ranking.pdf").read_bytes().startswith(b"%PDF") and len(paths) == 2


def test_training_curve_panels(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"method": "clipreid", "model": {"backbone": {"name": "ViT-B/16"}}}))
    stage1 = [{"epoch": e, "lr": 1e-4, "loss": 2.0 / e, "loss_i2t": 1.0 / e, "loss_t2i": 1.0 / e,
               "train_acc": 0.1 * e if e % 2 == 0 else None} for e in range(1, 5)]
    runs.plot_training_curve(str(tmp_path / "stage1_curve.png"), stage1)
    stage2 = [dict(row, val_rank1=0.5, val_mAP=0.4) for row in stage1]
    runs.plot_training_curve(str(tmp_path / "training_curve.png"), stage2)
    with Image.open(tmp_path / "stage1_curve.png") as a, Image.open(tmp_path / "training_curve.png") as b:
        assert a.size[0] * 4 == b.size[0] * 3  # no validation panel without val values: 3 panels, not 4

