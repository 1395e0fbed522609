"""Paper-ready figures: the ranking figure's captions, title and --pdf; the training curves' panels."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import explain_matches
import query_ranking_result_demo as ranking
from utils import figures, io, runs, splits


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
    title = ranking.default_title(str(mat))
    assert title == "Zero-shot ViT-B/16, split 1, gallery with distractors"
    words = title.replace(",", "").split()
    assert len(words) == len(set(words))  # no word twice (the backbone was named twice)
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
    fig = runs.plot_training_curve(str(tmp_path / "curve.png"), stage2, return_figure=True)
    assert not figures.overlapping_legends(fig)  # every legend below its panel
    assert min(text_sizes(fig)) >= figures.FONT_SIZE



def text_sizes(fig):
    fig.canvas.draw()
    return [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
            if t.get_text().strip() and t.get_visible()]


def test_ranking_names_distractors_by_aspect_and_original_id(result_mat):
    """A distractor of gallery{i}_all is shown by its aspect and original id (the manifest's offsets),
    an HD distractor by its folder; similarities with two decimals; every text at least 8 pt."""
    offsets = {"distractor_offsets": {"dorsal left": 11_000_000, "palmar right": 21_000_000, "palmar left": 31_000_000}}
    assert ranking.identity_caption(1045, offsets) == "id 1045"
    assert ranking.identity_caption(11_001_045, offsets) == "dorsal left\nid 1045"
    assert ranking.identity_caption(31_000_007, offsets) == "palmar left\nid 7"
    assert ranking.identity_caption(1560, {"distractor_offsets": {"502-712": 1000}}) == "HD 502-712\nid 560"
    assert splits.distractor_origin(1045, None) is None
    from utils import evaluation
    mat, _ = result_mat
    result = evaluation.load_result_mat(str(mat))
    result["gallery_label"] = np.array([0, 1, 21_000_002, 21_000_002])
    rows = ranking.ranking_rows(result, [0, 1], 4, {"distractor_offsets": {"palmar right": 21_000_000}})
    captions = [caption for _, caption, _ in rows[0]["matches"]]
    assert sum(c.startswith("palmar right\nid 2\nsim ") for c in captions) == 2
    assert all(re.search(r"\nsim -?\d\.\d\d$", c) for c in captions)  # two decimals, e.g. 0.87
    fig = ranking.ranking_figure(rows, "title")
    assert fig.get_figwidth() == figures.DOUBLE_COLUMN and min(text_sizes(fig)) >= figures.FONT_SIZE
    assert figures.overlapping_legends(fig) == []
    figures.pyplot().close(fig)


def test_explanation_figure_has_a_colour_bar_and_a_border_legend(result_mat, tmp_path, monkeypatch):
    mat, _ = result_mat
    from utils import evaluation
    result = evaluation.load_result_mat(str(mat))
    rng = np.random.default_rng(0)
    rows = [{"query": q, "label": result["query_label"][q], "path": result["query_path"][q],
             "deletion": {"auc": {"map": 0.4, "random": 0.5, "reverse": 0.6}},
             "panels": [{"path": p, "map": rng.random((8, 8)), "title": t, "color": c, "caption": "id 1\ncos 0.50"}
                        for p, t, c in [(result["query_path"][q], "query", figures.QUERY),
                                        (result["gallery_path"][0], "rank 1", figures.SAME_IDENTITY),
                                        (result["gallery_path"][1], "rank 2", figures.OTHER_IDENTITY)]]}
            for q in range(2)]
    kept = {}

    def keep(fig, prefix, formats=("pdf", "png")):
        kept["fig"] = fig
        return [f"{prefix}.{ext}" for ext in formats]

    monkeypatch.setattr(figures, "save", keep)
    explain_matches.draw_figure(rows, 2, str(tmp_path / "explain.png"))
    fig = kept["fig"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "relevance" in bars[0].get_xlabel()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in legends[0].get_texts()] == ["query", "same identity", "another identity"]
    assert figures.overlapping_legends(fig) == [(legends[0], legends[0].axes)]  # only its own empty axes
    assert min(text_sizes(fig)) >= figures.FONT_SIZE and fig.get_figwidth() == figures.DOUBLE_COLUMN
    figures.pyplot().close(fig)


def test_ranking_captions_never_run_into_each_other(tmp_path):
    photo = tmp_path / "hand.png"
    Image.new("RGB", (40, 30), (200, 150, 120)).save(photo)
    for name in ("id person_000", "id 1039"):  # identify_hands' folder names; the benchmark's numbers
        rows = [{"title": "query", "query": (str(photo), "id unknown"),
                 "matches": [(str(photo), f"{name}\nsim 0.91", figures.OTHER_IDENTITY) for _ in range(10)]}]
        fig = ranking.ranking_figure(rows, "a ranking")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [ax.xaxis.label.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
        assert len(boxes) == 11
        inside = fig.bbox
        assert all(b.x0 >= inside.x0 and b.x1 <= inside.x1 for b in boxes)  # nothing cut off at the edges
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


LONG_NAMES = ["train_val_test_split_dorsal_r (split seed 0, split root 1 of 2)",
              "train_val_test_split_dorsal_r (split seed 0, split root 2 of 2)",
              "my_own_hand_collection_photographed_in_2024 (split seed 1)"]


def clashes(fig):
    """Pairs of titles / tick labels whose boxes overlap, and texts reaching outside the figure, by
    matplotlib's window extents after drawing."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    def shown(axis):  # the tick labels inside the axis limits (matplotlib keeps one more each side, not drawn)
        low, high = sorted(axis.get_view_interval())
        return [t for t, at in zip(axis.get_ticklabels(), axis.get_ticklocs()) if low - 1e-9 <= at <= high + 1e-9]
    texts = [t for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"
             for t in [ax.title, *shown(ax.xaxis), *shown(ax.yaxis)] if t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    found = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]
    frame = fig.bbox
    labels = [(t.get_text(), t.get_window_extent(renderer)) for ax in fig.axes if ax.get_visible()
              for t in [ax.xaxis.label, ax.yaxis.label] if t.get_text()]
    legends = [(t.get_text(), t.get_window_extent(renderer)) for legend in fig.legends for t in legend.get_texts()]
    found += [(text, "outside") for text, box in boxes + labels + legends
              if box.x0 < frame.x0 - 0.5 or box.x1 > frame.x1 + 0.5 or box.y0 < frame.y0 - 0.5 or box.y1 > frame.y1 + 0.5]
    return found


def test_long_test_set_names_wrap_inside_their_panels(tmp_path):
    """table_cmc.png: panel titles ran into each other and off both edges; table_matrix.png: heat maps
    shrank to slivers under column labels piled on each other."""
    curves = [{"panel": name, "label": f"{method} ViT-B/16", "method": method, "backbone": "ViT-B/16",
               "x": list(range(1, 21)), "y": sorted(np.linspace(20 + i, 90, 20))}
              for i, name in enumerate(LONG_NAMES) for method in ("Zero-shot", "Fine-tuned")]
    cmc = figures.curve_figure(curves, "rank", "identification rate (%)", xlim=(0.5, 20.5), integer_x=True)
    assert clashes(cmc) == [] and figures.overlapping_legends(cmc) == []
    figures.save(cmc, str(tmp_path / "cmc"))
    matrices = [{"title": f"{method} ViT-B/16", "rows": ["none (zero-shot)", *LONG_NAMES[:2]], "columns": LONG_NAMES,
                 "values": [[40.0, 50.0, None], [70.0, 20.0, 30.0], [65.0, 75.0, 10.0]]}
                for method in ("Fine-tuned", "CLIP-ReID")]
    matrix = figures.matrix_figure(matrices, "Rank-1")
    assert clashes(matrix) == []
    matrix.canvas.draw()
    for ax in matrix.axes[:2]:  # each heat map keeps a usable size
        box = ax.get_window_extent(matrix.canvas.get_renderer())
        assert box.width / matrix.dpi > 1.2 and box.height / matrix.dpi > 0.8
    figures.save(matrix, str(tmp_path / "matrix"))
