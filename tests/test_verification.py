"""Verification metrics (utils/verification.py) against a straightforward computation written here, and
on scores whose answer is known."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from utils import evaluation, splits, verification
from conftest import REPO


def reference_metrics(scores, q_labels, g_labels, fars):
    """Every pair in a flat list, the threshold swept over every distinct score, AUC by comparing every
    genuine pair with every impostor pair."""
    same = [[q == g for g in g_labels] for q in q_labels]
    genuine = np.array([scores[i][j] for i in range(len(q_labels)) for j in range(len(g_labels)) if same[i][j]])
    impostor = np.array([scores[i][j] for i in range(len(q_labels)) for j in range(len(g_labels)) if not same[i][j]])
    thresholds = sorted(set(genuine.tolist()) | set(impostor.tolist()), reverse=True)
    points = [(0.0, 1.0)]  # (FAR, FRR), nothing accepted
    for t in thresholds:
        points.append(((impostor >= t).sum() / len(impostor), 1 - (genuine >= t).sum() / len(genuine)))
    points.append((1.0, 0.0))
    for (far0, frr0), (far1, frr1) in zip(points, points[1:]):
        if far1 - frr1 >= 0:  # the first point on or past the line FAR = FRR
            alpha = (frr0 - far0) / ((far1 - frr1) - (far0 - frr0))
            eer = far0 + alpha * (far1 - far0)
            break
    wins = sum(1.0 if g > i else 0.5 if g == i else 0.0 for g in genuine for i in impostor)
    auc = wins / (len(genuine) * len(impostor))
    tars = []
    for far in fars:
        best = 0.0
        for t in thresholds + [np.inf]:
            if (impostor >= t).sum() <= far * len(impostor) * (1 + 1e-12):
                best = max(best, (genuine >= t).sum() / len(genuine))
        tars.append(best)
    return eer, auc, tars


def assert_results_match_reference(results, out_dir):
    """Every split's verification numbers in results.json against the reference computation on the
    scores the evaluator ranked by (recomputed from the .mat files it wrote)."""
    for row in results["rows"]:
        mat = evaluation.load_result_mat(os.path.join(out_dir, splits.result_mat_name(row["split"], row["gallery"])))
        if mat["rerank_dist"] is not None:
            scores = -mat["rerank_dist"]
        else:
            scores = np.ascontiguousarray(mat["query_f"]) @ np.ascontiguousarray(mat["gallery_f"]).T
        eer, auc, tars = reference_metrics(scores, mat["query_label"], mat["gallery_label"], verification.FAR_TARGETS)
        assert abs(row["EER"] - eer) < 1e-9 and abs(row["AUC"] - auc) < 1e-9
        impostors = row["num_impostor_pairs"]
        for far, tar in zip(verification.FAR_TARGETS, tars):
            got = row[verification.far_name(far)]
            assert got is None if far * impostors < 10 else abs(got - tar) < 1e-9
    summary = results["summary"][results["gallery_variants"][0]]
    eers = [r["EER"] for r in results["rows"] if r["gallery"] == results["gallery_variants"][0]]
    assert summary["mean"]["EER"] == pytest.approx(np.mean(eers), abs=1e-12)
    with open(os.path.join(out_dir, "results.csv")) as f:
        records = list(csv.DictReader(f))
    assert float(records[0]["EER"]) == pytest.approx(results["rows"][0]["EER"], abs=1e-6)
    assert records[0]["TAR@1e-4"] == ""  # far too few impostor pairs in these small data sets


@pytest.mark.parametrize("seed,rounded", [(0, False), (1, False), (2, True), (3, True)])
def test_matches_a_straightforward_computation_on_random_scores(seed, rounded):
    rng = np.random.default_rng(seed)
    q_labels = rng.integers(0, 8, 25)
    g_labels = rng.integers(0, 8, 30)
    scores = rng.normal(size=(25, 30)) + 1.0 * (q_labels[:, None] == g_labels[None, :])
    if rounded:  # many ties, between genuine and impostor pairs too
        scores = np.round(scores, 1)
    fars = [0.3, 0.1, 0.05, 0.01]
    eer, auc, tars = reference_metrics(scores, q_labels, g_labels, fars)
    got = verification.verification_metrics(scores, q_labels, g_labels, far_targets=fars, min_false_accepts=1)
    assert abs(got["EER"] - eer) < 1e-9 and abs(got["AUC"] - auc) < 1e-9
    for far, tar in zip(fars, tars):
        assert abs(got[verification.far_name(far)] - tar) < 1e-9, far
    assert got["num_genuine_pairs"] + got["num_impostor_pairs"] == 25 * 30
    assert 0.05 < eer < 0.6 and auc > 0.5  # the test cases are neither trivial nor degenerate


def test_known_answers():
    labels = np.arange(4)
    perfect = np.where(labels[:, None] == labels[None, :], 1.0, 0.0)
    got = verification.verification_metrics(perfect, labels, labels, min_false_accepts=1)
    assert got["EER"] == 0.0 and got["AUC"] == 1.0 and got["TAR@1e-1"] == 1.0
    got = verification.verification_metrics(-perfect, labels, labels, min_false_accepts=1)
    assert got["EER"] == 1.0 and got["AUC"] == 0.0 and got["TAR@1e-1"] == 0.0
    got = verification.verification_metrics(np.zeros((4, 4)), labels, labels, min_false_accepts=1)
    assert got["EER"] == 0.5 and got["AUC"] == 0.5  # one big tie: the diagonal


def test_hand_computed_case():
    # one query of identity 0 against gallery identities [0, 1, 0, 1, 1], scores [.9, .8, .7, .6, .5]:
    # genuine {.9, .7}, impostor {.8, .6, .5}. Points (FAR, FRR) by descending threshold:
    # (0, 1) -> .9: (0, 1/2) -> .8: (1/3, 1/2) -> .7: (1/3, 0) ... The segment (1/3, 1/2) -> (1/3, 0)
    # crosses FAR = FRR at 1/3. AUC: .9 beats 3 impostors, .7 beats 2: 5/6.
    got = verification.verification_metrics(np.array([[.9, .8, .7, .6, .5]]), ["0"], ["0", "1", "0", "1", "1"],
                                            far_targets=[0.0, 0.34, 0.5], min_false_accepts=0)
    assert abs(got["EER"] - 1 / 3) < 1e-12 and abs(got["AUC"] - 5 / 6) < 1e-12
    assert got["TAR@0e+00"] == 0.5 and got["TAR@3e-1"] == 1.0 and got["TAR@5e-1"] == 1.0


def test_tar_not_reported_without_enough_impostors():
    rng = np.random.default_rng(0)
    labels = np.arange(50)  # 50 x 49 = 2,450 impostor pairs: 1e-3 would allow 2.45 false accepts
    got = verification.verification_metrics(rng.normal(size=(50, 50)), labels, labels)
    assert got["TAR@1e-1"] is not None and got["TAR@1e-2"] is not None
    assert got["TAR@1e-3"] is None and got["TAR@1e-4"] is None
    far, tar = np.array(got["roc"]["far"]), got["roc"]["tar"]
    assert all((t is None) == (f * 2450 < 1) for f, t in zip(far, tar))
    known = [t for t in tar if t is not None]
    assert known == sorted(known) and known[-1] == 1.0
    assert verification.mean_std_or_none([0.5, None]) == (None, None)
    mean = verification.mean_roc([{"far": [0.1, 1.0], "tar": [None, 1.0]}, {"far": [0.1, 1.0], "tar": [0.2, 0.5]}])
    assert mean["tar"] == [None, 0.75]


def test_importable_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from utils import verification; print(verification.VERIFICATION_NAMES)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "TAR@1e-3" in out.stdout


def test_both_evaluators_report_the_reference_numbers(synthetic_11k, tiny_vit_checkpoint, tmp_path, capsys):
    import eval_query_gallery_clip_zeroshot as zero_shot
    import eval_query_gallery_finetune as finetuned
    import train_finetune
    test_dir = os.path.join(synthetic_11k, "train_val_test_split_dorsal_r")
    common = ["--input_size", "64", "64", "--num_workers", "0", "--device", "cpu"]
    results = zero_shot.main(["--test_dir", test_dir, "--f_name", str(tmp_path), "--backbone_name",
                              tiny_vit_checkpoint, *common])
    assert_results_match_reference(results, str(tmp_path / "clip_zero_shot" / "tiny_vit" / "dorsal_r"))
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "TAR@FAR=1e-3" in printed and "n/a" in printed
    train_finetune.main(["--data_dir", test_dir, "--f_name", str(tmp_path), "--m_name", "ft", "--backbone_name",
                         tiny_vit_checkpoint, "--epochs", "1", "--no-final_test", "--no-progress", *common])
    out_dir = str(tmp_path / "ft_eval")
    results = finetuned.main(["--test_dir", test_dir, "--f_name", str(tmp_path), "--m_name", "ft", "--rerank",
                              "--out_dir", out_dir, "--device", "cpu", "--num_workers", "0"])
    assert_results_match_reference(results, out_dir)
    roc = results["summary"]["all"]["roc_mean"]
    assert len(roc["far"]) == len(roc["tar"]) == len(verification.ROC_FAR_GRID) and roc["tar"][-1] == 1.0


def test_std_over_splits_is_the_sample_std_as_for_retrieval():
    from utils import io
    values = [0.1, 0.25, 0.4]
    assert verification.mean_std_or_none(values) == pytest.approx(io.mean_std(values))
    assert verification.mean_std_or_none(values)[1] == pytest.approx(np.std(values, ddof=1))
    assert verification.mean_std_or_none([0.1, None]) == (None, None)
