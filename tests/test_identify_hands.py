"""identify_hands.py: enrol a gallery, search it, verify a pair, on the identity-folder split of
conftest.folder_split with a tiny trained run and zero-shot tiny CLIP."""
import csv
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import eval_query_gallery_clip_zeroshot
import eval_query_gallery_finetune
import identify_hands
from utils import evaluation, gallery, splits

pytestmark = pytest.mark.usefixtures("single_torch_thread")
QUIET = ["--device", "cpu", "--num_workers", "0"]


def run(command, model, *extra):
    return identify_hands.main([command, *model, *QUIET, *extra])


@pytest.fixture(scope="module")
def evaluated(folder_split, folder_finetune_run, tmp_path_factory):
    """The evaluator's results of the trained run on folder_split, and the run's model flags."""
    out_dir = str(tmp_path_factory.mktemp("folder_eval") / "eval")
    eval_query_gallery_finetune.main(["--test_dir", folder_split, "--f_name", os.path.dirname(folder_finetune_run),
                                      "--m_name", "finetune", "--out_dir", out_dir, *QUIET])
    return {"out_dir": out_dir, "model": ["--run_dir", folder_finetune_run]}


def enrol_and_search(tmp_path, model, folder_split, *enrol_flags):
    g = str(tmp_path / "hands.gallery")
    run("enroll", model, "--images", os.path.join(folder_split, "gallery0"), "--gallery", g, *enrol_flags)
    found = run("search", model, "--gallery", g, "--query", os.path.join(folder_split, "query0"), "--top_k", "100",
                "--out_dir", str(tmp_path / "search"), "--figures", "1")
    return g, found


def check_against_mat(found, mat_path, tolerance):
    """The search ranks every gallery entry as the evaluator's .mat of the split does, with its
    similarities within `tolerance` (orders may differ only between entries closer than that)."""
    mat = evaluation.load_result_mat(mat_path)
    row_of_query = {path: i for i, path in enumerate(mat["query_path"])}
    column_of = {path: j for j, path in enumerate(mat["gallery_path"])}
    assert len(found["queries"]) == len(mat["query_path"]) and found["top_k"] == len(mat["gallery_path"])
    for query in found["queries"]:
        expected = mat["gallery_f"] @ mat["query_f"][row_of_query[query["path"]]]
        got = [column_of[m["path"]] for m in query["matches"]]
        np.testing.assert_allclose([m["similarity"] for m in query["matches"]], expected[got], rtol=0, atol=tolerance)
        if tolerance < 1e-5:
            assert got == list(np.argsort(-expected, kind="stable"))
        else:
            assert np.all(np.diff(expected[got]) <= 2 * tolerance)  # sorted, up to the storage's rounding
        assert [m["identity"] for m in query["matches"]] == [str(mat["gallery_label"][j]) for j in got]


def test_search_of_a_trained_run_equals_the_evaluators_ranking(evaluated, folder_split, tmp_path):
    _, exact = enrol_and_search(tmp_path / "f32", evaluated["model"], folder_split, "--storage", "float32")
    check_against_mat(exact, os.path.join(evaluated["out_dir"], "result_split0.mat"), 1e-6)
    assert exact["settings"]["flip"] is True and exact["settings"]["feature"] == "concat_bn"  # clip-handid's
    _, half = enrol_and_search(tmp_path / "f16", evaluated["model"], folder_split)
    check_against_mat(half, os.path.join(evaluated["out_dir"], "result_split0.mat"), 5e-4)


def test_zero_shot_search_equals_the_zero_shot_evaluator(folder_split, tiny_vit_checkpoint, tmp_path):
    model = ["--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32"]
    eval_query_gallery_clip_zeroshot.main(["--test_dir", folder_split, "--f_name", str(tmp_path / "zs"),
                                           "--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32", *QUIET])
    g, found = enrol_and_search(tmp_path, model, folder_split, "--storage", "float32")
    check_against_mat(found, str(tmp_path / "zs" / "clip_zero_shot" / "tiny_vit" / "hands" / "result_split0.mat"), 1e-6)
    with open(os.path.join(g, gallery.HEADER)) as f:
        header = json.load(f)
    assert header["model"]["kind"] == "zero-shot" and header["model"]["backbone"] == "tiny_vit.pt"
    assert header["settings"]["preprocessing"]["size"] == [32, 32] and header["settings"]["amp"] == "none"


def test_append_of_the_same_folder_adds_nothing(evaluated, folder_split, tmp_path, capsys):
    g = str(tmp_path / "hands.gallery")
    model = evaluated["model"]
    first = run("enroll", model, "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    files = {name: open(os.path.join(g, name), "rb").read() for name in os.listdir(g)}
    again = run("enroll", model, "--images", os.path.join(folder_split, "gallery0"), "--gallery", g, "--append")
    assert again["added"] == 0 and again["skipped"] == first["added"] == first["num_entries"]
    assert {name: open(os.path.join(g, name), "rb").read() for name in os.listdir(g)} == files
    assert "nothing added" in capsys.readouterr().out
    # gallery1 shares the distractors (and hard-linked photos) with gallery0: only new bytes are added
    manifest = splits.read_manifest(folder_split)["sets"]
    new_sources = {s for _, _, s in manifest["gallery1"]} - {s for _, _, s in manifest["gallery0"]}
    more = run("enroll", model, "--images", os.path.join(folder_split, "gallery1"), "--gallery", g, "--append")
    assert more["added"] == len(new_sources) and more["num_entries"] == first["num_entries"] + len(new_sources)
    with open(os.path.join(g, gallery.ENTRIES), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["sha256"] for r in rows}) == len(rows) == more["num_entries"]
    assert len(gallery.Gallery(g).header["history"]) == 2  # the enrolment that added nothing left no record
    with pytest.raises(SystemExit, match="--append .* or --force"):
        run("enroll", model, "--images", os.path.join(folder_split, "gallery1"), "--gallery", g)


def test_gallery_of_another_model_or_settings_is_refused(evaluated, folder_split, tiny_vit_checkpoint, tmp_path):
    g = str(tmp_path / "hands.gallery")
    query = ["--gallery", g, "--query", os.path.join(folder_split, "query0"), "--out_dir", str(tmp_path / "s")]
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    with pytest.raises(SystemExit) as stop:
        run("search", ["--backbone_name", tiny_vit_checkpoint, "--input_size", "32", "32"], *query)
    message = str(stop.value)
    assert "\n" not in message and f"made by run {evaluated['model'][1]}" in message
    assert "not by zero-shot tiny_vit.pt" in message
    with pytest.raises(SystemExit, match="flip: True in the gallery, False now"):
        run("search", evaluated["model"], "--no-flip", *query)
    with pytest.raises(SystemExit, match="other test-time settings"):
        run("enroll", evaluated["model"], "--feature", "proj", "--images", os.path.join(folder_split, "gallery1"),
            "--gallery", g, "--append")
    assert not os.path.exists(tmp_path / "s")


def test_search_outputs_csv_json_figures_and_explanations(evaluated, folder_split, tmp_path):
    g = str(tmp_path / "hands.gallery")
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "test"), "--gallery", g)
    out = tmp_path / "search"
    query = os.path.join(folder_split, "query1")
    found = run("search", evaluated["model"], "--gallery", g, "--query", query, "--top_k", "5", "--out_dir", str(out),
                "--far", "0.05", "--figures", "2", "--explain", "--explain_k", "3", "--num_random", "1")
    threshold = found["threshold"]
    assert threshold["source"] == "gallery" and threshold["measurable"]
    # the gallery holds every test photo: its impostor pairs are all pairs of different people
    labels = gallery.Gallery(g).labels
    assert threshold["num_impostor_pairs"] == sum(a != b for i, a in enumerate(labels) for b in labels[i + 1:])
    table = pd.read_csv(out / "search.csv", dtype={"query_identity": str, "identity": str})
    flat = [(q, m) for q in found["queries"] for m in q["matches"]]
    assert len(table) == len(flat) == 5 * len(found["queries"])
    for (_, row), (q, m) in zip(table.iterrows(), flat):
        assert (row["query_path"], row["gallery_path"], row["identity"], row["rank"]) == (
            q["path"], m["path"], m["identity"], m["rank"])
        assert row["similarity"] == pytest.approx(m["similarity"], abs=1e-6)
        assert row["decision"] == ("match" if m["similarity"] > threshold["threshold"] else "no match")
        assert row["same_identity"] == (m["identity"] == q["identity"])
        assert row["threshold"] == pytest.approx(threshold["threshold"], abs=1e-6)
    with open(out / "search.json") as f:
        assert json.load(f)["queries"] == found["queries"]
    assert sorted(os.listdir(out)) == sorted(["search.csv", "search.json", "ranking_0.png", "ranking_1.png",
                                              "explain_0.png", "explain_0.pdf", "explain_1.png", "explain_1.pdf"])
    assert set(found["queries"][0]["explanation_deletion_auc"]) >= {"map", "random", "reverse"}


def test_threshold_from_an_evaluations_results_json(evaluated, folder_split, tmp_path):
    g = str(tmp_path / "hands.gallery")
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    results_path = os.path.join(evaluated["out_dir"], "results.json")
    found = run("verify", evaluated["model"], *[os.path.join(folder_split, "query0", *p.split("/")[1:]) for p in
                                                 (splits.read_manifest(folder_split)["sets"]["query0"][0][0],
                                                  splits.read_manifest(folder_split)["sets"]["query0"][1][0])],
                "--results", results_path, "--far", "0.1")
    with open(results_path) as f:
        rows = json.load(f)["rows"]
    at = int(np.argmin(np.abs(np.array(rows[0]["roc"]["far"]) - 0.1)))
    expected = np.mean([r["roc"]["threshold"][at] for r in rows])
    assert found["threshold"]["source"] == "results.json" and found["threshold"]["threshold"] == pytest.approx(expected)
    assert found["threshold"]["num_impostor_pairs"] == min(r["num_impostor_pairs"] for r in rows)
    assert found["match"] == (found["similarity"] > expected)
    with pytest.raises(SystemExit, match="not one of the FARs"):
        run("verify", evaluated["model"], *found["photos"], "--results", results_path, "--far", "0.003")
    with pytest.raises(SystemExit, match="other settings.*flip: True there, False now"):
        run("verify", evaluated["model"], *found["photos"], "--results", results_path, "--no-flip", "--far", "0.1")


def test_verify_and_too_few_impostor_pairs(evaluated, folder_split, tmp_path, capsys):
    g = str(tmp_path / "hands.gallery")
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    photos = [r[0] for r in splits.read_manifest(folder_split)["sets"]["query0"][:2]]
    photos = [os.path.join(folder_split, *p.split("/")) for p in photos]
    found = run("verify", evaluated["model"], *photos, "--gallery", g)  # 9 entries: 36 pairs, FAR 1e-3 -> 0.036
    assert found["match"] is None and not found["threshold"]["measurable"]
    assert found["threshold"]["num_impostor_pairs"] == 36
    assert "no decision at FAR 0.001" in capsys.readouterr().out
    features = gallery.Gallery(g)  # the same photo verifies against itself at similarity 1
    same = run("verify", evaluated["model"], photos[0], photos[0])
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5) and same["match"] is None
    assert len(features) == 9


def test_flat_folder_with_labels_csv_and_bad_input(evaluated, folder_split, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    sources = splits.read_manifest(folder_split)["sets"]["gallery0"][:4]
    for k, (relpath, label, _) in enumerate(sources):
        shutil.copy(os.path.join(folder_split, *relpath.split("/")), flat / f"photo{k}.jpg")
    (tmp_path / "labels.csv").write_text("file,identity\n" + "".join(f"photo{k}.jpg,{s[1]}\n" for k, s in
                                                                      enumerate(sources)))
    g = str(tmp_path / "flat.gallery")
    run("enroll", evaluated["model"], "--images", str(flat), "--labels", str(tmp_path / "labels.csv"), "--gallery", g)
    assert gallery.Gallery(g).labels == [s[1] for s in sources]
    (tmp_path / "short.csv").write_text("file,identity\nphoto0.jpg,a\n")
    with pytest.raises(SystemExit, match="3 photo.* have no row in"):
        run("enroll", evaluated["model"], "--images", str(flat), "--labels", str(tmp_path / "short.csv"),
            "--gallery", str(tmp_path / "x.gallery"))
    (flat / "person").mkdir()
    shutil.copy(flat / "photo0.jpg", flat / "person" / "a.jpg")
    with pytest.raises(SystemExit, match="both photos and identity sub-folders"):
        run("enroll", evaluated["model"], "--images", str(flat), "--gallery", str(tmp_path / "y.gallery"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a gallery"):
        run("enroll", evaluated["model"], "--images", str(flat / "person"), "--gallery", str(tmp_path / "notes"),
            "--force")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="is not a gallery"):
        run("search", evaluated["model"], "--gallery", str(tmp_path / "notes"), "--query", str(flat / "photo0.jpg"))


def test_existing_search_is_kept_without_force(evaluated, folder_split, tmp_path):
    g = str(tmp_path / "hands.gallery")
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    query = ["--gallery", g, "--query", os.path.join(folder_split, "query0"), "--out_dir", str(tmp_path / "s"),
             "--figures", "0"]
    run("search", evaluated["model"], *query)
    before = (tmp_path / "s" / "search.csv").read_bytes()
    with pytest.raises(SystemExit, match="already holds results; pass --force"):
        run("search", evaluated["model"], *query, "--top_k", "2")
    assert (tmp_path / "s" / "search.csv").read_bytes() == before
    replaced = run("search", evaluated["model"], *query, "--top_k", "2", "--force")
    assert replaced["top_k"] == 2 and sorted(os.listdir(tmp_path / "s")) == ["search.csv", "search.json"]
    assert sorted(os.listdir(tmp_path)) == ["hands.gallery", "s"]  # no lock or staging folder left


def test_force_never_replaces_what_is_not_ours(evaluated, folder_split, tmp_path, capsys):
    """--force replaces an earlier search or gallery, never a user's files, the gallery, the photos or the run."""
    g = str(tmp_path / "hands.gallery")
    run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery0"), "--gallery", g)
    mine = tmp_path / "hands.gallery" / "my_notes.txt"
    mine.write_text("mine")
    with pytest.raises(SystemExit, match="holds files this program did not write .*my_notes.txt"):
        run("enroll", evaluated["model"], "--images", os.path.join(folder_split, "gallery1"), "--gallery", g, "--append")
    assert mine.read_text() == "mine"
    mine.unlink()
    queries = os.path.join(folder_split, "query0")
    for out_dir, flag in ((g, "--gallery"), (queries, "--query"), (evaluated["model"][1], "--run_dir"),
                          (os.path.join(queries, "results"), "--query")):
        with pytest.raises(SystemExit, match=f"--out_dir .* overlaps {flag}"):
            run("search", evaluated["model"], "--gallery", g, "--query", queries, "--out_dir", out_dir, "--force")
    assert gallery.is_gallery(g) and os.listdir(queries)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("mine")
    with pytest.raises(SystemExit, match="holds files this program did not write"):
        run("search", evaluated["model"], "--gallery", g, "--query", queries, "--out_dir", str(thesis), "--force")
    assert (thesis / "thesis.tex").read_text() == "mine"
    with pytest.raises(SystemExit, match="--storage float32: .* stores float16"):
        run("enroll", evaluated["model"], "--images", queries, "--gallery", g, "--append", "--storage", "float32")
    for extra, message in ((["--stride", "4"], "--stride is for zero-shot CLIP"),
                           (["--explain", "--figures", "0"], "--explain draws the maps")):
        with pytest.raises(SystemExit):
            run("search", evaluated["model"], "--gallery", g, "--query", queries, *extra)
        assert message in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("file,identity\nphoto0.jpg,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="is not UTF-8 text"):
        run("enroll", evaluated["model"], "--images", queries, "--labels", str(latin), "--gallery", str(tmp_path / "z"))
