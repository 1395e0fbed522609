"""utils/metrics.py: parity with the reference vectors (CMC, both mAP conventions, mINP, re-ranking),
ties, the conventions on a hand-made ranking, and that the module needs no torch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from utils import metrics
from conftest import REPO, vectors_dir


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



def test_metrics_import_and_run_without_torch():
    # a None entry in sys.modules makes `import torch` fail, as on a machine without torch
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import numpy as np\n"
            "from utils import metrics\n"
            "sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])\n"
            "out = metrics.query_gallery_metrics(sim, [1, 2], [1, 2, 1])\n"
            "rr = metrics.re_ranking(np.eye(2, 4, dtype=np.float32), np.eye(3, 4, dtype=np.float32), k1=2, k2=1)\n"
            "print(out['rank1'], out['mAP_standard'], rr.shape, 'torch' in sys.modules and sys.modules['torch'])")
    done = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # query 0: matches at ranks 0 and 1 -> AP 1; query 1: match at rank 0 -> AP 1
    assert done.stdout.split() == ["1.0", "1.0", "(2,", "3)", "None"]
